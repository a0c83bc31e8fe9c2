"""Recurrent decoding (modeling/decode.py): the student's own generation loop chooses the tokens that
transformers' `generate` chooses, carries the cache the same way, and hands anything it does not
implement to transformers. A hybrid's kept attention layers decode from fixed key/value buffers. The
captured step replays the eager loop: on the CPU with the step recorded by make_fx (what a CUDA
graph does to it: Python values frozen, the same storage read and written), on a GPU from a CUDA graph."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from transformers import GenerationMixin
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from rwkvinside.modeling.alignment import select_trainable
from rwkvinside.modeling.convert import ConversionSpec, convert
from rwkvinside.modeling.decode import DecodeLoop, DecodingPlan, FixedKeyValues, choose_tokens, decoding_plan
from rwkvinside.modeling.state import CACHE_KEYWORD, RecurrentLayer

LAYERS = {"all-RWKV": None, "hybrid": (0, 1, 3)}


@pytest.fixture(params=sorted(LAYERS))
def student(request, make_teacher):
    torch.manual_seed(0)
    model = convert(make_teacher("llama"), ConversionSpec(layers=LAYERS[request.param])).eval()
    with torch.no_grad():
        for p in select_trainable(model, "mixers").values():
            p.add_(torch.randn_like(p) * 0.1)
    return model.requires_grad_(False)


def prompt(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (batch, length), generator=torch.Generator().manual_seed(seed))


def transformers_generate(model, ids, **options):
    """transformers' own loop over the same model and a fresh cache (the reference)."""
    return GenerationMixin.generate(model, ids, use_cache=True, **{CACHE_KEYWORD: model.new_cache()}, **options)


def test_greedy_tokens_equal_transformers_generate(student):
    ids = prompt()
    ours = student.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert ours.shape == (2, 9 + 24)
    assert torch.equal(ours, transformers_generate(student, ids, max_new_tokens=24, do_sample=False, pad_token_id=0))


def test_rows_end_at_eos_and_are_padded_as_transformers_does(student):
    ids = prompt()
    free = student.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
    eos = [int(free[0, 9 + 3]), int(free[1, 9 + 10])]  # tokens the rows will write: each row ends early
    options = dict(max_new_tokens=24, do_sample=False, pad_token_id=1, eos_token_id=eos)
    ours = student.generate(ids, **options)
    assert ours.shape[1] < 9 + 24 and (ours == 1).any()  # stopped when both rows ended; one row padded
    assert torch.equal(ours, transformers_generate(student, ids, **options))
    late = dict(options, min_new_tokens=12)
    assert torch.equal(student.generate(ids, **late), transformers_generate(student, ids, **late))


def test_a_carried_cache_continues_where_it_stopped(student):
    """A chat passes the whole history and the cache that has read most of it."""
    ids = prompt(batch=1)
    ours_cache, reference_cache = student.new_cache(), student.new_cache()
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    first = student.generate(ids, **{CACHE_KEYWORD: ours_cache}, **options)
    assert torch.equal(first, GenerationMixin.generate(student, ids, use_cache=True,
                                                       **{CACHE_KEYWORD: reference_cache}, **options))
    assert ours_cache.get_seq_length() == reference_cache.get_seq_length() == first.shape[1] - 1
    history = torch.cat([first, prompt(batch=1, length=4, seed=1)], dim=1)
    second = student.generate(history, **{CACHE_KEYWORD: ours_cache}, **options)
    assert torch.equal(second, GenerationMixin.generate(student, history, use_cache=True,
                                                        **{CACHE_KEYWORD: reference_cache}, **options))


@pytest.mark.parametrize("layers", [None, (0, 2)], ids=["all-RWKV", "hybrid"])
def test_a_left_padded_row_decodes_as_it_would_alone(make_teacher, monkeypatch, layers):
    """Padding first leaves the recurrent states untouched, and the kept attention layers never see it
    (their fixed buffers carry which slots are padding): each row of a padded batch decodes as it
    would alone, in the student's own loop."""
    torch.manual_seed(0)
    student = convert(make_teacher("qwen2"), ConversionSpec(layers=layers)).eval().requires_grad_(False)
    short, long = prompt(batch=1, length=6), prompt(batch=1, length=9, seed=2)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    kinds = layer_kinds_while_decoding(monkeypatch)
    together = student.generate(batch, attention_mask=mask, **options)
    assert kinds  # the student's own loop, not transformers'
    assert torch.equal(together[:1, 3:], student.generate(short, **options))
    assert torch.equal(together[1:], student.generate(long, **options))


@pytest.mark.parametrize("options", [dict(num_beams=2), dict(repetition_penalty=1.3), dict(max_length=20)],
                         ids=["beams", "repetition_penalty", "no_max_new_tokens"])
