"""Decoding one token after another from a recurrent state, with the step captured in a CUDA graph.

A decoding step of an RWKV-7 layer reads a fixed-size state and writes one of the same size, so the
whole step (every layer, the head, the choice of the next token) has the same shapes at token 10
and at token 100,000: it is captured once in a CUDA graph and replayed, with no Python and no
host-device synchronisation between tokens. Through transformers' `generate`, Python overhead per
token dwarfs the work.

A kept attention layer's key/value cache grows with every token, which a graph cannot replay. For
decoding, each such layer's keys and values move into buffers of a fixed size (`FixedKeyValues`), and
the token's position lives on the device (`SlotPosition`): a step writes its key and value at that
slot, attends to the slots up to it under a mask built on the device, and moves the position on. So
a hybrid student's step has the same shapes and storage every time too. The graph applies on CUDA;
elsewhere the same loop runs eagerly (and where a kept layer slides its window or the attention is
neither sdpa nor eager, with the growing cache as before). Token choice follows
transformers' semantics for the options supported here (greedy, temperature, top-k, top-p, EOS and
padding of finished rows, min_new_tokens); `decoding_plan` returns None for anything else, and the
caller uses transformers' `generate` instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from rwkvinside.graph_capture import capturing
from rwkvinside.modeling.state import CACHE_KEYWORD, RecurrentLayer

logger = logging.getLogger(__name__)

# Rows are checked for completion every this many tokens: each check reads a flag back to the host.
FINISH_CHECK_EVERY = 32
# Attention implementations that take the additive [B, 1, 1, slots] mask a fixed-buffer step gives.
FIXED_BUFFER_ATTENTION = ("sdpa", "eager")
# The `generate` keyword arguments this loop implements; any other one goes to transformers.
PLAN_ARGUMENTS = {"attention_mask", "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k",
                  "top_p", "eos_token_id", "pad_token_id", "use_cache", "cache", "past_key_values"}


@dataclass(frozen=True)
class DecodingPlan:
    """What to generate: how many tokens, how each is chosen, and when a row ends.

    Greedy unless `do_sample`; sampling draws from the logits at `temperature`, restricted to the
    `top_k` most likely tokens (0: all) and to the smallest set of those whose probability reaches
    `top_p`. A row ends at one of `eos_token_ids` (not before `min_new_tokens`) and is padded after.
    """

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0


def decoding_plan(generation_config, kwargs: dict) -> DecodingPlan | None:
    """The plan for `generate(**kwargs)` over the model's own generation config (transformers'
    defaults), or None when an option asks for more than this loop does."""
    if set(kwargs) - PLAN_ARGUMENTS or not kwargs.get("use_cache", True):
        return None
    config = generation_config.to_dict()
    setting = {name: kwargs.get(name, config.get(name)) for name in
               ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
                "pad_token_id", "repetition_penalty", "num_beams", "num_return_sequences", "no_repeat_ngram_size",
                "stop_strings", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "bad_words_ids",
                "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
                "max_length")}
    plain = (setting["repetition_penalty"] in (None, 1.0) and setting["num_beams"] in (None, 1)
             and setting["num_return_sequences"] in (None, 1) and not setting["no_repeat_ngram_size"]
             and not setting["stop_strings"] and not setting["min_p"] and setting["typical_p"] in (None, 1.0)
             and not setting["epsilon_cutoff"] and not setting["eta_cutoff"] and not setting["bad_words_ids"]
             and not setting["suppress_tokens"] and not setting["begin_suppress_tokens"]
             and setting["forced_bos_token_id"] is None and setting["forced_eos_token_id"] is None
             and setting["max_new_tokens"] is not None)
    if not plain:
        return None
    eos = setting["eos_token_id"]
    eos = () if eos is None else tuple([eos] if isinstance(eos, int) else eos)
    pad = setting["pad_token_id"]
    return DecodingPlan(
        max_new_tokens=setting["max_new_tokens"], min_new_tokens=setting["min_new_tokens"] or 0,
        do_sample=bool(setting["do_sample"]), temperature=setting["temperature"] or 1.0,
        top_k=setting["top_k"] or 0, top_p=1.0 if setting["top_p"] is None else setting["top_p"],
        eos_token_ids=eos, pad_token_id=(eos[0] if eos else 0) if pad is None else pad)


def choose_tokens(logits: Tensor, plan: DecodingPlan) -> Tensor:
    """The next token of each row: logits [B, V] -> [B]. Sampling is the Gumbel-max trick with noise
    from the default generator, which a CUDA graph can capture (each replay draws fresh noise)."""
    if not plan.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / plan.temperature
    if plan.top_k:
        kth = logits.topk(min(plan.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if plan.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probabilities = sorted_logits.softmax(-1)
        above = probabilities.cumsum(-1) - probabilities >= plan.top_p  # the better ones already reach top_p
        logits = logits.masked_fill(above.scatter(-1, order, above), float("-inf"))
    gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_(min=1e-20)))
    return (logits + gumbel).argmax(-1)


class ChosenTokens:
    """Each row's tokens so far, which rows have ended, and the next input. Every tensor keeps its
    storage from step to step (a CUDA graph replays the writes)."""

    def __init__(self, batch: int, capacity: int, plan: DecodingPlan, device: torch.device):
        self.plan = plan
        self.eos = torch.tensor(plan.eos_token_ids, dtype=torch.long, device=device)
        self.tokens = torch.full((batch, capacity), plan.pad_token_id, dtype=torch.long, device=device)
        self.count = torch.zeros(1, dtype=torch.long, device=device)  # tokens chosen so far
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.next_input = torch.zeros(batch, 1, dtype=torch.long, device=device)

    def choose(self, logits: Tensor) -> None:
        """Choose each row's next token from its logits [B, V] and record it; an ended row gets padding."""
        if self.eos.numel() and self.plan.min_new_tokens:
            too_early = self.count < self.plan.min_new_tokens  # [1], on the device: no sync
            logits = logits.clone()
            logits[:, self.eos] = logits[:, self.eos].masked_fill(too_early, float("-inf"))
        token = choose_tokens(logits, self.plan)
        token = torch.where(self.finished, self.plan.pad_token_id, token)
        self.finished |= torch.isin(token, self.eos)
        self.tokens.index_copy_(1, self.count, token[:, None])
        self.next_input.copy_(token[:, None])
        self.count += 1

    def reset(self) -> None:
        self.count.zero_()
        self.finished.zero_()
        self.tokens.fill_(self.plan.pad_token_id)

    def tensors(self) -> tuple[Tensor, ...]:
        return self.tokens, self.count, self.finished, self.next_input


