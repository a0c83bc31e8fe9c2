"""HybridModel: which layers convert, stage 1 (alignment) and stages 2-3 (students only), v_first,
activation checkpointing, and the bad inputs that must convert nothing."""

import copy

import pytest
import torch
import torch.nn.functional as F

from rwkvinside.errors import UserError
from rwkvinside.modeling.hybrid import AttentionWrapper, ConversionSpec, HybridModel, RWKVAttention

from .helpers import VOCAB_SIZE, attention_slots, random_ids

BATCH, LENGTH = 2, 12


def right_padding_mask(pad: int = 3) -> torch.Tensor:
    """Row 0 ends with `pad` padding positions; row 1 is all real tokens."""
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[0, LENGTH - pad:] = 0
    return mask


def student_gradients(model: HybridModel) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# --- which layers are converted ------------------------------------------------------------------

def test_all_layers_converted_by_default(make_teacher, family):
    teacher = make_teacher(family)
    originals = attention_slots(teacher, family)
    model = HybridModel(teacher)
    assert model.converted_layers == (0, 1, 2, 3)
    slots = attention_slots(model.model, family)
    assert all(isinstance(slot, AttentionWrapper) for slot in slots)
    assert [slot.teacher for slot in slots] == originals  # the very same teacher modules, wrapped
    assert [s.produces_v_first for s in model.students().values()] == [True, False, False, False]


def test_a_subset_leaves_the_other_attentions_alone(make_teacher, family):
    teacher = make_teacher(family)
    originals = attention_slots(teacher, family)
    model = HybridModel(teacher, ConversionSpec(layers=(3, 1, 3)))
    assert model.converted_layers == (1, 3)
    slots = attention_slots(model.model, family)
    for i in (0, 2):
        assert slots[i] is originals[i] and type(slots[i]) is type(originals[i])
        assert type(slots[i]).__name__.endswith("Attention")
    for i in (1, 3):
        assert isinstance(slots[i], AttentionWrapper) and slots[i].teacher is originals[i]
    assert sorted(model.students()) == [1, 3]


def test_only_student_parameters_require_grad(make_teacher, family):
    model = HybridModel(make_teacher(family), ConversionSpec(layers=(0, 2)))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    students = {id(p) for p in model.student_parameters()}
    assert trainable == students and len(students) > 0
    assert all(not p.requires_grad for slot in attention_slots(model.model, family)
               if isinstance(slot, AttentionWrapper) for p in slot.teacher.parameters())


# --- stage 1: alignment --------------------------------------------------------------------------

def test_alignment_losses_without_logits_and_teacher_flows_on(make_teacher, family):
    teacher = make_teacher(family)
    pure = copy.deepcopy(teacher)
    model = HybridModel(teacher, ConversionSpec(layers=(1, 3)))
    ids, mask = random_ids(BATCH, LENGTH), right_padding_mask()

    def no_logits(*_):
        raise AssertionError("alignment must not run the LM head")

    final = {}
    model.lm_head.register_forward_pre_hook(no_logits)
    model.model.model.norm.register_forward_hook(lambda _m, _i, out: final.setdefault("hidden", out))
    losses = model.alignment_losses(ids, mask)

    assert sorted(losses) == [1, 3]
    for loss in losses.values():
        assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0 and loss.requires_grad
    with torch.no_grad():
        expected = pure.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(final["hidden"], expected, rtol=1e-6, atol=1e-6)


def test_padding_is_excluded_from_the_alignment_loss(make_teacher, family):
    model = HybridModel(make_teacher(family))
    ids, mask = random_ids(BATCH, LENGTH), right_padding_mask()
    other_ids = torch.where(mask.bool(), ids, (ids + 7) % VOCAB_SIZE)  # different tokens under the padding
    assert not torch.equal(ids, other_ids)

    outputs = {}

    def keep(key):
        return lambda _module, _inputs, output: outputs.__setitem__(key, output[0])

    for i, slot in enumerate(attention_slots(model.model, family)):
        slot.teacher.register_forward_hook(keep(("teacher", i)))
        slot.student.register_forward_hook(keep(("student", i)))
    with torch.no_grad():
        losses = model.alignment_losses(ids, mask)
        for i, loss in losses.items():  # mean over channels, then over the real tokens only
            squared = (outputs["student", i] - outputs["teacher", i]).pow(2).mean(-1)
            torch.testing.assert_close(loss, squared[mask.bool()].mean(), rtol=1e-6, atol=0)
        other_losses = model.alignment_losses(other_ids, mask)
        unmasked = model.alignment_losses(ids)
        unmasked_other = model.alignment_losses(other_ids)
    for i in losses:
        torch.testing.assert_close(other_losses[i], losses[i], rtol=1e-6, atol=0)
        assert not torch.allclose(unmasked_other[i], unmasked[i], rtol=1e-4)  # the change is visible


