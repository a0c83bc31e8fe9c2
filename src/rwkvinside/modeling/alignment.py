"""Stage 1's thin layer over the student: each converted layer's teacher attention beside its mixer.

`attach_teacher_attention(student, teacher)` puts an `AligningAttention` in each converted slot: the
frozen teacher attention and the student's mixer read the same input, the teacher's output flows
on (so every layer aligns in one pass), and each layer's student output is compared with the
teacher's. The mixer stays the same module under the same parameter name
("model.layers.3.self_attn.mixer.w0"), so optimizer state and checkpoints do not depend on the
mode. `detach_teacher_attention` puts the plain `RWKVAttention` back for stages 2-3 and saving.

Because the teacher's outputs flow on, every layer's input is known once the teacher's forward pass
is done. `alignment_losses` uses that: the pass only records each converted layer's input and
teacher output; then the first converted layer's mixer prepares its state-update inputs
(`RWKV7TimeMixer.mix`) and v_first, all later layers' mixers (the same shape) prepare theirs in ONE
stacked call (`mix_stacked`: their parameters stacked, each step one batched kernel), all layers'
heads go through one state update (heads are independent, so stacking them changes nothing but the
size of the kernel launch), and the outputs are read back and scored the same way.
The per-layer way (each mixer inside its slot, during the pass) is the reference it is tested
against, and what runs on the CPU (where it is faster) and where DeepSpeed ZeRO-3 partitions the
mixers' weights (it gathers a module's weights only around that module's own forward call).

Also here: which parameters a stage trains (`select_trainable`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from rwkvinside.config import TRAINABLE
from rwkvinside.errors import UserError
from rwkvinside.modeling.attention import ForwardContext, RWKVAttention
from rwkvinside.modeling.student import RWKVInsideForCausalLM
from rwkvinside.modeling.teachers import attention_of, decoder_layers, set_attention
from rwkvinside.modeling.time_mixer import MAX_LOG_DECAY, RWKV7TimeMixer, stack_parameters
from rwkvinside.ops import wkv7
from rwkvinside.scoring import final_hidden_states, score


# Below this mean square a teacher output counts as zero in the relative loss (no division by ~0).
RELATIVE_FLOOR = 1e-8


def alignment_loss(student: Tensor, teacher: Tensor, token_mask: Tensor | None, relative: bool = False) -> Tensor:
    """The mean over real tokens of the squared error between the two attention outputs:
    [B, T, C] -> [], or for several layers at once [L, B, T, C] -> [L].

    relative: each token's squared error over the squared norm of the teacher's output there (a
    constant for the gradient), so that layers and tokens with large outputs do not outweigh the
    others. Per token, it does not depend on how a step's tokens are split into micro-batches.
    """
    squared = (student.float() - teacher.float()).pow(2).mean(dim=-1)  # [B, T]
    if relative:
        squared = squared / teacher.detach().float().pow(2).mean(dim=-1).clamp(min=RELATIVE_FLOOR)
    if token_mask is None:
        return squared.mean(dim=(-2, -1))
    mask = token_mask.to(squared.dtype)
    return (squared * mask).sum(dim=(-2, -1)) / mask.sum().clamp(min=1)


class AligningAttention(RWKVAttention):
    """Stage 1: the frozen teacher attention and the student's mixer side by side on the same input.

    While `recording` (set by this module's functions around their own forward pass, and only then:
    activation checkpointing re-runs the pass during backward, and that must keep nothing), a forward
    pass keeps the layer's input and the teacher's output in `recorded` and, unless the mixer is
    `deferred` (for `alignment_losses` to run all mixers together afterwards), the mixer's output in
    `student_output`. With `passes_student` the student's output flows on instead of the teacher's
    (`swap_scores`).
    """

    def __init__(self, mixer: RWKV7TimeMixer, layer_idx: int, context: ForwardContext, teacher: nn.Module):
        super().__init__(mixer, layer_idx, context)
        self.teacher = teacher.requires_grad_(False)
        self.recording = False
        self.deferred = False
        self.passes_student = False
        self.recorded: tuple[Tensor, Tensor] | None = None  # (input, teacher output) of the last pass
        self.student_output: Tensor | None = None

    def train(self, mode: bool = True) -> AligningAttention:
        """The student trains; the frozen teacher attention stays in eval mode (its dropout, if any, off)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        with torch.no_grad():
            teacher_output, weights = self.teacher(hidden_states, *args, **kwargs)
        student_output = None if self.deferred else super().forward(hidden_states, *args, **kwargs)[0]
        if self.recording:
            self.recorded, self.student_output = (hidden_states, teacher_output), student_output
        return (student_output if self.passes_student else teacher_output), weights


