"""Recurrent generation: prefill and step decoding equal a full forward; generate, padding, saved states."""

import pytest
import torch
from export.students import tiny_student

from rwkvinside.export.export import to_hf_model
from rwkvinside.modeling.state import CACHE_KEYWORD, RecurrentCache, RecurrentLayer

LENGTH = 14


def ids(batch: int = 2, length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (batch, length), generator=torch.Generator().manual_seed(seed))


def models(build_teacher, family: str, layers=(0, 1, 3)):
    """The toolkit's HybridModel and the exported class (in-process) over the same weights."""
    student = tiny_student(build_teacher, family, layers)
    return {"hybrid": student, "exported": to_hf_model(student)}


@torch.no_grad()
def pieces_logits(model, tokens: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """Logits of `tokens` fed in pieces ending at `splits`, the cache carrying the rest; [B, T, V]."""
    cache = model.new_cache()
    logits, start = [], 0
    for end in [*splits, tokens.shape[1]]:
        mask = torch.ones(tokens.shape[0], end, dtype=torch.long)  # every token so far, as generate passes it
        output = model(tokens[:, start:end], attention_mask=mask, use_cache=True, **{CACHE_KEYWORD: cache})
        logits.append(output.logits)
        start = end
    assert cache.get_seq_length() == tokens.shape[1]
    return torch.cat(logits, dim=1)


def check_pieces_equal_full_forward(model, name: str) -> None:
    tokens = ids()
    with torch.no_grad():
        full = model(tokens).logits
    chunked = pieces_logits(model, tokens, [5, 9])
    stepped = pieces_logits(model, tokens, list(range(LENGTH - 5, LENGTH)))
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-5, msg=f"{name}: chunked prefill")
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-5, msg=f"{name}: token by token")


def test_prefill_and_steps_equal_the_full_forward(build_teacher, family):
    """Layer 2 kept as attention: its KV cache and the others' recurrent states side by side."""
    for name, model in models(build_teacher, family).items():
        check_pieces_equal_full_forward(model, name)


def test_all_rwkv_model_needs_no_attention_layer_to_count_tokens(build_teacher):
    for name, model in models(build_teacher, "llama", layers=None).items():
        check_pieces_equal_full_forward(model, name)


def test_state_size_does_not_grow(build_teacher):
    model = tiny_student(build_teacher)
    cache = model.new_cache()
    sizes = []
    for t in range(6):
        model(ids(1, 1, seed=t), use_cache=True, **{CACHE_KEYWORD: cache})
        sizes.append([layer.state.wkv.shape + layer.state.shift.shape for layer in cache.layers
                      if isinstance(layer, RecurrentLayer)])
    assert all(s == sizes[0] for s in sizes) and len(sizes[0]) == 3
    assert cache.layers[2].keys.shape[-2] == 6  # the kept attention layer's cache grows, as usual


def greedy_by_full_forward(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            prompt = torch.cat([prompt, model(prompt).logits[:, -1:].argmax(-1)], dim=1)
    return prompt


def test_generate_equals_greedy_full_forwards(build_teacher):
    prompt = ids(1, 5)
    expected = greedy_by_full_forward(tiny_student(build_teacher), prompt, 8)
    for name, model in models(build_teacher, "llama").items():
        generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(generated, expected), name


def test_left_padded_batch_equals_one_by_one(build_teacher):
    prompts = [ids(1, n, seed=n)[0] for n in (3, 9, 6)]
    width = max(len(p) for p in prompts)
    padded = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([(torch.arange(width) >= width - len(p)).long() for p in prompts])
    for name, model in models(build_teacher, "qwen2").items():
        batch = model.generate(padded, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        for row, prompt in zip(batch, prompts, strict=True):
            alone = model.generate(prompt[None], max_new_tokens=8, do_sample=False, pad_token_id=0)[0]
            assert torch.equal(row[width:], alone[len(prompt):]), name


def test_sampling_follows_the_seed(build_teacher):
    model = tiny_student(build_teacher)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(ids(1, 4), max_new_tokens=10, do_sample=True, temperature=1.3, top_p=0.9,
                                   pad_token_id=0))
    assert torch.equal(*runs)


def test_stop_strings_end_generation(build_teacher, tiny_tokenizer):
    model = tiny_student(build_teacher)
    free = model.generate(ids(1, 4), max_new_tokens=12, do_sample=False, pad_token_id=0)
    stop = tiny_tokenizer.decode(free[0, 6:8])  # text the free run writes after two new tokens
    stopped = model.generate(ids(1, 4), max_new_tokens=12, do_sample=False, pad_token_id=0,
                             stop_strings=[stop], tokenizer=tiny_tokenizer)
    assert stopped.shape[1] < free.shape[1] and torch.equal(stopped[0], free[0, :stopped.shape[1]])


def test_saved_state_continues_identically(build_teacher, tmp_path):
    model = tiny_student(build_teacher)
    prompt = ids(1, 6)
    cache = model.new_cache()
    options = {"do_sample": False, "pad_token_id": 0}
    first = model.generate(prompt, max_new_tokens=5, **options, **{CACHE_KEYWORD: cache})
    cache.save(tmp_path / "state.safetensors")
    restored = model.new_cache()
    restored.load(tmp_path / "state.safetensors")
    assert restored.get_seq_length() == cache.get_seq_length() == first.shape[1] - 1

    carried_on = model.generate(first, max_new_tokens=6, **options, **{CACHE_KEYWORD: cache})
    from_file = model.generate(first, max_new_tokens=6, **options, **{CACHE_KEYWORD: restored})
    assert torch.equal(from_file, carried_on)
    assert torch.equal(carried_on, greedy_by_full_forward(model, prompt, 11))


def test_a_saved_state_refuses_another_model(build_teacher, tmp_path):
    model = tiny_student(build_teacher)
    cache = model.new_cache()
    model(ids(1, 3), use_cache=True, **{CACHE_KEYWORD: cache})
    cache.save(tmp_path / "state.safetensors")
    other = RecurrentCache(model.config, rwkv_layers=(0, 1))
    with pytest.raises(ValueError, match="other converted layers"):
        other.load(tmp_path / "state.safetensors")
