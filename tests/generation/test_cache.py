"""Recurrent generation: prefill and step decoding equal a full forward; generate, padding, saved states.

There is one student class. Where these tests check it twice, the second model is the same student
exported and loaded back through transformers' remote code (the class generated into the exported
folder, not rwkvinside's): both must decode with the cache exactly as a full forward pass reads.
"""

from pathlib import Path

import pytest
import torch
from export.students import PROVENANCE, tiny_student
from transformers import AutoModelForCausalLM

from rwkvinside.export.export import export_student
from rwkvinside.modeling.state import CACHE_KEYWORD, RecurrentCache, RecurrentLayer
from rwkvinside.modeling.student import RWKVInsideForCausalLM
from rwkvinside.modeling.student_folder import save_student

LENGTH = 14


def ids(batch: int = 2, length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (batch, length), generator=torch.Generator().manual_seed(seed))


def through_remote_code(student: RWKVInsideForCausalLM, tokenizer, folder: Path):
    """`student` saved, exported in float32 and loaded back with trust_remote_code."""
    save_student(student, tokenizer, folder / "student", PROVENANCE)
    exported = export_student(folder / "student", folder / "exported", dtype="fp32")
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules")
    return model


@pytest.fixture
def models(build_teacher, tiny_tokenizer, tmp_path, remote_code_cache):
    """models(family, layers) -> {"toolkit": the in-process student, "remote code": the same student
    loaded back from its export through the generated code}."""

    def make(family: str, layers=(0, 1, 3)) -> dict:
        student = tiny_student(build_teacher, family, layers)
        return {"toolkit": student,
                "remote code": through_remote_code(student, tiny_tokenizer, tmp_path / f"{family}-{layers}")}

    return make


@torch.no_grad()
def pieces_logits(model, tokens: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """Logits of `tokens` fed in pieces ending at `splits`, the cache carrying the rest; [B, T, V]."""
    cache = model.new_cache()
    logits, start = [], 0
    for end in [*splits, tokens.shape[1]]:
        mask = torch.ones(tokens.shape[0], end, dtype=torch.long)  # every token so far, as generate passes it
        output = model(tokens[:, start:end], attention_mask=mask, use_cache=True, **{CACHE_KEYWORD: cache})
        assert getattr(output, CACHE_KEYWORD) is cache  # the same cache, carried from call to call
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


def test_prefill_and_steps_equal_the_full_forward(models, family):
    """Layer 2 kept as attention: its KV cache and the others' recurrent states side by side."""
    pair = models(family)
    for name, model in pair.items():
        check_pieces_equal_full_forward(model, name)
    with torch.no_grad():  # and the two are the same model
        torch.testing.assert_close(pair["remote code"](ids()).logits, pair["toolkit"](ids()).logits,
                                   rtol=1e-5, atol=1e-5)


def test_all_rwkv_model_needs_no_attention_layer_to_count_tokens(models):
    for name, model in models("llama", layers=None).items():
        check_pieces_equal_full_forward(model, name)


def test_a_pass_without_a_cache_leaves_no_state(build_teacher):
    """use_cache=False returns no cache; use_cache=True with none given makes a fresh one each call."""
    model = tiny_student(build_teacher)
    with torch.no_grad():
        assert getattr(model(ids(), use_cache=False), CACHE_KEYWORD) is None
        first = getattr(model(ids(), use_cache=True), CACHE_KEYWORD)
        second = getattr(model(ids(), use_cache=True), CACHE_KEYWORD)
    assert isinstance(first, RecurrentCache) and first is not second
    assert first.get_seq_length() == second.get_seq_length() == LENGTH


def test_state_size_does_not_grow(build_teacher):
    model = tiny_student(build_teacher)
    cache = model.new_cache()
    sizes = []
    with torch.no_grad():
        for t in range(6):
            model(ids(1, 1, seed=t), use_cache=True, **{CACHE_KEYWORD: cache})
            sizes.append([layer.state.wkv.shape + layer.state.shift.shape for layer in cache.layers
                          if isinstance(layer, RecurrentLayer)])
    assert all(s == sizes[0] for s in sizes) and len(sizes[0]) == 3
    assert cache.rwkv_layers == (0, 1, 3)
    assert cache.layers[2].keys.shape[-2] == 6  # the kept attention layer's cache grows, as usual


def greedy_by_full_forward(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            prompt = torch.cat([prompt, model(prompt).logits[:, -1:].argmax(-1)], dim=1)
    return prompt


def test_generate_equals_greedy_full_forwards(build_teacher, models):
    prompt = ids(1, 5)
    expected = greedy_by_full_forward(tiny_student(build_teacher), prompt, 8)
    for name, model in models("llama").items():
        generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(generated, expected), name


def test_generate_with_a_student_saved_without_use_cache(build_teacher):
    """A student whose config says use_cache=False (as training may leave it) still carries states."""
    model = tiny_student(build_teacher)
    model.config.text_config.use_cache = False
    fed = []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    prompt = ids(1, 5)
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert fed == [5] + [1] * 7  # the prompt once, then one new token per step: the states carry the rest
    assert torch.equal(generated, greedy_by_full_forward(model, prompt, 8))


def test_left_padded_batch_equals_one_by_one(models):
    prompts = [ids(1, n, seed=n)[0] for n in (3, 9, 6)]
    width = max(len(p) for p in prompts)
    padded = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([(torch.arange(width) >= width - len(p)).long() for p in prompts])
    for name, model in models("qwen2").items():
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
    # Text the free run writes after a few new tokens (whole characters: a token may hold part of one).
    stop = next((text for start in range(6, free.shape[1] - 2)
                 if "\ufffd" not in (text := tiny_tokenizer.decode(free[0, start:start + 2])) and text.strip()
                 and text not in tiny_tokenizer.decode(free[0, 4:start + 1])), None)
    assert stop is not None, tiny_tokenizer.decode(free[0])
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


def test_a_state_saved_by_the_toolkit_continues_in_the_exported_model(models, tmp_path):
    """The state file is the same for both: a conversation started in rwkvinside goes on in the export."""
    pair = models("llama")
    toolkit, remote = pair["toolkit"], pair["remote code"]
    options = {"do_sample": False, "pad_token_id": 0}
    cache = toolkit.new_cache()
    first = toolkit.generate(ids(1, 6), max_new_tokens=5, **options, **{CACHE_KEYWORD: cache})
    cache.save(tmp_path / "state.safetensors")
    restored = remote.new_cache()
    assert type(restored) is not RecurrentCache  # the generated code's own class
    restored.load(tmp_path / "state.safetensors")
    carried_on = toolkit.generate(first, max_new_tokens=6, **options, **{CACHE_KEYWORD: cache})
    assert torch.equal(remote.generate(first, max_new_tokens=6, **options, **{CACHE_KEYWORD: restored}),
                       carried_on)


def test_a_saved_state_refuses_another_model(build_teacher, tmp_path):
    model = tiny_student(build_teacher)
    cache = model.new_cache()
    with torch.no_grad():
        model(ids(1, 3), use_cache=True, **{CACHE_KEYWORD: cache})
    cache.save(tmp_path / "state.safetensors")
    other = RecurrentCache(model.config.text_config, rwkv_layers=(0, 1))
    with pytest.raises(ValueError, match="other converted layers"):
        other.load(tmp_path / "state.safetensors")
    used = model.new_cache()
    with torch.no_grad():
        model(ids(1, 2), use_cache=True, **{CACHE_KEYWORD: used})
    with pytest.raises(ValueError, match="new, empty cache"):
        used.load(tmp_path / "state.safetensors")