@contextmanager
def recording(slots: dict[int, AligningAttention]) -> Iterator[None]:
    """The slots keep what the forward passes inside the block see; forgotten on leaving it."""
    for slot in slots.values():
        slot.recording = True
    try:
        yield
    finally:
        for slot in slots.values():
            slot.recording = False
            slot.recorded = slot.student_output = None


def attach_teacher_attention(student: RWKVInsideForCausalLM, teacher: nn.Module) -> None:
    """Stage 1: each converted slot holds its mixer and the teacher's attention of the same layer
    (the teacher's own module, frozen)."""
    teacher_layers = decoder_layers(teacher, student.family)
    for layer_idx, slot in student.converted_attention().items():
        teacher_attention = attention_of(teacher_layers[layer_idx], student.family)
        aligning = AligningAttention(slot.mixer, layer_idx, student.context, teacher_attention)
        set_attention(decoder_layers(student, student.family)[layer_idx], student.family, aligning)


def detach_teacher_attention(student: RWKVInsideForCausalLM) -> None:
    """Stages 2-3: the mixers' outputs flow on; the teacher attentions are released."""
    for layer_idx, slot in student.converted_attention().items():
        plain = RWKVAttention(slot.mixer, layer_idx, student.context)
        set_attention(decoder_layers(student, student.family)[layer_idx], student.family, plain)


def is_aligning(student: RWKVInsideForCausalLM) -> bool:
    return any(isinstance(slot, AligningAttention) for slot in student.converted_attention().values())


def alignment_losses(student: RWKVInsideForCausalLM, input_ids: Tensor, attention_mask: Tensor | None = None,
                     batched: bool | None = None, relative: bool = False) -> dict[int, Tensor]:
    """Stage 1: run the decoder body (no LM head, no logits); one `alignment_loss` per converted layer.

    batched: all layers' mixers in a few stacked calls (the module docstring); None: on a GPU, where the
    mixers' weights are whole (not partitioned by DeepSpeed ZeRO-3). On a GPU one call over every
    layer fills the chip (an H200's state update: 1.25 ms a layer against 2.65, BENCHMARKS.md) and
    spares the host thousands of launches; on the CPU the chunked form over so many sequences at once
    is memory-bound and the per-layer way is twice as fast.
    """
    if not is_aligning(student):
        raise RuntimeError("no teacher attention is attached; alignment needs attach_teacher_attention first")
    slots = student.converted_attention()
    if batched is None:
        weights = [p for slot in slots.values() for p in slot.mixer.parameters()]
        batched = weights[0].is_cuda and not any(hasattr(p, "ds_id") for p in weights)
    for slot in slots.values():
        slot.deferred = batched
    with recording(slots):
        if not batched:
            student.hidden_states(input_ids, attention_mask)
            return {i: alignment_loss(slot.student_output, slot.recorded[1], student.context.token_mask, relative)
                    for i, slot in slots.items()}
        with torch.no_grad(), record_function("teacher forward"):
            student.hidden_states(input_ids, attention_mask)
        token_mask = student.context.token_mask
        (first, first_slot), *rest = slots.items()
        first_mixed = first_slot.mixer.mix(first_slot.recorded[0], None, None, token_mask)
        wkv_inputs = first_mixed.wkv_inputs
        if rest:  # every later layer's mixer has the same shape: one stacked call for all of them
            template = rest[0][1].mixer
            parameters = stack_parameters([slot.mixer for _, slot in rest])
            rest_mixed = template.mix_stacked(parameters, torch.stack([slot.recorded[0] for _, slot in rest]),
                                              first_mixed.v_first, token_mask)  # [L, B, T, ...]
            # [B, T, (1 + L) * H, N]: the first layer's heads, then the others' (the kernel choices
            # shipped in ops/wkv7/tuned are for this shape)
            wkv_inputs = [torch.cat([one[:, :, None], many.permute(1, 2, 0, 3, 4)], dim=2).flatten(2, 3)
                          for one, many in zip(wkv_inputs, rest_mixed.wkv_inputs)]
        y, _ = wkv7(*wkv_inputs, scale=1.0, decay_floor=-MAX_LOG_DECAY)
        y = y.unflatten(2, (len(slots), -1))  # [B, T, 1 + L, H, N]
        losses = {first: alignment_loss(first_slot.mixer.readout(y[:, :, 0], first_mixed),
                                        first_slot.recorded[1], token_mask, relative)}
        if rest:
            outputs = template.readout_stacked(parameters, y[:, :, 1:].permute(2, 0, 1, 3, 4), rest_mixed)
            teacher_outputs = torch.stack([slot.recorded[1] for _, slot in rest])
            losses |= zip((i for i, _ in rest), alignment_loss(outputs, teacher_outputs, token_mask, relative))
        return losses