class SlotPosition:
    """The position of the token a decoding step reads, on the device: its rotary position and the slot
    of the fixed key/value buffers it writes. A step reads it and moves it on, with no Python int
    involved, so a replayed step reads the position of its own token.

    padding: [B, read] (1: a token, 0: left padding) over the tokens read before decoding, or None.
    Every row takes the same positions, as the prefill gave them: a padded row's tokens sit further
    along than they would alone, which rotary attention, reading only the distance between positions,
    does not see."""

    def __init__(self, start: int, capacity: int, batch: int, dtype: torch.dtype, device: torch.device,
                 padding: Tensor | None = None):
        self.index = torch.full((1,), start, dtype=torch.long, device=device)
        self.slots = torch.arange(capacity, device=device)
        self.holds_token = torch.ones(batch, capacity, dtype=torch.bool, device=device)  # False: padding
        if padding is not None:
            self.holds_token[:, :start] = padding.to(device=device, dtype=torch.bool)
        self.batch, self.dtype = batch, dtype

    def step_inputs(self) -> dict[str, Tensor]:
        """The forward arguments of a step: an additive mask [B, 1, 1, slots] that shows each row its
        own tokens up to this one (a slot after it holds nothing yet, or a capture's leftovers), and
        the position ids [B, 1]."""
        hidden = torch.finfo(self.dtype).min
        mask = torch.where((self.slots <= self.index) & self.holds_token, 0.0, hidden).to(self.dtype)
        return {"attention_mask": mask[:, None, None, :], "position_ids": self.index.expand(self.batch, 1)}

    def advance(self) -> None:
        self.index += 1


