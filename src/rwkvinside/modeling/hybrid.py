"""Converting a Hugging Face causal LM in place: chosen attentions become RWKV-7 time mixers.

Two ways a converted layer can sit in the teacher's attention slot:

- `AttentionWrapper` (stage 1, alignment): the frozen teacher attention and the student read the
  same input; the teacher's output flows on, so every layer aligns in one pass, and the wrapper
  records the student's alignment loss against the teacher's output.
- `RWKVAttention` (stages 2-3, export, generation): the student alone; its output flows on.

Values that one layer produces and later layers read within a forward pass (v_first, the padding
mask, stage 1's per-layer losses) travel in a `ForwardContext` owned by the model: one per model,
so one per process under data parallelism, with no global state. v_first is an ordinary tensor
in the autograd graph, so later layers' losses reach the producing layer's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from rwkvinside.errors import UserError
from rwkvinside.modeling.state import CACHE_KEYWORD, RecurrentCache
from rwkvinside.modeling.teachers import (
    AttentionGeometry,
    TeacherFamily,
    attention_of,
    copy_attention_into_mixer,
    decoder_layers,
    family_of,
    projection_biases,
    set_attention,
)
from rwkvinside.modeling.time_mixer import RWKV7TimeMixer, TimeMixerConfig, TimeMixerState

INITIALISATIONS = ("teacher", "rwkv")


@dataclass(frozen=True)
class ConversionSpec:
    """Which layers become RWKV-7, and how the students start.

    layers: indices of the decoder layers to convert; None converts all.
    head_size: the student's head size; None takes the teacher's head_dim. The student keeps the
        teacher's attention width, so the head count is width / head_size.
    init: "teacher" copies q/k/v/o into r/k/v/o (the rest by the RWKV-7 initialisation);
        "rwkv" uses the RWKV-7 initialisation throughout.
    """

    layers: tuple[int, ...] | None = None
    head_size: int | None = None
    init: str = "teacher"

    def resolve_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.layers is None:
            return tuple(range(num_layers))
        layers = tuple(sorted(set(self.layers)))
        if not layers:
            raise UserError("no layer chosen to convert; give at least one layer index (or none for all)")
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise UserError(
                f"layer index {bad[0]} is out of range: the teacher has {num_layers} layers "
                f"(valid indices 0..{num_layers - 1})"
            )
        return layers


@dataclass
class ForwardContext:
    """Values shared by the converted layers of one model during one forward pass.

    Kept after the pass (reset at the start of the next): activation checkpointing recomputes
    layers during backward, and the recomputation must read the same v_first and mask.
    """

    token_mask: Tensor | None = None  # [B, T], 1 for real tokens
    v_first: Tensor | None = None  # [B, T, C_att], set by the first converted layer
    v_first_trainable: bool = False  # whether v_first must carry a gradient back to its producer
    alignment_losses: dict[int, Tensor] = field(default_factory=dict)

    def reset(self, token_mask: Tensor | None) -> None:
        self.token_mask = token_mask
        self.v_first = None
        self.v_first_trainable = False
        self.alignment_losses = {}

    def follow(self, body: nn.Module) -> None:
        """Reset at the start of every forward pass of `body` (the decoder stack), whoever calls it:
        the hybrid model, transformers' `generate`, lm-eval."""
        body.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    def _on_forward(self, body: nn.Module, args: tuple, kwargs: dict) -> None:
        """The padding mask of the call's own tokens: with a cache, the 2D attention mask covers every
        token so far ([B, past + T]) and its last T columns are this call's."""
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.reset(mask[:, -tokens.shape[1]:] if mask is not None and mask.dim() == 2 else None)


def _cache_of(kwargs: dict):
    """The generation cache, named `cache` from transformers 5.24 on, `past_key_values` before."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


class RWKVAttention(nn.Module):
    """A student time mixer in the teacher's attention slot, called as HF calls attention."""

    def __init__(self, mixer: RWKV7TimeMixer, layer_idx: int, context: ForwardContext):
        super().__init__()
        self.mixer = mixer
        self.layer_idx = layer_idx
        # A plain attribute, not a submodule: shared by every converted layer of the model.
        self.__dict__["context"] = context

    @property
    def produces_v_first(self) -> bool:
        """The first converted layer: its mixer has no value residual, its value is v_first."""
        return not self.mixer.config.value_residual

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> tuple[Tensor, None]:
        context = self.context
        cache = _cache_of(kwargs)
        recurrent = isinstance(cache, RecurrentCache)  # generation: carry the state across calls
        state = None
        if recurrent:
            state = cache.rwkv_state(self.layer_idx) or TimeMixerState.zeros(
                hidden_states.shape[0], self.mixer.config, hidden_states.device, hidden_states.dtype)
        v_first = None if self.produces_v_first else context.v_first
        if not self.produces_v_first:
            self._check_v_first(v_first)
        output, v_first, new_state = self.mixer(hidden_states, v_first, state, context.token_mask)
        if self.produces_v_first:
            context.v_first = v_first
            context.v_first_trainable = any(p.requires_grad for p in self.mixer.parameters())
        if recurrent:
            cache.update_rwkv_state(self.layer_idx, new_state, hidden_states.shape[1])
        return output, None


    def _check_v_first(self, v_first: Tensor | None) -> None:
        if v_first is None:
            raise RuntimeError(f"layer {self.layer_idx} needs v_first, but no earlier converted layer ran")
        if torch.is_grad_enabled() and self.context.v_first_trainable and not v_first.requires_grad:
            # Reentrant activation checkpointing runs the first pass without gradients and
            # recomputes this layer alone: v_first then reaches it cut off from its producer.
            raise UserError("activation checkpointing with use_reentrant=True loses v_first's gradient; "
                            "enable it with gradient_checkpointing_kwargs={'use_reentrant': False}")