def test_options_the_loop_lacks_go_to_transformers(student, options):
    assert decoding_plan(student.generation_config, {"max_new_tokens": 5, **options}
                         if "max_length" not in options else options) is None
    ids = prompt()
    settings = dict(do_sample=False, pad_token_id=0, **({"max_new_tokens": 5} if "max_length" not in options else {}),
                    **options)
    assert torch.equal(student.generate(ids, **settings), transformers_generate(student, ids, **settings))


def test_the_plan_reads_the_models_generation_config(student):
    student.generation_config.top_k = 7
    plan = decoding_plan(student.generation_config, {"max_new_tokens": 3, "do_sample": True, "eos_token_id": 4})
    assert plan == DecodingPlan(max_new_tokens=3, do_sample=True, top_k=7, top_p=1.0, temperature=1.0,
                                eos_token_ids=(4,), pad_token_id=4)


# ---- a hybrid's kept attention layers ----------------------------------------------------------------

def layer_kinds_while_decoding(monkeypatch) -> list[tuple[type, ...]]:
    """The classes of the cache's layers at every decoding step of the generations that follow."""
    kinds: list[tuple[type, ...]] = []
    step = DecodeLoop.step

    def recording_step(loop):
        kinds.append(tuple(type(layer) for layer in loop.cache.layers))
        step(loop)

    monkeypatch.setattr(DecodeLoop, "step", recording_step)
    return kinds


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_kept_attention_layers_decode_from_fixed_buffers(make_teacher, monkeypatch, family, attention):
    """Each step writes its key and value into buffers that keep their size and attends to the slots up
    to its own (what lets the step be captured in a CUDA graph): the tokens are transformers', and the
    cache handed back is the usual growing one, which a later call continues."""
    torch.manual_seed(0)
    student = convert(make_teacher(family), ConversionSpec(layers=(0, 2))).eval().requires_grad_(False)
    student.set_attn_implementation(attention)
    ids = prompt()
    options = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    reference_cache = student.new_cache()
    expected = GenerationMixin.generate(student, ids, use_cache=True, **{CACHE_KEYWORD: reference_cache},
                                        **options)
    kinds = layer_kinds_while_decoding(monkeypatch)
    cache = student.new_cache()
    assert torch.equal(student.generate(ids, **{CACHE_KEYWORD: cache}, **options), expected)
    assert len(kinds) == 9 and all(kind[1] is kind[3] is FixedKeyValues for kind in kinds)
    assert type(cache.layers[1]) is DynamicLayer and cache.get_seq_length() == 9 + 10 - 1
    torch.testing.assert_close(cache.layers[3].keys, reference_cache.layers[3].keys)
    history = torch.cat([expected, prompt(batch=2, length=3, seed=1)], dim=1)
    assert torch.equal(student.generate(history, **{CACHE_KEYWORD: cache}, **options),
                       GenerationMixin.generate(student, history, use_cache=True,
                                                **{CACHE_KEYWORD: reference_cache}, **options))


def test_a_sliding_window_layer_decodes_from_its_growing_cache(make_teacher, monkeypatch):
    """A layer whose window slides keeps transformers' own cache, which drops what leaves the window."""
    torch.manual_seed(0)
    teacher = make_teacher("mistral")
    teacher.config.sliding_window = 6
    student = convert(teacher, ConversionSpec(layers=(0, 2))).eval().requires_grad_(False)
    ids = prompt()
    options = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    kinds = layer_kinds_while_decoding(monkeypatch)
    assert torch.equal(student.generate(ids, **options), transformers_generate(student, ids, **options))
    assert kinds and all(kind[1] is kind[3] is DynamicSlidingWindowLayer for kind in kinds)


# ---- choosing a token ----------------------------------------------------------------------------

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def frequencies(plan: DecodingPlan, draws: int = 40000) -> torch.Tensor:
    torch.manual_seed(0)
    tokens = choose_tokens(LOGITS.expand(draws, -1), plan)
    return torch.bincount(tokens, minlength=LOGITS.shape[1]).float() / draws


def test_sampling_follows_the_softmax_at_the_temperature():
    for temperature in (1.0, 0.5):
        expected = (LOGITS[0] / temperature).softmax(-1)
        observed = frequencies(DecodingPlan(max_new_tokens=1, do_sample=True, temperature=temperature))
        torch.testing.assert_close(observed, expected, atol=0.01, rtol=0)


def test_top_k_and_top_p_cut_the_tail_and_renormalise():
    top_k = frequencies(DecodingPlan(max_new_tokens=1, do_sample=True, top_k=2))
    torch.testing.assert_close(top_k, torch.cat([LOGITS[0, :2].softmax(-1), torch.zeros(4)]), atol=0.01, rtol=0)
    probabilities = LOGITS[0].softmax(-1)  # 0.61, 0.22, 0.14, ...: the first two reach 0.8
    top_p = frequencies(DecodingPlan(max_new_tokens=1, do_sample=True, top_p=0.8))
    torch.testing.assert_close(top_p, torch.cat([probabilities[:3] / probabilities[:3].sum(), torch.zeros(3)]),
                               atol=0.01, rtol=0)
    assert torch.equal(choose_tokens(LOGITS, DecodingPlan(max_new_tokens=1)), torch.tensor([0]))