class FixedKeyValues(CacheLayerMixin):
    """A kept attention layer's keys and values in buffers [B, H_kv, capacity, D] that keep their size and
    storage while decoding: a step writes its token's key and value at `position`'s slot and hands
    the attention the whole buffers (the step's mask hides the slots after it)."""

    is_sliding = False
    supports_early_init = False

    def __init__(self, keys: Tensor, values: Tensor, capacity: int, position: SlotPosition):
        super().__init__()
        batch, heads, self.length, dim = keys.shape
        self.keys = keys.new_zeros(batch, heads, capacity, dim)
        self.values = values.new_zeros(batch, heads, capacity, values.shape[-1])
        self.keys[:, :, :self.length] = keys
        self.values[:, :, :self.length] = values
        self.position = position
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise TypeError("fixed key/value buffers are made from a filled cache layer")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.keys.index_copy_(2, self.position.index, key_states)
        self.values.index_copy_(2, self.position.index, value_states)
        self.length += key_states.shape[2]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    def filled(self) -> tuple[Tensor, Tensor]:
        """The keys and values of the tokens read, [B, H_kv, length, D] each (copies: the buffers go)."""
        return self.keys[:, :, :self.length].clone(), self.values[:, :, :self.length].clone()


def fixed_buffers_hold(model: nn.Module, cache) -> bool:
    """Whether `fixed_key_values` can hold every kept attention layer of `cache` (true where none is
    left): not one whose window slides, and an attention implementation that takes its mask (sdpa
    or eager)."""
    kept = [layer for layer in cache.layers if not isinstance(layer, RecurrentLayer)]
    return not kept or (all(type(layer) is DynamicLayer for layer in kept)
                        and model.model.config._attn_implementation in FIXED_BUFFER_ATTENTION)


@contextmanager
def fixed_key_values(model: nn.Module, cache, new_tokens: int,
                     padding: Tensor | None = None) -> Iterator[SlotPosition | None]:
    """While open, every kept attention layer of `cache` holds its keys and values in fixed buffers with
    room for `new_tokens` more, and the yielded position says where the next token goes; on leaving,
    the layers hold what they read in their usual growing form. padding: the attention mask [B, read]
    of the tokens the cache has read (None: no padding). Yields None where there is no attention
    layer, or where `fixed_buffers_hold` says no: such a cache decodes as it is."""
    kept = {i: layer for i, layer in enumerate(cache.layers) if not isinstance(layer, RecurrentLayer)}
    if not (kept and fixed_buffers_hold(model, cache) and all(layer.is_initialized for layer in kept.values())):
        yield None
        return
    read = cache.get_seq_length()
    keys = next(iter(kept.values())).keys
    position = SlotPosition(read, read + new_tokens, keys.shape[0], keys.dtype, keys.device, padding)
    fixed = {i: FixedKeyValues(layer.keys, layer.values, read + new_tokens, position)
             for i, layer in kept.items()}
    for i, layer in fixed.items():
        cache.layers[i] = layer
    try:
        yield position
    finally:
        for i, layer in kept.items():
            layer.keys, layer.values = fixed[i].filled()
            cache.layers[i] = layer