def alignment_loss(student: Tensor, teacher: Tensor, token_mask: Tensor | None) -> Tensor:
    """Mean squared error between the two attention outputs over real tokens only. [B, T, C] -> []"""
    squared = (student.float() - teacher.float()).pow(2).mean(dim=-1)  # [B, T]
    if token_mask is None:
        return squared.mean()
    mask = token_mask.to(squared.dtype)
    return (squared * mask).sum() / mask.sum().clamp(min=1)


class AttentionWrapper(nn.Module):
    """Stage 1: the frozen teacher attention and the student side by side on the same input."""

    def __init__(self, teacher: nn.Module, student: RWKVAttention):
        super().__init__()
        self.teacher = teacher
        self.student = student

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        with torch.no_grad():
            teacher_output, weights = self.teacher(hidden_states, *args, **kwargs)
        student_output, _ = self.student(hidden_states, *args, **kwargs)
        context = self.student.context
        context.alignment_losses[self.student.layer_idx] = alignment_loss(
            student_output, teacher_output, context.token_mask)
        return teacher_output, weights


def build_mixer(teacher_attention: nn.Module, family: TeacherFamily, geometry: AttentionGeometry,
                layer_idx: int, spec: ConversionSpec, value_residual: bool) -> RWKV7TimeMixer:
    head_size = geometry.head_dim if spec.head_size is None else spec.head_size
    config = TimeMixerConfig(
        hidden_size=geometry.hidden_size,
        num_heads=geometry.attention_size // head_size,
        head_size=head_size,
        layer_id=layer_idx,
        num_layers=geometry.num_layers,
        bias=projection_biases(teacher_attention, family),
        qk_norm_eps=geometry.rms_norm_eps if family.qk_norms else None,
        value_residual=value_residual,
    )
    reference = next(teacher_attention.parameters())
    mixer = RWKV7TimeMixer(config).to(device=reference.device, dtype=reference.dtype)
    if spec.init == "teacher":
        copy_attention_into_mixer(teacher_attention, mixer, family, geometry)
    return mixer


def validate_spec(spec: ConversionSpec, family: TeacherFamily, geometry: AttentionGeometry) -> tuple[int, ...]:
    """Check everything before touching the model, so a bad spec converts nothing."""
    if spec.init not in INITIALISATIONS:
        raise UserError(f"unknown initialisation '{spec.init}'; choose one of {', '.join(INITIALISATIONS)}")
    head_size = geometry.head_dim if spec.head_size is None else spec.head_size
    if head_size <= 0 or geometry.attention_size % head_size:
        raise UserError(
            f"head size {head_size} does not divide the attention width {geometry.attention_size}; "
            f"choose a divisor such as {geometry.head_dim}"
        )
    if family.qk_norms and head_size != geometry.head_dim:
        raise UserError(
            f"{family.name} normalises q and k per head of {geometry.head_dim}; "
            f"the student's head size must be {geometry.head_dim}, not {head_size}"
        )
    return spec.resolve_layers(geometry.num_layers)


def build_students(model: nn.Module, family: TeacherFamily, geometry: AttentionGeometry,
                   layers: tuple[int, ...], spec: ConversionSpec,
                   context: ForwardContext) -> dict[int, RWKVAttention]:
    """One student per converted layer, built from the teacher attention in its slot (nothing swapped)."""
    decoder = decoder_layers(model)
    return {i: RWKVAttention(build_mixer(attention_of(decoder[i], family), family, geometry, i, spec,
                                         value_residual=i != layers[0]), i, context)
            for i in layers}


