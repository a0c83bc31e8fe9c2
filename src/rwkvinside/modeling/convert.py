"""Teacher -> student: build the student from a loaded teacher and initialise its time mixers.

The student adopts the teacher's own tensors for everything outside the converted attentions (the
embeddings, MLPs, norms, the attentions it keeps and the LM head), so converting costs no copy of
the model; the teacher stays intact and usable (stage 1 runs its attentions beside the students).
Train a copy of the teacher's weights only after a save and reload (stage 2 starts from stage 1's
folder), or copy the teacher first.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from rwkvinside.config import INITIALISATIONS
from rwkvinside.errors import UserError
from rwkvinside.modeling.configuration import RWKVInsideConfig
from rwkvinside.modeling.student import RWKVInsideForCausalLM, check_head_size, check_rwkv_layers
from rwkvinside.modeling.teachers import (AttentionGeometry, TeacherFamily, attention_of, decoder_layers,
                                          family_of)


@dataclass(frozen=True)
class ConversionSpec:
    """Which layers become RWKV-7, and how the students start.

    layers: indices of the decoder layers to convert; None converts all.
    head_size: the student's head size; None takes the teacher's head_dim. The student keeps the
        teacher's attention width, so the head count is width / head_size.
    init: "teacher" copies q/k/v/o into r/k/v/o and lets them see at step 0 what the teacher's
        projections saw (`start_like_the_teacher`); "teacher_copy" copies them, the rest by the
        RWKV-7 initialisation; "rwkv" uses the RWKV-7 initialisation throughout.
    untie_embeddings: a student of a teacher with tied embeddings gets an LM head of its own (a copy).
    lead_token_id: a token an all-RWKV student reads before every sequence it starts (RWKVInsideConfig).
    """

    layers: tuple[int, ...] | None = None
    head_size: int | None = None
    init: str = "teacher"
    untie_embeddings: bool = False
    lead_token_id: int | None = None


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


def student_config(teacher: nn.Module, spec: ConversionSpec, trained_context: int | None = None) -> RWKVInsideConfig:
    """The student's configuration for `teacher`; checks the spec before anything is built."""
    if spec.init not in INITIALISATIONS:
        raise UserError(f"unknown initialisation '{spec.init}'; choose one of {', '.join(INITIALISATIONS)}")
    family = family_of(teacher)
    geometry = AttentionGeometry.of(teacher.config)
    layers = check_rwkv_layers(spec.layers, geometry.num_layers)
    check_head_size(spec.head_size, family, geometry)
    if spec.lead_token_id is not None and len(layers) < geometry.num_layers:
        raise UserError("a lead token needs every layer converted (kept attention layers would see it at "
                        "position 0); drop convert.lead or convert.layers")
    text_config = teacher.config.to_dict()
    text_config["use_cache"] = True  # generation caches; a loaded teacher may have it off
    if spec.untie_embeddings:
        text_config["tie_word_embeddings"] = False
    return RWKVInsideConfig(text_config=text_config, rwkv_layers=list(layers), head_size=spec.head_size,
                            trained_context=trained_context, lead_token_id=spec.lead_token_id)


def convert(teacher: nn.Module, spec: ConversionSpec = ConversionSpec()) -> RWKVInsideForCausalLM:
    """The student of `teacher`, on its device and in its dtype, sharing its tensors (see the module
    docstring). A bad spec raises UserError before anything is built."""
    config = student_config(teacher, spec)
    device, dtype = check_uniform(teacher)
    with torch.device("meta"):  # a skeleton: nothing allocated, nothing randomly initialised
        student = RWKVInsideForCausalLM(config)
    _adopt_tensors(student, teacher)
    geometry = AttentionGeometry.of(teacher.config)
    teacher_layers = decoder_layers(teacher, student.family)
    for layer_idx, slot in student.converted_attention().items():
        slot.mixer.to_empty(device=device)
        slot.mixer.reset_parameters()  # in float32, then cast
        if spec.init in ("teacher", "teacher_copy"):
            copy_attention_into_mixer(attention_of(teacher_layers[layer_idx], student.family), slot.mixer,
                                      student.family, geometry)
        if spec.init == "teacher":
            start_like_the_teacher(slot.mixer)
        slot.mixer.to(dtype)
    if config.tie_word_embeddings:
        student.lm_head.weight = student.model.get_input_embeddings().weight
    elif teacher.config.tie_word_embeddings:  # untied: the head starts as a copy of the embeddings
        student.lm_head.weight = nn.Parameter(student.model.get_input_embeddings().weight.detach().clone())
    _check_materialised(student)
    return student.train(teacher.training)