# --- stages 2-3: students only -------------------------------------------------------------------

def test_drop_teacher_attention(make_teacher, family):
    teacher = make_teacher(family)
    pure = copy.deepcopy(teacher)
    originals = attention_slots(teacher, family)
    model = HybridModel(teacher, ConversionSpec(layers=(0, 2, 3)))
    count_before = sum(p.numel() for p in model.parameters())
    dropped = sum(p.numel() for i in (0, 2, 3) for p in originals[i].parameters())

    model.drop_teacher_attention()

    assert not model.aligning
    assert not any(isinstance(m, AttentionWrapper) for m in model.modules())
    present = {id(m) for m in model.modules()}
    assert [id(originals[i]) in present for i in range(4)] == [False, True, False, False]
    assert sum(p.numel() for p in model.parameters()) == count_before - dropped
    slots = attention_slots(model.model, family)
    assert all(isinstance(slots[i], RWKVAttention) for i in (0, 2, 3))

    ids, mask = random_ids(BATCH, LENGTH), right_padding_mask()
    with torch.no_grad():
        logits = model(ids, mask, use_cache=False).logits
        teacher_logits = pure(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (BATCH, LENGTH, VOCAB_SIZE) and torch.isfinite(logits).all()
    assert (logits - teacher_logits).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="dropped"):
        model.alignment_losses(ids, mask)


def test_hidden_states_then_lm_head_equals_logits(make_teacher, family):
    model = HybridModel(make_teacher(family), ConversionSpec(layers=(1, 2)))
    model.drop_teacher_attention()
    ids, mask = random_ids(BATCH, LENGTH, seed=3), right_padding_mask()
    with torch.no_grad():
        hidden = model.hidden_states(ids, mask)
        logits = model(ids, mask, use_cache=False).logits
    assert hidden.shape == (BATCH, LENGTH, 64)
    torch.testing.assert_close(model.lm_head(hidden), logits, rtol=0, atol=0)


# --- v_first -------------------------------------------------------------------------------------

def test_v_first_comes_from_the_first_converted_layer(make_teacher, family):
    model = HybridModel(make_teacher(family), ConversionSpec(layers=(1, 2, 3)))
    slots = attention_slots(model.model, family)
    assert not isinstance(slots[0], (AttentionWrapper, RWKVAttention))  # layer 0 keeps softmax attention
    students = model.students()
    assert {i: s.produces_v_first for i, s in students.items()} == {1: True, 2: False, 3: False}

    values = {}
    students[1].mixer.value.register_forward_hook(lambda _m, _i, out: values.setdefault("v", out))
    model.alignment_losses(random_ids(BATCH, LENGTH), right_padding_mask())
    assert model.context.v_first is values["v"]  # layer 1's own value, not a zero placeholder
    assert model.context.v_first.abs().max() > 0


def test_a_later_layer_loss_reaches_the_producer(make_teacher, family):
    model = HybridModel(make_teacher(family), ConversionSpec(layers=(1, 2, 3)))
    model.alignment_losses(random_ids(BATCH, LENGTH), right_padding_mask())[3].backward()
    students = model.students()
    assert students[1].mixer.value.weight.grad.abs().max() > 0  # through v_first only
    assert students[1].mixer.receptance.weight.grad is None  # layer 1's own output is not in loss 3
    assert all(p.grad is None for p in students[2].parameters())  # stage 1: the teacher's output flows on
    assert students[3].mixer.output.weight.grad.abs().max() > 0


def gradients_of_one_step(model: HybridModel, stage: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    ids, mask = random_ids(BATCH, LENGTH, seed=4), right_padding_mask()
    if stage == 1:
        loss = sum(model.alignment_losses(ids, mask).values())
    else:
        logits = model(ids, mask, use_cache=False).logits
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten())
    loss.backward()
    return student_gradients(model)