def check_uniform(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The teacher must sit on one device in one floating dtype: students are built to match."""
    devices = {p.device for p in model.parameters()}
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(devices) > 1:
        raise UserError(f"the teacher is spread over devices {sorted(map(str, devices))}; "
                        "move it to one device (model.to(device)) before converting")
    if len(dtypes) > 1:
        raise UserError(f"the teacher mixes dtypes {sorted(map(str, dtypes))}; "
                        "cast it to one dtype (model.to(dtype)) before converting")
    return devices.pop(), dtypes.pop()


class HybridModel(nn.Module):
    """A Hugging Face causal LM whose chosen attentions are RWKV-7 time mixers.

    After `HybridModel(teacher, spec)` the converted layers are in alignment mode (stage 1):
    `alignment_losses(...)` trains the students against the teacher attentions they wrap.
    `drop_teacher_attention()` switches to stages 2-3: the students' outputs flow on and the
    teacher attentions are freed; `forward(...)` then gives the student's logits.
    """

    def __init__(self, model: nn.Module, spec: ConversionSpec = ConversionSpec(), align: bool = True):
        super().__init__()
        family = family_of(model)
        geometry = AttentionGeometry.of(model.config)
        layers = validate_spec(spec, family, geometry)
        check_uniform(model)

        self.model = model
        self.family = family
        self.spec = spec
        self.converted_layers = layers
        self.context = ForwardContext()

        decoder = decoder_layers(model)
        students = build_students(model, family, geometry, layers, spec, self.context)
        for i, student in students.items():  # swap only once every student is built
            module = AttentionWrapper(attention_of(decoder[i], family), student) if align else student
            set_attention(decoder[i], family, module)
        self.context.follow(model.base_model)
        self.select_trainable("mixers")

    @property
    def config(self):
        return self.model.config

    def _slot(self, i: int) -> nn.Module:
        return attention_of(decoder_layers(self.model)[i], self.family)

    def students(self) -> dict[int, RWKVAttention]:
        """The converted layers' students, by layer index."""
        slots = {i: self._slot(i) for i in self.converted_layers}
        return {i: s.student if isinstance(s, AttentionWrapper) else s for i, s in slots.items()}

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for s in self.students().values() for p in s.parameters()]

    def select_trainable(self, which: str) -> list[nn.Parameter]:
        """Freeze everything, then unfreeze `which`: "mixers" (the time mixers), "all_but_mlp"
        (all but the decoder layers' feed-forward blocks) or "all". Returns the trainable ones."""
        if which == "mixers":
            chosen = self.student_parameters()
        elif which == "all_but_mlp":
            mlp_params = {id(p) for layer in decoder_layers(self.model)
                          for p in getattr(layer, self.family.mlp).parameters()}
            chosen = [p for p in self.model.parameters() if id(p) not in mlp_params]
        elif which == "all":
            chosen = list(self.model.parameters())
        else:
            raise ValueError(f"unknown trainable set '{which}'")
        if self.aligning and which != "mixers":
            raise UserError("stage 1 trains only the time mixers: set trainable to 'mixers'")
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in chosen:
            p.requires_grad_(True)
        return chosen

    @property
    def aligning(self) -> bool:
        return any(isinstance(self._slot(i), AttentionWrapper) for i in self.converted_layers)

    def drop_teacher_attention(self) -> None:
        """Stages 2-3: the students take the teacher attentions' place; those are released."""
        family = self.family
        for i, student in self.students().items():
            set_attention(decoder_layers(self.model)[i], family, student)

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None, cached: bool = False) -> None:
        """cached: a generation cache is passed, so the mask may also cover the tokens it has read."""
        device = self.model.get_input_embeddings().weight.device
        if input_ids.device != device:
            raise ValueError(f"input_ids are on {input_ids.device} but the model is on {device}; "
                             "move the batch to the model's device")
        if attention_mask is None or attention_mask.shape == input_ids.shape:
            return
        (batch, length), (mask_batch, mask_length) = input_ids.shape, attention_mask.shape
        if not (cached and mask_batch == batch and mask_length > length):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                             f"{tuple(input_ids.shape)}; they must match")

    def alignment_losses(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict[int, Tensor]:
        """Stage 1: run the decoder body (no LM head, no logits); one loss per converted layer."""
        if not self.aligning:
            raise RuntimeError("the teacher attentions were dropped; alignment needs them")
        self._check_inputs(input_ids, attention_mask)
        self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return dict(self.context.alignment_losses)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The final hidden states [B, T, C] (after the last norm), before the LM head: losses
        apply the head a chunk of the sequence at a time so full-vocabulary logits never exist
        for the whole batch."""
        self._check_inputs(input_ids, attention_mask)
        output = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return output.last_hidden_state

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        """The hybrid causal LM's forward (HF arguments pass through, a `new_cache()` too; labels are not
        supported: losses live in rwkvinside.distill)."""
        self._check_inputs(input_ids, attention_mask, cached=_cache_of(kwargs) is not None)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def new_cache(self) -> RecurrentCache:
        """An empty generation cache: recurrent states for the converted layers, keys/values for the rest."""
        return RecurrentCache(self.model.config, self.converted_layers)

    def generate(self, *args, **kwargs) -> Tensor:
        """transformers' `generate` on the hybrid model, the converted layers' states carried in a
        `new_cache()` unless a cache is passed (as `cache`, or `past_key_values` before transformers 5.24)."""
        kwargs.setdefault("use_cache", True)  # a student's config may say False (training)
        if kwargs["use_cache"] and _cache_of(kwargs) is None:
            kwargs[CACHE_KEYWORD] = self.new_cache()
        return self.model.generate(*args, **kwargs)
