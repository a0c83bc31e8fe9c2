"""Stage 1: the teacher's attentions attached beside the student's mixers, the alignment losses (all
layers' mixers in a few stacked calls, eager and compiled, against the per-layer reference), the output-scale
calibration, the per-layer swap scores, detaching them again for stages 2-3, and which parameters a
stage trains and at which learning rate."""

import pytest
import torch
from torch._dynamo.utils import counters

from rwkvinside.errors import UserError
from rwkvinside.config import TRAINABLE
from rwkvinside.data import IGNORE_INDEX
from rwkvinside.modeling.alignment import (AligningAttention, alignment_loss, alignment_losses,
                                           attach_teacher_attention, calibrate_output_scale,
                                           detach_teacher_attention, is_aligning, learning_rate_scales,
                                           select_trainable, swap_scores)
from rwkvinside.modeling.attention import RWKVAttention
from rwkvinside.modeling.convert import ConversionSpec, convert
from rwkvinside.modeling.teachers import FAMILIES, attention_of, decoder_layers

from .helpers import (BATCH, LENGTH, VOCAB_SIZE, aligning_student, attention_slots, random_ids,
                      right_padding_mask)

# all layers' state updates in one call (the default), or each mixer inside its slot (the reference,
# and what runs where DeepSpeed ZeRO-3 partitions the mixers)
BATCHED = pytest.mark.parametrize("batched", [True, False], ids=["batched", "per_layer"])


def mixer_parameters(student) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in student.named_parameters() if ".mixer." in name}


def no_gradient(p: torch.nn.Parameter) -> bool:
    """No gradient reached p (the batched path's one state update hands every layer a zero one)."""
    return p.grad is None or not p.grad.any()


# --- the loss of one layer ----------------------------------------------------------------------------

