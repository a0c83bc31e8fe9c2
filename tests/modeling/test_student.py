"""RWKVInsideForCausalLM in stages 2-3: the forward pass, v_first, activation checkpointing (stage 1's
too), bad inputs, its configuration reading through to the teacher's, and a save_pretrained round trip."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from rwkvinside.errors import UserError
from rwkvinside.modeling.alignment import (alignment_losses, attach_teacher_attention,
                                           detach_teacher_attention, select_trainable)
from rwkvinside.modeling.attention import RWKVAttention
from rwkvinside.modeling.convert import ConversionSpec, convert
from rwkvinside.modeling.state import CACHE_KEYWORD
from rwkvinside.modeling.student import RWKVInsideForCausalLM

from .helpers import (BATCH, HIDDEN_SIZE, LENGTH, VOCAB_SIZE, aligning_student, attention_slots, perturb_,
                      random_ids, right_padding_mask, shares_storage)

TIED = {"llama", "qwen3"}  # the tiny teachers whose LM head is their input embedding (tests/conftest.py)


def student_gradients(model: RWKVInsideForCausalLM) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten())


# --- stages 2-3: the student's own forward pass -------------------------------------------------------

def test_forward_gives_the_student_logits_and_loss(make_teacher, family):
    teacher = make_teacher(family)
    student = convert(teacher, ConversionSpec(layers=(0, 2)))
    ids, mask = random_ids(BATCH, LENGTH, seed=1), right_padding_mask()
    with torch.no_grad():
        output = student(ids, mask, use_cache=False, labels=ids)
        teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
        last = student(ids, mask, use_cache=False, logits_to_keep=1).logits
    logits = output.logits
    assert logits.shape == (BATCH, LENGTH, VOCAB_SIZE) and torch.isfinite(logits).all()
    assert (logits - teacher_logits).abs().max() > 1e-3  # the mixers' outputs flow on
    shifted = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())  # labels are ids, unshifted
    torch.testing.assert_close(output.loss, shifted)
    assert last.shape == (BATCH, 1, VOCAB_SIZE)
    torch.testing.assert_close(last, logits[:, -1:], rtol=1e-6, atol=1e-6)


def test_hidden_states_then_lm_head_equals_logits(make_teacher, family):
    student = convert(make_teacher(family), ConversionSpec(layers=(1, 2)))
    ids, mask = random_ids(BATCH, LENGTH, seed=3), right_padding_mask()
    with torch.no_grad():
        hidden = student.hidden_states(ids, mask)
        logits = student(ids, mask, use_cache=False).logits
    assert hidden.shape == (BATCH, LENGTH, HIDDEN_SIZE)
    torch.testing.assert_close(student.lm_head(hidden), logits, rtol=0, atol=0)


# --- v_first -------------------------------------------------------------------------------------

def test_v_first_comes_from_the_first_converted_layer(make_teacher, family):
    student = convert(make_teacher(family), ConversionSpec(layers=(1, 2, 3)))
    assert not isinstance(attention_slots(student, family)[0], RWKVAttention)  # layer 0 keeps its attention
    slots = student.converted_attention()
    assert {i: s.produces_v_first for i, s in slots.items()} == {1: True, 2: False, 3: False}

    values, received = {}, {}
    slots[1].mixer.value.register_forward_hook(lambda _m, _i, out: values.setdefault("v", out))

    def receive(layer: int):  # the mixer is called as mixer(hidden_states, v_first, state, token_mask)
        def hook(_module, args):
            received[layer] = args[1]
        return hook

    for i in (2, 3):
        slots[i].mixer.register_forward_pre_hook(receive(i))
    with torch.no_grad():
        student(random_ids(BATCH, LENGTH), right_padding_mask(), use_cache=False)
    assert student.context.v_first is values["v"]  # layer 1's own value, not a zero placeholder
    assert received[2] is values["v"] and received[3] is values["v"]
    assert student.context.v_first.abs().max() > 0


def test_v_first_carries_the_later_layers_gradient_to_its_producer(make_teacher, family):
    """Cutting v_first off from the producer's graph (as reentrant checkpointing would) changes the
    producer's gradient: later layers' losses reach it through v_first."""
    student = convert(make_teacher(family), ConversionSpec(layers=(1, 2, 3)))
    select_trainable(student, "mixers")
    slots = student.converted_attention()
    ids, mask = random_ids(BATCH, LENGTH, seed=5), right_padding_mask()

    def producer_gradient(cut: bool) -> torch.Tensor:
        student.zero_grad(set_to_none=True)
        def detached(_module, args):  # mixer(hidden_states, v_first, state, token_mask)
            return (args[0], args[1].detach(), *args[2:])

        handles = [slots[i].mixer.register_forward_pre_hook(detached) for i in (2, 3) if cut]
        next_token_loss(student(ids, mask, use_cache=False).logits, ids, mask).backward()
        for handle in handles:
            handle.remove()
        return slots[1].mixer.value.weight.grad.clone()

    through_v_first = producer_gradient(cut=False)
    assert student.context.v_first.requires_grad and student.context.v_first_trainable
    without = producer_gradient(cut=True)
    assert through_v_first.abs().max() > 0 and without.abs().max() > 0  # layer 1's own output counts too
    assert (through_v_first - without).abs().max() > 1e-3 * through_v_first.abs().max()


# --- activation checkpointing --------------------------------------------------------------------

def gradients_of_one_step(model: RWKVInsideForCausalLM, stage: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    ids, mask = random_ids(BATCH, LENGTH, seed=4), right_padding_mask()
    if stage == 1:  # the per-layer path: each mixer runs inside its (checkpointed) decoder layer
        loss = sum(alignment_losses(model, ids, mask, batched=False).values())
    else:
        loss = next_token_loss(model(ids, mask, use_cache=False).logits, ids, mask)
    loss.backward()
    return student_gradients(model)


def checkpointed_student(make_teacher, stage: int) -> tuple[RWKVInsideForCausalLM, list[int]]:
    """Layers 1-3 converted (layer 1 produces v_first), mixers trainable, in train mode; counts the
    calls of layer 3's mixer."""
    teacher = make_teacher("qwen2")
    student = convert(teacher, ConversionSpec(layers=(1, 2, 3)))
    if stage == 1:
        attach_teacher_attention(student, teacher)
    select_trainable(student, "mixers")
    student.train()
    calls = []
    student.converted_attention()[3].mixer.register_forward_hook(lambda *_: calls.append(1))
    return student, calls