# ---- the CUDA graph --------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layers", sorted(LAYERS))
def test_the_graph_replays_the_eager_loop(make_teacher, monkeypatch, layers, fla_untuned):
    from rwkvinside.modeling import decode

    torch.manual_seed(0)
    teacher = make_teacher("llama").cuda()
    student = convert(teacher, ConversionSpec(layers=LAYERS[layers])).eval().requires_grad_(False)
    # One prompt token: the prefill is then a recurrent step too, so only fla's step kernel is
    # compiled (a longer prompt costs minutes of chunk-kernel autotuning at these untypical shapes).
    ids = prompt()[:, :1].cuda()
    options = dict(max_new_tokens=40, do_sample=False, pad_token_id=0)
    graphed = student.generate(ids, **options)
    monkeypatch.setattr(decode, "graph_capturable", lambda model, cache: False)
    assert torch.equal(graphed, student.generate(ids, **options))


class RecordedStep:
    """A CPU stand-in for a CUDA graph: the step's tensor operations recorded once (by make_fx), with
    the Python values they depend on frozen at their recording and every tensor the step reads or
    writes in place kept as the same storage, and replayed as recorded. A step that takes anything
    from Python that changes from token to token (a count, a position) replays wrong here as it
    would from a CUDA graph."""

    def __init__(self, step):
        self.recording = make_fx(lambda: (step(), torch.zeros(()))[1])()  # make_fx wants an output

    def replay(self) -> None:
        self.recording()


def record_instead_of_capturing(step) -> RecordedStep:
    for _ in range(2):  # as capture's warm-up runs
        step()
    return RecordedStep(step)


@pytest.mark.parametrize("layers", sorted(LAYERS))
def test_a_recorded_step_replays_the_eager_loop(make_teacher, monkeypatch, layers):
    """The captured step, checked on the CPU: replayed as recorded, it chooses the eager loop's tokens
    and leaves the same cache (the kept layers' keys carry their rotary positions), a left-padded
    row included."""
    from rwkvinside.modeling import decode

    torch.manual_seed(0)
    student = convert(make_teacher("llama"), ConversionSpec(layers=LAYERS[layers])).eval().requires_grad_(False)
    ids = prompt()
    ids[0, :2] = 0
    mask = (torch.arange(9) >= torch.tensor([[2], [0]])).long()
    options = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    eager_cache, cache = student.new_cache(), student.new_cache()
    eager = student.generate(ids, **{CACHE_KEYWORD: eager_cache}, **options)
    monkeypatch.setattr(decode, "graph_capturable", lambda model, cache: True)
    monkeypatch.setattr(decode, "capture", record_instead_of_capturing)
    assert torch.equal(student.generate(ids, **{CACHE_KEYWORD: cache}, **options), eager)
    assert cache.get_seq_length() == eager_cache.get_seq_length() == 9 + 16 - 1
    for layer, expected in zip(cache.layers, eager_cache.layers, strict=True):
        if isinstance(layer, RecurrentLayer):
            torch.testing.assert_close(layer.state.wkv, expected.state.wkv)
            torch.testing.assert_close(layer.state.shift, expected.state.shift)
        else:
            torch.testing.assert_close(layer.keys, expected.keys)
            torch.testing.assert_close(layer.values, expected.values)


@pytest.mark.parametrize("layers", sorted(LAYERS))
def test_a_step_that_cannot_be_captured_is_decoded_eagerly(make_teacher, monkeypatch, caplog, layers):
    """Where capturing fails, the loop is put back as it was (the warm-up steps advanced it: states,
    position, token counts) and runs eagerly: the same tokens, the same cache, and a warning that
    says why."""
    from rwkvinside.modeling import decode

    torch.manual_seed(0)
    student = convert(make_teacher("llama"), ConversionSpec(layers=LAYERS[layers])).eval().requires_grad_(False)
    ids = prompt()
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected_cache = student.new_cache()
    expected = student.generate(ids, **{CACHE_KEYWORD: expected_cache}, **options)

    def failing_capture(step):
        step()  # as the warm-up runs do, before CUDA refuses an operation
        step()
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decode, "graph_capturable", lambda model, cache: True)
    monkeypatch.setattr(decode, "capture", failing_capture)
    cache = student.new_cache()
    with caplog.at_level("WARNING"):
        assert torch.equal(student.generate(ids, **{CACHE_KEYWORD: cache}, **options), expected)
    assert "decoding eagerly" in caplog.text and "not permitted" in caplog.text
    assert cache.get_seq_length() == expected_cache.get_seq_length()