def test_alignment_loss_is_the_mean_squared_error_over_real_tokens():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 8, generator=generator)
    teacher = 3 * torch.randn(2, 5, 8, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    squared = (student - teacher).pow(2).mean(-1)
    power = teacher.pow(2).mean(-1)

    mse = alignment_loss(student, teacher, mask)  # the default: the plain squared error
    torch.testing.assert_close(mse, squared[mask.bool()].mean())
    torch.testing.assert_close(alignment_loss(student, teacher, None), squared.mean())
    # relative: each token's error over the teacher's mean square on that token
    torch.testing.assert_close(alignment_loss(student, teacher, mask, relative=True),
                               (squared / power)[mask.bool()].mean())
    torch.testing.assert_close(alignment_loss(student, teacher, None, relative=True), (squared / power).mean())
    changed = student.clone()
    changed[0, 3:] += 100.0  # under the padding
    torch.testing.assert_close(alignment_loss(changed, teacher, mask), alignment_loss(student, teacher, mask))


def test_relative_alignment_loss_weighs_every_layer_alike():
    """A layer whose outputs are ten times larger, and ten times further off, counts the same."""
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 5, 8, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(alignment_loss(10 * student, 10 * teacher, mask, relative=True),
                               alignment_loss(student, teacher, mask, relative=True))
    assert alignment_loss(10 * student, 10 * teacher, mask, relative=False) > 50 * alignment_loss(
        student, teacher, mask, relative=False)

    student.requires_grad_(True)  # the teacher's scale is a constant: no gradient flows into it
    teacher.requires_grad_(True)
    alignment_loss(student, teacher, mask, relative=True).backward()
    relative_gradient = teacher.grad.clone()
    teacher.grad = None
    alignment_loss(student, teacher, mask, relative=False).backward()
    scale = teacher.detach().pow(2).mean(-1, keepdim=True)  # per token
    torch.testing.assert_close(relative_gradient, teacher.grad / scale)


def test_relative_alignment_loss_does_not_depend_on_how_tokens_are_split():
    """Gradient accumulation and data parallelism average per-token losses weighted by token counts:
    the relative loss of a batch equals that of its halves, weighted so."""
    generator = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(4, 6, 8, generator=generator), torch.randn(4, 6, 8, generator=generator)
    teacher[2:] *= 10  # the second half's outputs are far larger
    mask = torch.ones(4, 6)
    mask[0, 4:] = 0
    whole = alignment_loss(student, teacher, mask, relative=True)
    halves = [alignment_loss(student[rows], teacher[rows], mask[rows], relative=True) * mask[rows].sum()
              for rows in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(whole, sum(halves) / mask.sum())


# --- attaching the teacher's attentions ----------------------------------------------------------------

def test_attach_puts_the_teacher_attention_beside_each_mixer(make_teacher, family):
    teacher = make_teacher(family)
    originals = attention_slots(teacher, family)
    student = convert(teacher, ConversionSpec(layers=(1, 3)))
    plain = attention_slots(student, family)
    assert not is_aligning(student)

    attach_teacher_attention(student, teacher)

    assert is_aligning(student)
    slots = attention_slots(student, family)
    for i in (0, 2):
        assert slots[i] is plain[i]  # the kept attentions are not touched
    for i in (1, 3):
        assert isinstance(slots[i], AligningAttention) and isinstance(slots[i], RWKVAttention)
        assert slots[i].teacher is originals[i]  # the teacher's own module of the same layer
        assert slots[i].mixer is plain[i].mixer and slots[i].layer_idx == i
        assert not any(p.requires_grad for p in slots[i].teacher.parameters())  # frozen
    assert student.converted_attention() == {1: slots[1], 3: slots[3]}
    assert [slots[i].produces_v_first for i in (1, 3)] == [True, False]
    assert attention_slots(teacher, family) == originals  # still in the teacher's own layers


def test_mixer_parameter_names_are_the_same_while_aligning_and_after_detaching(make_teacher, family):
    """Optimizer state and checkpoints name the mixers' parameters: the mode must not change them."""
    teacher = make_teacher(family)
    student = convert(teacher, ConversionSpec(layers=(0, 2)))
    before = mixer_parameters(student)
    attach_teacher_attention(student, teacher)
    aligning = mixer_parameters(student)
    detach_teacher_attention(student)
    after = mixer_parameters(student)

    assert "model.layers.0.self_attn.mixer.w0" in before and "model.layers.2.self_attn.mixer.x_r" in before
    assert list(before) == list(aligning) == list(after)
    assert all(before[name] is aligning[name] is after[name] for name in before)  # the very same tensors


# --- stage 1: alignment --------------------------------------------------------------------------------

@BATCHED
def test_alignment_losses_without_logits_and_teacher_flows_on(make_teacher, family, batched):
    teacher = make_teacher(family)
    student = aligning_student(teacher, ConversionSpec(layers=(1, 3)))
    select_trainable(student, "mixers")
    ids, mask = random_ids(BATCH, LENGTH), right_padding_mask()

    def no_logits(*_):
        raise AssertionError("alignment must not run the LM head")

    final = {}
    student.lm_head.register_forward_pre_hook(no_logits)
    student.model.norm.register_forward_hook(lambda _m, _i, out: final.setdefault("hidden", out))
    losses = alignment_losses(student, ids, mask, batched=batched)

    assert sorted(losses) == [1, 3]
    for loss in losses.values():
        assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0 and loss.requires_grad
    with torch.no_grad():  # every layer sees the teacher's own activations
        expected = teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(final["hidden"], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("relative", [True, False], ids=["relative", "mse"])
def test_padding_is_excluded_from_the_alignment_loss(make_teacher, family, relative):
    student = aligning_student(make_teacher(family))
    ids, mask = random_ids(BATCH, LENGTH), right_padding_mask()
    other_ids = torch.where(mask.bool(), ids, (ids + 7) % VOCAB_SIZE)  # different tokens under the padding
    assert not torch.equal(ids, other_ids)

    outputs = {}

    def keep(key):
        return lambda _module, _inputs, output: outputs.__setitem__(key, output[0])

    for i, slot in student.converted_attention().items():
        slot.teacher.register_forward_hook(keep(("teacher", i)))
        slot.mixer.register_forward_hook(keep(("student", i)))  # runs in the per-layer path
    with torch.no_grad():
        losses = alignment_losses(student, ids, mask, batched=False, relative=relative)
        assert sorted(losses) == [0, 1, 2, 3]
        for i, loss in losses.items():  # mean over channels, then over the real tokens only
            squared = (outputs["student", i] - outputs["teacher", i]).pow(2).mean(-1)[mask.bool()]
            power = outputs["teacher", i].pow(2).mean(-1)[mask.bool()]
            expected = (squared / power).mean() if relative else squared.mean()
            torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        for batched in (True, False):
            ours = alignment_losses(student, ids, mask, batched=batched, relative=relative)
            other = alignment_losses(student, other_ids, mask, batched=batched, relative=relative)
            unmasked = alignment_losses(student, ids, batched=batched, relative=relative)
            unmasked_other = alignment_losses(student, other_ids, batched=batched, relative=relative)
            for i in losses:
                torch.testing.assert_close(ours[i], losses[i], rtol=1e-5, atol=0)
                torch.testing.assert_close(other[i], losses[i], rtol=1e-5, atol=0)
                assert not torch.allclose(unmasked_other[i], unmasked[i], rtol=1e-4)  # the change is visible


@pytest.mark.parametrize("layers", [(0, 1, 3), (2,)], ids=["three_layers", "one_layer"])
@pytest.mark.parametrize("relative", [True, False], ids=["relative", "mse"])
def test_batched_alignment_equals_the_per_layer_reference(make_teacher, family, relative, layers):
    """Same losses and same gradients for every mixer parameter, padding included; with one converted
    layer nothing is stacked."""
    student = aligning_student(make_teacher(family), ConversionSpec(layers=layers))
    trainable = select_trainable(student, "mixers")
    ids, mask = random_ids(BATCH, LENGTH, seed=2), right_padding_mask()

    def one_step(batched: bool) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]]:
        student.zero_grad(set_to_none=True)
        losses = alignment_losses(student, ids, mask, batched=batched, relative=relative)
        sum(losses.values()).backward()
        gradients = {name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                     for name, p in trainable.items()}
        return {i: loss.detach() for i, loss in losses.items()}, gradients

    reference_losses, reference = one_step(batched=False)
    losses, gradients = one_step(batched=True)
    assert sorted(losses) == list(layers)
    for i in losses:
        torch.testing.assert_close(losses[i], reference_losses[i], rtol=1e-5, atol=1e-7)
    assert sum(bool(g.any()) for g in reference.values()) > len(reference) // 2
    for name in reference:  # float32 rounding: the stacked matmuls sum in another order
        scale = float(reference[name].abs().max())
        torch.testing.assert_close(gradients[name], reference[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_compiled_batched_alignment_compiles_each_part_once_for_all_layers(make_teacher):
    """With the layers compiled (train.compile), the batched way compiles each part once whatever the
    number of layers (the first layer's steps 1-7 and 9-11, the same stacked for all later layers,
    the norms and MLPs of the teacher's pass) and gives the eager per-layer reference's losses and
    gradients."""
    student = aligning_student(make_teacher("qwen3"), ConversionSpec(layers=(0, 1, 2, 3)))
    trainable = select_trainable(student, "mixers")
    ids, mask = random_ids(BATCH, LENGTH, seed=3), right_padding_mask()

    def one_step(batched: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        student.zero_grad(set_to_none=True)
        losses = alignment_losses(student, ids, mask, batched=batched)
        sum(losses.values()).backward()
        return list(losses.values()), [p.grad.clone() for p in trainable.values()]

    reference_losses, reference = one_step(batched=False)
    torch._dynamo.reset()
    counters.clear()
    student.compile_layers(fullgraph=True)
    for _ in range(2):
        losses, gradients = one_step(batched=True)
    # the first layer's mix and readout, the later layers' stacked, a norm and an MLP (the teacher pass)
    assert counters["stats"]["unique_graphs"] == 6
    torch.testing.assert_close(losses, reference_losses, rtol=1e-5, atol=1e-7)
    for gradient, expected in zip(gradients, reference, strict=True):
        torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_by_default_the_cpu_runs_each_mixer_in_its_slot(make_teacher):
    """On the CPU the per-layer way is the faster one; it is also where the mixers run inside their
    slots, as DeepSpeed ZeRO-3 needs (it gathers a module's weights around its own forward)."""
    student = aligning_student(make_teacher("llama"), ConversionSpec(layers=(1, 2)))
    calls = []
    for slot in student.converted_attention().values():
        slot.mixer.register_forward_hook(lambda *_: calls.append(1))
    ids = random_ids(BATCH, LENGTH)
    with torch.no_grad():
        default = alignment_losses(student, ids)
        assert len(calls) == 2
        calls.clear()
        batched = alignment_losses(student, ids, batched=True)
        assert calls == []
    for i in batched:
        torch.testing.assert_close(default[i], batched[i], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_alignment_is_batched_unless_the_mixers_are_partitioned(make_teacher, fla_untuned):
    student = aligning_student(make_teacher("llama").cuda(), ConversionSpec(layers=(1, 2)))
    calls = []
    for slot in student.converted_attention().values():
        slot.mixer.register_forward_hook(lambda *_: calls.append(1))
    ids = random_ids(BATCH, LENGTH).cuda()
    with torch.no_grad():
        alignment_losses(student, ids)
        assert calls == []
        for i, p in enumerate(student.converted_attention()[2].mixer.parameters()):
            p.ds_id = i  # as deepspeed.zero.Init marks them
        alignment_losses(student, ids)
    assert len(calls) == 2


@BATCHED
def test_a_later_layer_loss_reaches_the_v_first_producer(make_teacher, family, batched):
    student = aligning_student(make_teacher(family), ConversionSpec(layers=(1, 2, 3)))
    select_trainable(student, "mixers")
    alignment_losses(student, random_ids(BATCH, LENGTH), right_padding_mask(), batched=batched)[3].backward()
    slots = student.converted_attention()
    assert slots[1].mixer.value.weight.grad.abs().max() > 0  # through v_first only
    assert no_gradient(slots[1].mixer.receptance.weight)  # layer 1's own output is not in loss 3
    assert all(no_gradient(p) for p in slots[2].mixer.parameters())  # stage 1: the teacher's output flows on
    assert slots[3].mixer.output.weight.grad.abs().max() > 0
    assert all(p.grad is None for slot in slots.values() for p in slot.teacher.parameters())


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
@BATCHED
def test_a_training_step_leaves_no_activations_in_the_slots(make_teacher, batched, checkpointed):
    """alignment_losses releases each layer's recorded input and outputs once it has the losses; a
    checkpointed layer recomputed in backward must not record them again (each slot would hold a
    recomputed layer's graph until the next step, undoing part of what checkpointing saves)."""
    student = aligning_student(make_teacher("qwen2"), ConversionSpec(layers=(1, 2, 3)))
    select_trainable(student, "mixers")
    student.train()
    if checkpointed:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    losses = alignment_losses(student, random_ids(BATCH, LENGTH), right_padding_mask(), batched=batched)
    sum(losses.values()).backward()
    assert student.converted_attention()[3].mixer.output.weight.grad.abs().max() > 0
    for i, slot in student.converted_attention().items():
        assert slot.recorded is None and slot.student_output is None, f"layer {i} keeps its activations"


# --- calibrating the output scale ----------------------------------------------------------------------

def root_mean_squares(student, ids, mask) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per converted layer, the RMS over real tokens of the mixer's and of the teacher's output."""
    outputs, handles = {}, []
    for i, slot in student.converted_attention().items():
        for side, module in (("student", slot.mixer), ("teacher", slot.teacher)):
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, key=(side, i): outputs.__setitem__(key, out[0])))
    with torch.no_grad():
        alignment_losses(student, ids, mask, batched=False)
    for handle in handles:
        handle.remove()
    real = mask.bool()
    rms = {key: output.pow(2).mean(-1)[real].mean().sqrt() for key, output in outputs.items()}
    layers = student.rwkv_layers
    return {i: rms["student", i] for i in layers}, {i: rms["teacher", i] for i in layers}


def test_calibration_gives_each_mixer_the_teacher_output_scale(make_teacher, family):
    student = aligning_student(make_teacher(family), ConversionSpec(layers=(0, 2, 3)))
    ids, mask = random_ids(BATCH, LENGTH, seed=7), right_padding_mask()
    before = {name: p.clone() for name, p in mixer_parameters(student).items()}
    students, teachers = root_mean_squares(student, ids, mask)

    factors = calibrate_output_scale(student, ids, mask)

    assert sorted(factors) == [0, 2, 3]
    for i, factor in factors.items():
        assert factor == pytest.approx(float(teachers[i] / students[i]), rel=1e-5)
        assert not factor == pytest.approx(1.0, rel=1e-2)  # a fresh mixer's output is off the teacher's scale
    calibrated, teachers_after = root_mean_squares(student, ids, mask)
    for i in factors:
        torch.testing.assert_close(calibrated[i], teachers[i], rtol=1e-4, atol=0)  # exact: linear in g2
        torch.testing.assert_close(teachers_after[i], teachers[i], rtol=0, atol=0)
    changed = {name for name, p in mixer_parameters(student).items() if not torch.equal(p, before[name])}
    assert changed == {f"model.layers.{i}.self_attn.mixer.g2" for i in (0, 2, 3)}
    again = calibrate_output_scale(student, ids, mask)
    assert all(factor == pytest.approx(1.0, rel=1e-4) for factor in again.values())


# --- swap scores: what each layer costs on its own ------------------------------------------------------

def shifted_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
    return labels


@torch.no_grad()
def kl_with_one_student_layer(teacher, student, family: str, layer: int, batch: dict) -> tuple[float, int]:
    """(sum over target tokens of KL(teacher || model), target tokens) where the model is the teacher
    with layer `layer`'s attention output replaced by its mixer's, v_first from the first mixer."""
    entry, slots, first = FAMILIES[family], student.converted_attention(), student.rwkv_layers[0]
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    found = {}

    def replace(i: int):
        def hook(_module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            out, v_first, _ = slots[i].mixer(hidden, found.get("v_first"), None, mask)
            if i == first:
                found["v_first"] = v_first
            return (out, *output[1:]) if i == layer else output
        return hook

    teacher_logp = teacher(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    attentions = [attention_of(decoder_layer, entry) for decoder_layer in decoder_layers(teacher, entry)]
    handles = [attentions[i].register_forward_hook(replace(i), with_kwargs=True)
               for i in sorted({first, layer})]
    model_logp = teacher(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    for handle in handles:
        handle.remove()
    kl = (teacher_logp.exp() * (teacher_logp - model_logp)).sum(-1)
    targets = labels != IGNORE_INDEX
    return float(kl[targets].sum()), int(targets.sum())


def test_swap_scores_are_the_kl_of_the_teacher_with_one_student_layer(make_teacher, family):
    teacher = make_teacher(family)
    student = aligning_student(teacher, ConversionSpec(layers=(1, 2, 3)))
    mask = right_padding_mask()
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": shifted_labels(ids, mask)}
               for ids in (random_ids(BATCH, LENGTH, seed=8), random_ids(BATCH, LENGTH, seed=9))]
    losses_before = alignment_losses(student, batches[0]["input_ids"], mask)

    scores = swap_scores(student, teacher, batches, [2, 3, 1], chunk=5)

    assert sorted(scores) == [1, 2, 3]
    for layer, found in scores.items():
        sums = [kl_with_one_student_layer(teacher, student, family, layer, batch) for batch in batches]
        expected = sum(kl for kl, _ in sums) / sum(tokens for _, tokens in sums)
        assert found == pytest.approx(expected, rel=1e-4) and found > 0
    assert len(set(scores.values())) == 3
    # the student is aligning as before: every layer passes the teacher's output on again
    losses_after = alignment_losses(student, batches[0]["input_ids"], mask)
    for i in losses_before:
        torch.testing.assert_close(losses_after[i], losses_before[i], rtol=1e-6, atol=0)
    with torch.no_grad():
        hidden = student.hidden_states(batches[0]["input_ids"], mask)
        expected_hidden = teacher.model(input_ids=batches[0]["input_ids"],
                                        attention_mask=mask).last_hidden_state
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-6, atol=1e-6)


# --- stages 2-3: detaching ---------------------------------------------------------------------------

def test_detach_teacher_attention(make_teacher, family):
    teacher = make_teacher(family)
    originals = attention_slots(teacher, family)
    ids, mask = random_ids(BATCH, LENGTH), right_padding_mask()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
    student = aligning_student(teacher, ConversionSpec(layers=(0, 2, 3)))
    mixers = {i: slot.mixer for i, slot in student.converted_attention().items()}
    count_before = sum(p.numel() for p in student.parameters())
    attached = sum(p.numel() for i in (0, 2, 3) for p in originals[i].parameters())

    detach_teacher_attention(student)

    assert not is_aligning(student)
    assert not any(isinstance(m, AligningAttention) for m in student.modules())
    present = {id(m) for m in student.modules()}
    assert not any(id(attention) in present for attention in originals)
    assert sum(p.numel() for p in student.parameters()) == count_before - attached
    slots = attention_slots(student, family)
    assert all(type(slots[i]) is RWKVAttention and slots[i].mixer is mixers[i] for i in (0, 2, 3))
    assert attention_slots(teacher, family) == originals  # released by the student, kept by the teacher

    with torch.no_grad():
        logits = student(ids, mask, use_cache=False).logits
        teacher_after = teacher(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (BATCH, LENGTH, VOCAB_SIZE) and torch.isfinite(logits).all()
    assert (logits - teacher_logits).abs().max() > 1e-3  # the mixers' outputs flow on now
    torch.testing.assert_close(teacher_after, teacher_logits, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no teacher attention is attached"):
        alignment_losses(student, ids, mask)


def test_alignment_needs_the_teacher_attention_attached(make_teacher):
    student = convert(make_teacher("llama"))
    with pytest.raises(RuntimeError, match="attach_teacher_attention first"):
        alignment_losses(student, random_ids(BATCH, LENGTH))


# --- what a stage trains ---------------------------------------------------------------------------

def test_stage_1_trains_only_the_mixers(make_teacher, family):
    teacher = make_teacher(family)
    student = aligning_student(teacher, ConversionSpec(layers=(0, 2)))
    teacher_attentions = {id(p) for slot in student.converted_attention().values()
                          for p in slot.teacher.parameters()}

    trainable = select_trainable(student, "mixers")

    mixers = {id(p) for slot in student.converted_attention().values() for p in slot.mixer.parameters()}
    assert {id(p) for p in trainable.values()} == mixers and len(mixers) > 0
    assert all(name.startswith(("model.layers.0.self_attn.mixer.", "model.layers.2.self_attn.mixer."))
               for name in trainable)
    assert {id(p) for p in student.parameters() if p.requires_grad} == mixers
    assert teacher_attentions and not any(p.requires_grad for p in student.parameters()
                                          if id(p) in teacher_attentions)


@pytest.mark.parametrize("which", ["all_but_mlp", "all"])
def test_stage_1_refuses_to_train_more_than_the_mixers(make_teacher, which):
    student = aligning_student(make_teacher("qwen2"), ConversionSpec(layers=(1, 2)))
    select_trainable(student, "mixers")
    before = [p.requires_grad for p in student.parameters()]
    with pytest.raises(UserError, match="stage 1 trains only the time mixers"):
        select_trainable(student, which)
    assert [p.requires_grad for p in student.parameters()] == before  # nothing changed
    assert not any(p.requires_grad for slot in student.converted_attention().values()
                   for p in slot.teacher.parameters())  # the teacher attentions are never trainable


def test_later_stages_may_train_all_but_the_mlps_or_everything(make_teacher, family):
    student = aligning_student(make_teacher(family), ConversionSpec(layers=(1, 2)))
    select_trainable(student, "mixers")
    detach_teacher_attention(student)
    names = [name for name, _ in student.named_parameters()]
    mlp = {name for name in names if ".mlp." in name}
    assert mlp and "model.embed_tokens.weight" in names and "model.layers.0.self_attn.q_proj.weight" in names

    everything = select_trainable(student, "all")
    assert list(everything) == names
    assert all(p.requires_grad for p in student.parameters())

    all_but_mlp = select_trainable(student, "all_but_mlp")
    assert set(all_but_mlp) == set(names) - mlp
    assert {name for name, p in student.named_parameters() if p.requires_grad} == set(names) - mlp
    assert "model.norm.weight" in all_but_mlp and "model.layers.1.self_attn.mixer.w0" in all_but_mlp

    mixers = select_trainable(student, "mixers")
    assert set(mixers) == {name for name in names if ".self_attn.mixer." in name}
    assert {name for name, p in student.named_parameters() if p.requires_grad} == set(mixers)


def test_unknown_trainable_set_is_refused(make_teacher):
    student = convert(make_teacher("llama"))
    expected = rf"unknown trainable set 'mlps'; choose one of {', '.join(TRAINABLE)}"
    with pytest.raises(ValueError, match=expected):
        select_trainable(student, "mlps")


def test_learning_rates_scale_what_the_student_took_over_from_the_teacher(make_teacher):
    student = convert(make_teacher("qwen3"), ConversionSpec(layers=(1, 3)))
    trainable = select_trainable(student, "all")
    scales = learning_rate_scales(student, trainable, 0.1)
    assert list(scales) == list(trainable)
    mixers = {name for name in trainable if ".self_attn.mixer." in name}
    assert mixers and all(scales[name] == 1.0 for name in mixers)
    assert all(scales[name] == 0.1 for name in set(trainable) - mixers)
    assert scales["model.embed_tokens.weight"] == scales["model.layers.0.self_attn.q_proj.weight"] == 0.1
    only_mixers = select_trainable(student, "mixers")
    assert set(learning_rate_scales(student, only_mixers, 0.1).values()) == {1.0}