def enable_as_the_pipeline_does(model: RWKVInsideForCausalLM) -> None:
    with warnings.catch_warnings():  # transformers deprecates the name for activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


ENABLE_CHECKPOINTING = {
    "hf_default": lambda model: model.activation_checkpointing_enable(),
    "non_reentrant": lambda model: model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}),
    "as_the_pipeline": enable_as_the_pipeline_does,
}


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("enable", sorted(ENABLE_CHECKPOINTING))
def test_activation_checkpointing_keeps_the_gradients(make_teacher, stage, enable):
    model, calls = checkpointed_student(make_teacher, stage)
    plain = gradients_of_one_step(model, stage)
    assert len(calls) == 1

    ENABLE_CHECKPOINTING[enable](model)
    calls.clear()
    checkpointed = gradients_of_one_step(model, stage)
    assert len(calls) == 2  # the layer really was recomputed in backward

    # the producer has no value residual: its v0/v1/v2 take no part in the forward pass
    producer_value_residual = tuple(f"layers.1.self_attn.mixer.{name}" for name in ("v0", "v1", "v2"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n in trainable if not n.endswith(producer_value_residual)}
    assert plain.keys() == checkpointed.keys() == expected
    assert "model.layers.1.self_attn.mixer.value.weight" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("enable", ["non_reentrant", "reentrant"])
def test_batched_alignment_is_unaffected_by_checkpointing(make_teacher, enable):
    """The batched path runs the decoder layers (teacher attentions only) without gradients and the
    mixers after them, outside any checkpointed layer: the same gradients, reentrant or not."""
    model, _ = checkpointed_student(make_teacher, stage=1)
    ids, mask = random_ids(BATCH, LENGTH, seed=4), right_padding_mask()

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        sum(alignment_losses(model, ids, mask, batched=True).values()).backward()
        return student_gradients(model)

    plain = gradients()
    reentrant = enable == "reentrant"
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and "model.layers.3.self_attn.mixer.w0" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("stage", [1, 2])
def test_reentrant_checkpointing_is_refused(make_teacher, stage):
    """Reentrant checkpointing recomputes a layer cut off from v_first's producer: refused, never
    silently wrong (stage 1's per-layer losses come out of the no-grad first pass, so backward
    refuses too)."""
    model, _ = checkpointed_student(make_teacher, stage)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    expected = r"use_reentrant" if stage == 2 else r"does not require grad"
    with pytest.raises((UserError, RuntimeError), match=expected):
        gradients_of_one_step(model, stage)


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", [1, 2])
def test_input_on_another_device_is_refused(make_teacher, stage):
    teacher = make_teacher("llama")
    student = aligning_student(teacher) if stage == 1 else convert(teacher)
    calls = [student.hidden_states, student.forward]
    if stage == 1:
        calls.append(lambda ids, mask=None: alignment_losses(student, ids, mask))
    ids = torch.zeros(BATCH, LENGTH, dtype=torch.long, device="meta")
    for call in calls:
        with pytest.raises(ValueError, match="input_ids are on meta but the model is on cpu"):
            call(ids)
        with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\)"):
            call(random_ids(BATCH, LENGTH), torch.ones(BATCH, 5, dtype=torch.long))