class DecodeLoop:
    """The state of one generation: `chosen` (the tokens so far), the model's cache, and where the next
    token goes in the kept attention layers' fixed buffers (None: all-RWKV, or a growing cache).

    `step()` feeds each row's last token and chooses its next one. Every tensor it writes keeps its
    storage from step to step (the recurrent states too: `RecurrentLayer.advance` updates them in
    place), which is what lets a CUDA graph replay it.
    """

    def __init__(self, model: nn.Module, cache, first_logits: Tensor, plan: DecodingPlan,
                 position: SlotPosition | None = None):
        self.model, self.cache, self.position = model, cache, position
        self.chosen = ChosenTokens(first_logits.shape[0], plan.max_new_tokens, plan, first_logits.device)
        self.chosen.choose(first_logits)

    def step(self) -> None:
        inputs = self.position.step_inputs() if self.position is not None else {}
        logits = self.model(self.chosen.next_input, use_cache=True, **inputs,
                            **{CACHE_KEYWORD: self.cache}).logits[:, -1]
        self.chosen.choose(logits)
        if self.position is not None:
            self.position.advance()

    def _written(self) -> tuple[Tensor, ...]:
        """Everything `step` writes that a later step reads: the chosen tokens, the recurrent states and
        the position (a slot after the position is hidden until a step writes it again)."""
        states = [t for layer in self.cache.layers if isinstance(layer, RecurrentLayer)
                  for t in (layer.state.shift, layer.state.wkv)]
        position = [self.position.index] if self.position is not None else []
        return (*self.chosen.tensors(), *states, *position)

    def snapshot(self) -> list[Tensor]:
        return [t.clone() for t in self._written()]

    def restore(self, saved: list[Tensor]) -> None:
        for target, source in zip(self._written(), saved, strict=True):
            target.copy_(source)

    def all_finished(self) -> bool:
        return bool(self.chosen.finished.all())

    def generated(self, steps: int) -> Tensor:
        """The new tokens [B, n]: up to the step at which the last row ended (all of them otherwise)."""
        tokens = self.chosen.tokens[:, :steps]
        ended = torch.isin(tokens, self.chosen.eos)
        if steps and ended.any(-1).all():
            steps = int(ended.float().argmax(-1).max()) + 1
        return tokens[:, :steps]


def graph_capturable(model: nn.Module, cache) -> bool:
    """CUDA, and every layer recurrent or in fixed buffers: a step then has the same shapes and storage
    every time."""
    return model.lm_head.weight.is_cuda and all(isinstance(layer, (RecurrentLayer, FixedKeyValues))
                                                for layer in cache.layers)


@torch.no_grad()
def recurrent_generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, cache,
                       plan: DecodingPlan) -> Tensor:
    """input_ids [B, T] (with `cache`, the tokens it has read are skipped) -> [B, T + new tokens]."""
    read = cache.get_seq_length()
    prefill = model(input_ids[:, read:], attention_mask=attention_mask, use_cache=True, **{CACHE_KEYWORD: cache})
    with fixed_key_values(model, cache, plan.max_new_tokens, attention_mask) as position:
        loop = DecodeLoop(model, cache, prefill.logits[:, -1], plan, position)
        steps = _replay_graph(loop, plan.max_new_tokens) if graph_capturable(model, cache) else None
        if steps is None:  # eagerly, one step after another
            steps = 1
            while steps < plan.max_new_tokens and not (steps % FINISH_CHECK_EVERY == 0
                                                       and loop.all_finished()):
                loop.step()
                steps += 1
    return torch.cat([input_ids, loop.generated(steps)], dim=1)


def capture(step: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `step`. Capturing needs a few eager runs first, on a side stream as CUDA
    requires; they, and the capture itself, run the step: the caller starts its state afresh after."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with capturing(graph):
        step()
    return graph


def _replay_graph(loop: DecodeLoop, max_new_tokens: int) -> int | None:
    """Run the loop's steps as replays of one captured step; returns the tokens chosen (the first
    included), or None, with the loop as it was, where the step cannot be captured.

    The capture advances the states, so everything is put back before the first replay, and the
    cache's token counts (kept by Python, which replays skip) are set once at the end.
    """
    layers = [layer for layer in loop.cache.layers if isinstance(layer, (RecurrentLayer, FixedKeyValues))]
    lengths = [layer.length for layer in layers]
    saved = loop.snapshot()
    try:
        graph = capture(loop.step)
    except RuntimeError as error:  # an operation CUDA graphs do not allow: decode eagerly instead
        logger.warning("decoding eagerly: the decoding step could not be captured in a CUDA graph (%s)",
                       str(error).splitlines()[0])
        graph = None
    loop.restore(saved)
    for layer, length in zip(layers, lengths):
        layer.length = length
    if graph is None:
        return None
    steps = 1
    while steps < max_new_tokens and not (steps % FINISH_CHECK_EVERY == 0 and loop.all_finished()):
        graph.replay()
        steps += 1
    for layer in layers:
        layer.length += steps - 1  # every step but the first read one token
    return steps