def keep_teacher_attention(student: RWKVInsideForCausalLM, teacher: nn.Module,
                           layers: list[int]) -> RWKVInsideForCausalLM:
    """The student with `layers` back to the teacher's attention (keep_attention): the same tensors for
    everything else, the teacher's attention weights in those layers. The first converted layer makes
    v_first and cannot go back."""
    first = student.rwkv_layers[0]
    if first in layers:
        raise UserError(f"layer {first} is the first converted layer (it makes v_first); it stays RWKV-7")
    unconverted = sorted(set(layers) - set(student.rwkv_layers))
    if unconverted:
        raise UserError(f"layer {unconverted[0]} is not a converted layer; keep attention only in one of "
                        f"{', '.join(map(str, student.rwkv_layers[1:]))}")
    config = copy.deepcopy(student.config)
    config.rwkv_layers = [i for i in student.rwkv_layers if i not in set(layers)]
    with torch.device("meta"):
        reduced = RWKVInsideForCausalLM(config)
    _adopt_tensors(reduced, teacher)  # the kept attentions (and, for a moment, everything else)
    _adopt_tensors(reduced, student)  # the student's own weights, mixers included
    if config.tie_word_embeddings:
        reduced.lm_head.weight = reduced.model.get_input_embeddings().weight
    _check_materialised(reduced)
    return reduced.train(student.training)


def _adopt_tensors(student: nn.Module, source: nn.Module) -> None:
    """Every parameter and buffer the student shares with `source` by name becomes source's own tensor
    (non-persistent buffers, such as RoPE's frequencies, included)."""
    own = student.state_dict()
    shared = {name: tensor for name, tensor in source.state_dict().items() if name in own}
    student.load_state_dict(shared, strict=False, assign=True)
    for name, buffer in source.named_buffers():
        module_name, _, buffer_name = name.rpartition(".")
        try:
            module = student.get_submodule(module_name)
        except AttributeError:  # a module the student does not have (a converted attention's)
            continue
        if buffer_name in module._buffers:
            module._buffers[buffer_name] = buffer


def _check_materialised(model: nn.Module) -> None:
    """Nothing of the skeleton may be left on the meta device (a tensor no source provided)."""
    left = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if left:
        raise RuntimeError(f"no tensor for {left[:3]} after conversion: the family table misses something")


# Value residual at step 0 under the teacher initialisation: sigmoid(-3) = 4.7% of v_first mixed in,
# so each layer starts from its own copied value and can learn to mix more.
OWN_VALUE_LOGIT = -3.0


@torch.no_grad()
def start_like_the_teacher(mixer: nn.Module) -> None:
    """The teacher initialisation's step 0 beyond the copies: the copied projections read the
    teacher's input unshifted (token-shift mixing 0), the gate passes the copied output projection
    through (g = sigmoid(x A_g) B_g = 1, up to a small random part that breaks the symmetry of B_g's
    rows), and each layer starts from its own value rather than mostly v_first."""
    for mu in (mixer.x_r, mixer.x_w, mixer.x_k, mixer.x_v, mixer.x_a, mixer.x_g):
        mu.zero_()
    rank = mixer.g2.shape[0]
    mixer.g1.zero_()  # sigmoid(0) = 1/2 on every rank: B_g's columns must sum to 2
    mixer.g2.add_(2.0 / rank - mixer.g2.mean(dim=0, keepdim=True))
    if mixer.config.value_residual:
        mixer.v0.fill_(OWN_VALUE_LOGIT)


@torch.no_grad()
def copy_attention_into_mixer(attention: nn.Module, mixer: nn.Module, family: TeacherFamily,
                              geometry: AttentionGeometry) -> None:
    """Initialise r <- q, k <- k, v <- v, o <- o (biases and q/k norms too).

    Grouped-query teachers keep fewer k/v heads than q heads: each k/v head is repeated for the
    query heads of its group, as the teacher's own attention does at run time. The student's
    head count may differ from the teacher's as long as the widths agree (the rows are the same
    channels, regrouped).
    """
    q, k, v, o = (getattr(attention, name) for name in family.projections)
    groups = geometry.num_heads // geometry.num_kv_heads

    def repeat_kv(tensor: torch.Tensor) -> torch.Tensor:  # [kv_heads * D, ...] -> [heads * D, ...]
        rest = tensor.shape[1:]
        tensor = tensor.view(geometry.num_kv_heads, 1, geometry.head_dim, *rest)
        tensor = tensor.expand(geometry.num_kv_heads, groups, geometry.head_dim, *rest)
        return tensor.reshape(geometry.num_heads * geometry.head_dim, *rest)

    mixer.receptance.weight.copy_(q.weight)
    mixer.key.weight.copy_(repeat_kv(k.weight))
    mixer.value.weight.copy_(repeat_kv(v.weight))
    mixer.output.weight.copy_(o.weight)
    for source, target, expand in ((q, mixer.receptance, False), (k, mixer.key, True),
                                   (v, mixer.value, True), (o, mixer.output, False)):
        if source.bias is not None:
            target.bias.copy_(repeat_kv(source.bias) if expand else source.bias)
    if family.qk_norms is not None:
        q_norm, k_norm = (getattr(attention, name) for name in family.qk_norms)
        mixer.r_norm.weight.copy_(q_norm.weight)
        mixer.k_norm.weight.copy_(k_norm.weight)