# --- the configuration ----------------------------------------------------------------------------

CAUSAL_LM_ATTRIBUTES = ("vocab_size", "num_hidden_layers", "hidden_size", "max_position_embeddings",
                        "num_attention_heads", "num_key_value_heads", "intermediate_size", "rms_norm_eps",
                        "hidden_act", "initializer_range", "rope_parameters", "bos_token_id", "eos_token_id",
                        "pad_token_id", "tie_word_embeddings")


def test_config_reads_through_to_the_teacher_config(make_teacher, family):
    teacher = make_teacher(family)
    config = convert(teacher, ConversionSpec(layers=(1, 3))).config
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size,
            config.max_position_embeddings) == (VOCAB_SIZE, 4, HIDDEN_SIZE, 512)
    for name in CAUSAL_LM_ATTRIBUTES:
        assert getattr(config, name) == getattr(teacher.config, name), name
    assert config.get_text_config() is config.text_config
    assert type(config.text_config) is type(teacher.config)
    # its own attributes are its own
    assert (config.model_type, config.rwkv_layers, config.head_size) == ("rwkvinside", [1, 3], None)
    assert not hasattr(config, "no_such_attribute") and not hasattr(config, "_no_such_private_attribute")
    assert copy.deepcopy(config).vocab_size == VOCAB_SIZE  # generic tools copy configs


def test_student_config_enables_the_generation_cache_without_touching_the_teacher(make_teacher):
    teacher = make_teacher("mistral")
    teacher.config.use_cache = False  # as load_teacher leaves it
    student = convert(teacher)
    assert student.config.use_cache is True and student.config.text_config.use_cache is True
    assert teacher.config.use_cache is False


# --- save_pretrained / from_pretrained ---------------------------------------------------------------

