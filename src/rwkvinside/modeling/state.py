"""The generation cache of a hybrid model: recurrent states for converted layers, keys/values for the rest.

A converted layer carries only its `TimeMixerState` from one forward pass to the next: the last
input (token shift, [B, C]) and the WKV state ([B, H, N, N], float32). Both have the same size at
token 10 as at token 100 000, so every new token costs such a layer the same time and memory.
Layers kept as softmax attention keep transformers' growing key/value cache.

`RecurrentCache` is a transformers `DynamicCache` built from the teacher's config (so sliding-window
layers stay sliding), with a `RecurrentLayer` in each converted layer's slot. Every layer, of either
kind, counts the tokens it has read; transformers sizes masks and positions from layer 0, which is
then right whether layer 0 was converted or not, and also when no attention layer is left.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from rwkvinside.modeling.time_mixer import TimeMixerState

# The name transformers gives the cache in forward arguments and outputs: `cache` from 5.24 on,
# `past_key_values` before. Models read either (see `take_cache`) and return it under this one.
CACHE_KEYWORD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
CACHE_FILE_FORMAT = "rwkvinside-cache/1"


def take_cache(kwargs: dict) -> DynamicCache | None:
    """Remove the cache from a forward call's keyword arguments, under whichever name it came."""
    caches = [kwargs.pop(name) for name in ("cache", "past_key_values") if name in kwargs]
    return next((cache for cache in caches if cache is not None), None)


class RecurrentLayer(CacheLayerMixin):
    """A converted layer's slot in the cache: its TimeMixerState and how many tokens it has read."""

    is_sliding = False
    is_compileable = False
    is_croppable = False  # a recurrent state cannot be rolled back by dropping tokens
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()
        self.state: TimeMixerState | None = None
        self.length = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise TypeError("a converted (RWKV-7) layer holds a recurrent state, not keys and values")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        raise TypeError("a converted (RWKV-7) layer holds a recurrent state, not keys and values")

    def advance(self, state: TimeMixerState, num_tokens: int) -> None:
        """Take the state after `num_tokens` more tokens. Without gradients it is copied into the
        tensors already held, so that their storage stays put from step to step (a CUDA graph of
        a decoding step reads and writes it there)."""
        held = self.state
        if (held is not None and not torch.is_grad_enabled() and held.shift.shape == state.shift.shape
                and held.wkv.shape == state.wkv.shape):
            held.shift.copy_(state.shift)
            held.wkv.copy_(state.wkv)
        else:
            self.state = state
        self.length += num_tokens
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) as an attention layer that read the same tokens would give."""
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1  # unbounded

    def reset(self) -> None:
        self.state = None
        self.length = 0
        self.is_initialized = False

    def offload(self) -> None:
        """Kept on the device: the state is small and read by every step."""

    def prefetch(self) -> None:
        """Nothing to fetch: see `offload`."""

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("a recurrent state cannot drop tokens once read; start from a saved state "
                             "instead")

    def _map(self, fn: Callable[[Tensor], Tensor]) -> None:
        if self.state is not None:
            self.state = TimeMixerState(shift=fn(self.state.shift), wkv=fn(self.state.wkv))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices])


class RecurrentCache(DynamicCache):
    """transformers' DynamicCache for the attention layers, with a RecurrentLayer per converted layer.

    config: the teacher's (decoder) config, which lays out the attention layers' caches;
    rwkv_layers: indices of the converted layers.
    """

    def __init__(self, config, rwkv_layers: Iterable[int]):
        super().__init__(config=config)
        for i in rwkv_layers:
            self.layers[i] = RecurrentLayer()

    @property
    def rwkv_layers(self) -> tuple[int, ...]:
        return tuple(i for i, layer in enumerate(self.layers) if isinstance(layer, RecurrentLayer))

    def rwkv_state(self, layer_idx: int) -> TimeMixerState | None:
        """The converted layer's state, or None before its first token."""
        return self.layers[layer_idx].state

    def update_rwkv_state(self, layer_idx: int, state: TimeMixerState, num_tokens: int) -> None:
        self.layers[layer_idx].advance(state, num_tokens)

    def save(self, path: str | Path) -> None:
        """Write every layer's state (recurrent or keys/values) to a safetensors file."""
        tensors: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            if isinstance(layer, RecurrentLayer):
                if layer.state is not None:
                    tensors[f"{i}.shift"], tensors[f"{i}.wkv"] = layer.state.shift, layer.state.wkv
            elif layer.is_initialized:
                tensors[f"{i}.keys"], tensors[f"{i}.values"] = layer.keys, layer.values
        metadata = {
            "format": CACHE_FILE_FORMAT,
            "rwkv_layers": json.dumps(self.rwkv_layers),
            "lengths": json.dumps([layer.get_seq_length() for layer in self.layers]),
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(path), metadata=metadata)

    def load(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        """Fill this empty cache (made for the same model) from a file written by `save`."""
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        if metadata.get("format") != CACHE_FILE_FORMAT:
            raise ValueError(f"{path} is not a saved generation state ({CACHE_FILE_FORMAT})")
        if tuple(json.loads(metadata["rwkv_layers"])) != self.rwkv_layers:
            raise ValueError(f"{path} was saved from a model with other converted layers")
        if self.get_seq_length():
            raise ValueError("load a saved state into a new, empty cache")
        tensors = load_file(str(path), device=str(device))
        for i, (layer, length) in enumerate(zip(self.layers, json.loads(metadata["lengths"]), strict=True)):
            if isinstance(layer, RecurrentLayer):
                if f"{i}.shift" in tensors:
                    state = TimeMixerState(shift=tensors[f"{i}.shift"], wkv=tensors[f"{i}.wkv"])
                    layer.advance(state, length)
            elif f"{i}.keys" in tensors:
                layer.update(tensors[f"{i}.keys"], tensors[f"{i}.values"])
                if hasattr(layer, "cumulative_length"):  # a sliding-window layer keeps only its window
                    layer.cumulative_length = length