def checkpointed_hybrid(make_teacher, stage: int) -> tuple[HybridModel, list[int]]:
    """Layers 1-3 converted (layer 1 produces v_first), in train mode; counts student calls."""
    model = HybridModel(make_teacher("qwen2"), ConversionSpec(layers=(1, 2, 3)))
    if stage == 2:
        model.drop_teacher_attention()
    model.train()
    calls = []
    model.students()[3].mixer.register_forward_hook(lambda *_: calls.append(1))
    return model, calls


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}], ids=["hf_default", "non_reentrant"])
def test_activation_checkpointing_keeps_the_gradients(make_teacher, stage, kwargs):
    model, calls = checkpointed_hybrid(make_teacher, stage)
    plain = gradients_of_one_step(model, stage)
    assert len(calls) == 1

    model.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    calls.clear()
    checkpointed = gradients_of_one_step(model, stage)
    assert len(calls) == 2  # the layer really was recomputed in backward

    producer_value_residual = tuple(f"layers.1.{path}mixer.{name}" for name in ("v0", "v1", "v2")
                                    for path in ("self_attn.", "self_attn.student."))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n in trainable if not n.endswith(producer_value_residual)}
    assert plain.keys() == checkpointed.keys() == expected
    assert any(".1." in name and "mixer.value.weight" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("stage", [1, 2])
def test_reentrant_checkpointing_is_refused(make_teacher, stage):
    """Reentrant checkpointing recomputes a layer cut off from v_first's producer: refused, never
    silently wrong (stage 1's losses come out of the no-grad first pass, so backward refuses too)."""
    model, _ = checkpointed_hybrid(make_teacher, stage)
    model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    expected = r"use_reentrant" if stage == 2 else r"does not require grad"
    with pytest.raises((UserError, RuntimeError), match=expected):
        gradients_of_one_step(model, stage)


# --- bad input: each refused with a message naming the problem, and nothing converted ---------------

def cast_one_layer_to_float64(teacher):
    teacher.model.layers[2].to(torch.float64)


BAD_SPECS = {  # case: (family, spec, damage done to the teacher first, message)
    "layer out of range": ("llama", ConversionSpec(layers=(1, 4)), None,
                           r"layer index 4 is out of range.*4 layers"),
    "negative layer": ("llama", ConversionSpec(layers=(-1,)), None, r"layer index -1 is out of range"),
    "empty layer list": ("mistral", ConversionSpec(layers=()), None, r"no layer chosen"),
    "head size not dividing": ("qwen2", ConversionSpec(head_size=24), None,
                               r"head size 24 does not divide .* 64"),
    "zero head size": ("llama", ConversionSpec(head_size=0), None, r"head size 0 does not divide"),
    "qwen3 head size": ("qwen3", ConversionSpec(head_size=32), None,
                        r"qwen3 .* head size must be 16, not 32"),
    "unknown init": ("llama", ConversionSpec(init="xavier"), None,
                     r"unknown initialisation 'xavier'.*teacher, rwkv"),
    "mixed dtypes": ("llama", ConversionSpec(), cast_one_layer_to_float64, r"mixes dtypes.*float32.*float64"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_is_refused_and_converts_nothing(make_teacher, case):
    family, spec, damage, message = BAD_SPECS[case]
    teacher = make_teacher(family)
    if damage is not None:
        damage(teacher)
    slots_before = attention_slots(teacher, family)
    state_before = {name: p.clone() for name, p in teacher.state_dict().items()}
    grads_before = [p.requires_grad for p in teacher.parameters()]

    with pytest.raises(UserError, match=message):
        HybridModel(teacher, spec)

    assert attention_slots(teacher, family) == slots_before
    assert not any(isinstance(m, (AttentionWrapper, RWKVAttention)) for m in teacher.modules())
    assert [p.requires_grad for p in teacher.parameters()] == grads_before
    state_after = teacher.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[name], value) for name, value in state_before.items())


def test_input_on_another_device_is_refused(make_teacher):
    model = HybridModel(make_teacher("llama"))
    ids = torch.zeros(BATCH, LENGTH, dtype=torch.long, device="meta")
    for call in (model.alignment_losses, model.hidden_states, model.forward):
        with pytest.raises(ValueError, match="input_ids are on meta but the model is on cpu"):
            call(ids)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\)"):
        model.alignment_losses(random_ids(BATCH, LENGTH), torch.ones(BATCH, 5, dtype=torch.long))