def test_saved_student_reloads_with_identical_logits(tmp_path, make_teacher, family):
    teacher = make_teacher(family)
    student = convert(teacher, ConversionSpec(layers=(0, 2)))
    for slot in student.converted_attention().values():  # no parameter left at a value a fresh mixer has
        perturb_(slot.mixer, seed=slot.layer_idx)
    student.config.trained_context = 96
    student.save_pretrained(tmp_path)

    loaded, loading = RWKVInsideForCausalLM.from_pretrained(tmp_path, output_loading_info=True)

    assert not any(loading[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(loaded) is RWKVInsideForCausalLM and loaded.rwkv_layers == (0, 2)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "rwkvinside"
    assert (loaded.config.trained_context, loaded.config.vocab_size) == (96, VOCAB_SIZE)
    assert all(type(slot) is RWKVAttention for slot in loaded.converted_attention().values())
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == (family in TIED)
    assert not shares_storage(loaded.model.embed_tokens.weight, teacher.model.embed_tokens.weight)  # its own
    saved, reloaded = student.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    assert all(torch.equal(reloaded[name], tensor) for name, tensor in saved.items())

    ids, mask = random_ids(BATCH, LENGTH, seed=6), right_padding_mask()
    loaded.eval()
    with torch.no_grad():
        expected = student(ids, mask, use_cache=False).logits
        logits = loaded(ids, mask, use_cache=False).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_a_detached_stage_1_student_saves_without_the_teacher_attention(tmp_path, make_teacher):
    teacher = make_teacher("qwen3")
    student = aligning_student(teacher, ConversionSpec(layers=(1, 3)))
    detach_teacher_attention(student)
    student.save_pretrained(tmp_path)
    loaded = RWKVInsideForCausalLM.from_pretrained(tmp_path)
    names = set(loaded.state_dict())
    assert names == set(student.state_dict())
    assert not any(".teacher." in name for name in names)
    assert "model.layers.1.self_attn.mixer.w0" in names
    assert "model.layers.1.self_attn.q_proj.weight" not in names


def test_a_teacher_setting_written_through_the_student_config_is_the_one_the_model_reads(make_teacher):
    student = convert(make_teacher("llama"))
    student.config.use_cache = False
    assert student.config.use_cache is False and student.config.text_config.use_cache is False
    assert "use_cache" not in vars(student.config)  # one copy of the fact
    student.config.trained_context = 64  # the student's own field stays its own
    assert student.config.trained_context == 64 and not hasattr(student.config.text_config, "trained_context")


# --- a lead token (convert.lead): read before every sequence the student starts ------------------------

LEAD = 7


def lead_student(make_teacher, family: str = "llama") -> RWKVInsideForCausalLM:
    torch.manual_seed(0)
    return perturb_(convert(make_teacher(family), ConversionSpec(lead_token_id=LEAD))).eval()


def logits_without_lead(student: RWKVInsideForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The definition: the same student, its lead written into the input by hand, its output dropped."""
    lead, student.config.lead_token_id = student.config.lead_token_id, None
    try:
        return student(torch.cat([torch.full_like(ids[:, :1], lead), ids], dim=1), use_cache=False).logits[:, 1:]
    finally:
        student.config.lead_token_id = lead


def test_a_student_with_a_lead_reads_it_before_every_sequence(make_teacher, family):
    student = lead_student(make_teacher, family)
    ids = random_ids(BATCH, LENGTH, seed=4)
    with torch.no_grad():
        expected = logits_without_lead(student, ids)
        torch.testing.assert_close(student(ids, use_cache=False).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(student.lm_head(student.hidden_states(ids)), expected, rtol=0, atol=0)
        cache = student.new_cache()
        prefill = student(ids, **{CACHE_KEYWORD: cache}).logits
        assert cache.get_seq_length() == LENGTH  # the sequence's tokens; the lead is not one of them
        step = student(ids[:, :1], **{CACHE_KEYWORD: cache}).logits  # a continuation reads no lead
        whole = logits_without_lead(student, torch.cat([ids, ids[:, :1]], dim=1))
    torch.testing.assert_close(prefill, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, whole[:, -1:], rtol=1e-5, atol=1e-5)


def test_with_padding_the_lead_comes_just_before_each_rows_first_token(make_teacher):
    """Left padding (generation) leaves the state untouched only before the lead; right padding
    (training) follows the tokens. Each row scores as it would alone."""
    student = lead_student(make_teacher)
    ids = random_ids(BATCH, LENGTH, seed=5)
    left = torch.ones(BATCH, LENGTH, dtype=torch.long)
    left[0, :3] = 0
    with torch.no_grad():
        alone = logits_without_lead(student, ids[:1, 3:])
        torch.testing.assert_close(student(ids, left, use_cache=False).logits[:1, 3:], alone, rtol=1e-5, atol=1e-5)
        alone = logits_without_lead(student, ids[:1, :LENGTH - 3])
        right = student(ids, right_padding_mask(), use_cache=False).logits[:1, :LENGTH - 3]
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)


def test_greedy_generation_with_a_lead_follows_the_logits(make_teacher):
    student = lead_student(make_teacher)
    ids = random_ids(1, 6, seed=6)
    with torch.no_grad():
        tokens = student.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        expected = ids
        for _ in range(5):
            expected = torch.cat([expected, logits_without_lead(student, expected)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(tokens, expected)


def test_a_lead_is_kept_through_save_and_load(make_teacher, tmp_path):
    student = lead_student(make_teacher)
    student.save_pretrained(tmp_path)
    assert RWKVInsideForCausalLM.from_pretrained(tmp_path).config.lead_token_id == LEAD


def test_a_lead_needs_every_layer_converted(make_teacher):
    with pytest.raises(UserError, match="every layer converted"):
        convert(make_teacher("llama"), ConversionSpec(layers=(0, 1), lead_token_id=LEAD))
