"""Teacher families: where each architecture keeps its decoder layers, attention and projections.

Every per-family difference lives in the FAMILIES table; the rest of the code asks this module.
Biases are read off the modules themselves (Qwen2 has q/k/v biases, Llama none), and grouped-query
geometry off the config, so a family entry only names what cannot be discovered.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from rwkvinside.errors import UserError


@dataclass(frozen=True)
class TeacherFamily:
    """Where a family's pieces live. Paths are attribute names relative to the causal LM."""

    name: str
    layers: str = "model.layers"  # the nn.ModuleList of decoder layers
    attention: str = "self_attn"  # a decoder layer's attention module
    mlp: str = "mlp"  # a decoder layer's feed-forward block
    norms: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")  # before attention, before the MLP
    projections: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    qk_norms: tuple[str, str] | None = None  # per-head RMSNorms on q and k, before RoPE


FAMILIES: dict[str, TeacherFamily] = {
    "llama": TeacherFamily("llama"),  # also SmolLM2
    "qwen2": TeacherFamily("qwen2"),  # q/k/v biases
    "qwen3": TeacherFamily("qwen3", qk_norms=("q_norm", "k_norm")),
    "mistral": TeacherFamily("mistral"),
}


@dataclass(frozen=True)
class AttentionGeometry:
    """The teacher attention's shape, read off its config."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    rms_norm_eps: float

    @property
    def attention_size(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def of(cls, config) -> AttentionGeometry:
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(
            hidden_size=config.hidden_size,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            num_layers=config.num_hidden_layers,
            rms_norm_eps=getattr(config, "rms_norm_eps", 1e-6),
        )


def family_for(config) -> TeacherFamily:
    """The family entry of a teacher configuration, or a UserError naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(
            f"teacher family '{model_type}' is not supported; supported families: "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def family_of(model: nn.Module) -> TeacherFamily:
    """The family entry for a loaded causal LM, or a UserError saying what is wrong with it."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise UserError(
            f"the teacher ({type(model).__name__}) is not a causal language model; "
            "load it with AutoModelForCausalLM (a *ForCausalLM class with an LM head)"
        )
    return family_for(config)


def _get(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def decoder_layers(model: nn.Module, family: TeacherFamily) -> nn.ModuleList:
    """The decoder layers of a causal LM of `family` (a teacher, or a student built from one)."""
    return _get(model, family.layers)


def pointwise_blocks(layer: nn.Module, family: TeacherFamily) -> list[nn.Module]:
    """A decoder layer's parts besides its attention: its two norms and its feed-forward block."""
    return [getattr(layer, name) for name in (*family.norms, family.mlp)]


def compile_pointwise_blocks(model: nn.Module, family: TeacherFamily, **options) -> None:
    """torch.compile every decoder layer's norms and MLP (`options` go to torch.compile), where their
    elementwise steps (a norm's half-dozen kernels, the MLP's activation times its gate) fuse. Layers
    of one shape share their compiled code. A second call changes nothing."""
    for layer in decoder_layers(model, family):
        for block in pointwise_blocks(layer, family):
            if getattr(block, "_compiled_call_impl", None) is None:
                block.compile(**options)


def attention_of(layer: nn.Module, family: TeacherFamily) -> nn.Module:
    return getattr(layer, family.attention)


def set_attention(layer: nn.Module, family: TeacherFamily, module: nn.Module) -> None:
    setattr(layer, family.attention, module)


def projection_biases(attention: nn.Module, family: TeacherFamily) -> tuple[bool, bool, bool, bool]:
    return tuple(getattr(attention, name).bias is not None for name in family.projections)
