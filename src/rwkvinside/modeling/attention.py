"""A time mixer in the teacher's attention slot, and what the converted layers share in a forward pass.

Values that one layer produces and later layers read within a forward pass (v_first, the padding
mask) travel in a `ForwardContext` owned by the model: one per model, so one per process under data
parallelism, with no global state. v_first is an ordinary tensor in the autograd graph, so later
layers' losses reach the producing layer's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rwkvinside.errors import UserError
from rwkvinside.modeling.state import RecurrentCache
from rwkvinside.modeling.time_mixer import RWKV7TimeMixer, TimeMixerState


@dataclass
class ForwardContext:
    """Values shared by the converted layers of one model during one forward pass.

    Kept after the pass (reset at the start of the next): activation checkpointing recomputes
    layers during backward, and the recomputation must read the same v_first and mask.
    """

    token_mask: Tensor | None = None  # [B, T], 1 for real tokens
    v_first: Tensor | None = None  # [B, T, C_att], set by the first converted layer
    v_first_trainable: bool = False  # whether v_first must carry a gradient back to its producer

    def reset(self, token_mask: Tensor | None) -> None:
        self.token_mask = token_mask
        self.v_first = None
        self.v_first_trainable = False

    def follow(self, body: nn.Module) -> None:
        """Reset at the start of every forward pass of `body` (the decoder stack), whoever calls it:
        the model itself, transformers' `generate`, lm-eval."""
        body.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    def _on_forward(self, body: nn.Module, args: tuple, kwargs: dict) -> None:
        """The padding mask of the call's own tokens: with a cache, the 2D attention mask covers every
        token so far ([B, past + T]) and its last T columns are this call's."""
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.reset(mask[:, -tokens.shape[1]:] if mask is not None and mask.dim() == 2 else None)


def cache_of(kwargs: dict):
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
        cache = cache_of(kwargs)
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