def select_trainable(student: RWKVInsideForCausalLM, which: str) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze `which` (one of config.TRAINABLE): "mixers" (the time mixers),
    "all_but_mlp" (all but the decoder layers' feed-forward blocks) or "all". Stage 1 trains only
    the mixers. Teacher attentions attached for stage 1 are never trained. Returns the trainable
    parameters by name."""
    if which not in TRAINABLE:
        raise ValueError(f"unknown trainable set '{which}'; choose one of {', '.join(TRAINABLE)}")
    if is_aligning(student) and which != "mixers":
        raise UserError("stage 1 trains only the time mixers: set trainable to 'mixers'")
    family = student.family
    excluded = {id(p) for slot in student.converted_attention().values()
                for p in getattr(slot, "teacher", nn.Module()).parameters()}
    if which == "mixers":
        chosen = {id(p) for slot in student.converted_attention().values() for p in slot.mixer.parameters()}
    else:
        if which == "all_but_mlp":
            excluded |= {id(p) for layer in decoder_layers(student, family)
                         for p in getattr(layer, family.mlp).parameters()}
        chosen = {id(p) for p in student.parameters()} - excluded
    student.requires_grad_(False)
    trainable = {name: p for name, p in student.named_parameters() if id(p) in chosen}
    for p in trainable.values():
        p.requires_grad_(True)
    return trainable


def learning_rate_scales(student: RWKVInsideForCausalLM, trainable: dict[str, nn.Parameter],
                         teacher_scale: float) -> dict[str, float]:
    """Each trainable parameter's learning rate as a fraction of the stage's: 1 for the time mixers,
    `teacher_scale` for what the student took over from the teacher."""
    mixers = {id(p) for slot in student.converted_attention().values() for p in slot.mixer.parameters()}
    return {name: 1.0 if id(p) in mixers else teacher_scale for name, p in trainable.items()}


@torch.no_grad()
def calibrate_output_scale(student: RWKVInsideForCausalLM, input_ids: Tensor, attention_mask: Tensor | None = None,
                           reduce: Callable[[Tensor], Tensor] | None = None) -> dict[int, float]:
    """Scale each mixer's gate so that its output has the root mean square of the teacher's output on
    this batch (the output is linear in the gate's second matrix, so this is exact), and return the
    factors. A freshly converted mixer's GroupNorm hands the copied output projection unit-variance
    heads where the teacher's attention averages values: without this, stage 1 would spend its first
    hundreds of steps only shrinking the outputs.

    reduce: where several processes train one student, the sum over them of the squared sums each
    measures on its own batch, so that every copy starts the same, as one process would with their
    batches together.
    """
    slots = student.converted_attention()
    for slot in slots.values():
        slot.deferred = False
    with recording(slots):
        student.hidden_states(input_ids, attention_mask)
        token_mask = student.context.token_mask

        def square_sum(x: Tensor) -> Tensor:  # over real tokens: [B, T, C] -> []
            per_token = x.float().pow(2).mean(-1)
            return per_token.sum() if token_mask is None else (per_token * token_mask.float()).sum()

        sums = torch.stack([torch.stack([square_sum(slot.recorded[1]), square_sum(slot.student_output)])
                            for slot in slots.values()])  # [layers, 2]: teacher, student
    if reduce is not None:
        sums = reduce(sums)
    factors = (sums[:, 0] / sums[:, 1].clamp(min=1e-24)).sqrt()
    for slot, factor in zip(slots.values(), factors):
        slot.mixer.g2.mul_(factor.to(slot.mixer.g2.dtype))
    return dict(zip(slots, factors.tolist()))


@torch.no_grad()
def swap_scores(student: RWKVInsideForCausalLM, teacher: nn.Module, batches: list[dict[str, Tensor]],
                layers: list[int], chunk: int = 256) -> dict[int, float]:
    """For each of `layers`: the mean KL(teacher || model) per target token of the teacher with only that
    layer's attention replaced by its student, over `batches` (stage 1's student, teacher attached):
    how much that one layer costs, the criterion keep_attention uses by default."""
    slots = student.converted_attention()
    for slot in slots.values():
        slot.deferred = True  # the other layers run their teacher only ...
    slots[student.rwkv_layers[0]].deferred = False  # ... but v_first comes from the first mixer
    scores = {}
    for layer in layers:
        slots[layer].deferred, slots[layer].passes_student = False, True
        kl = tokens = 0.0
        for batch in batches:  # no recording: only the output matters here
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            result = score(student.hidden_states(ids, mask), student.lm_head, batch["labels"],
                           final_hidden_states(teacher, ids, mask), teacher.get_output_embeddings(), chunk=chunk)
            kl, tokens = kl + result.kl, tokens + result.tokens
        scores[layer] = float(kl / max(float(tokens), 1.0))
        slots[layer].deferred, slots[layer].passes_student = layer != student.rwkv_layers[0], False
    return scores
