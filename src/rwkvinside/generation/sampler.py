"""Sampling continuations of a batch of prompts from a teacher: a static KV cache, and on CUDA the
one-token step replayed from a CUDA graph.

Every row of a batch owns `max_len` cache slots. Prompts are left-padded to the longest one, so
that at every step all rows write the same slot and a step has the same shapes and storage every
time, whatever the prompts: the step is captured once in a CUDA graph and replayed for every token
of every batch, with no Python and no host-device synchronisation between tokens (transformers'
`generate` spends most of its time in Python at large batches). Tokens are chosen on the device
(`choose_tokens`: Gumbel-max noise from torch.rand, which a graph replays with fresh numbers), rows
that ended keep producing padding, and whether all rows have ended is read back only every
FINISH_CHECK_EVERY steps. On the CPU the same `step` runs eagerly.

Attention is told which slots each query sees by an explicit boolean mask (sdpa's convention): a
row's own slots from its first prompt token up to the query's slot. Positions count from a row's
first prompt token, so a padded row computes what the same prompt alone would. With a mask,
transformers' sdpa attention copies every key/value head once per query head that reads it, which
made a step several times slower than reading the cache (SmolLM2-135M on an H200: ~30k tokens/s
at batch 2048): `grouped_query_attention` reads the cache once per decoding step instead, on CUDA
through a Triton kernel that loads only the slots each row sees (`rwkvinside.ops.decode_attention`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from rwkvinside.errors import UserError
from rwkvinside.modeling.decode import FINISH_CHECK_EVERY, ChosenTokens, DecodingPlan, capture
from rwkvinside.modeling.state import CACHE_KEYWORD
from rwkvinside.ops.decode_attention import masked_decode_attention

ATTENTION = "rwkvinside_grouped_sdpa"  # the name `grouped_query_attention` is registered under


class BatchSampler:
    """Continues `batch_size` prompts at a time to at most `max_len` tokens each (prompt included).

    One sampler serves every batch: its cache and loop tensors are allocated once, and each batch
    is copied into them, which is what lets one captured graph serve all batches.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, plan: DecodingPlan) -> None:
        """plan: how tokens are chosen and which end a row (its max_new_tokens is not used: a batch
        gets `max_len` minus its longest prompt)."""
        check_context(model.config, max_len)
        # sdpa under another name, masks included: the boolean masks below are sdpa's convention.
        AttentionInterface.register(ATTENTION, grouped_query_attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        model.set_attn_implementation(ATTENTION)
        device = model.device
        self.model, self.plan, self.max_len = model, plan, max_len
        # Plain static layers throughout: sliding-window layers (which check_context found wider
        # than a sample) would keep a rolling buffer of their own.
        self.cache = Cache(layers=[StaticLayer(max_cache_len=max_len)
                                   for _ in range(model.config.get_text_config().num_hidden_layers)])
        self.slots = torch.arange(max_len, device=device)  # [L]
        self.start = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # a row's first prompt slot
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the next input's slot, in every row
        self.chosen = ChosenTokens(batch_size, max_len, plan, device)
        self.graph: torch.cuda.CUDAGraph | None = None

    @property
    def batch_size(self) -> int:
        return self.chosen.tokens.shape[0]

    @torch.no_grad()
    def sample(self, prompts: Sequence[Sequence[int]], seed: int = 0) -> list[list[int]]:
        """The new tokens of each prompt (batch_size of them), up to and including the token that ended
        the row, or max_len minus the longest prompt of them where none did. The sampling noise is
        seeded by `seed` (torch's default generators), so a call repeats on the same device."""
        ids, lengths = self._left_padded(prompts)
        new_tokens = self.max_len - ids.shape[1]
        if self.model.device.type == "cuda" and self.graph is None:
            self._read_prompts(ids, lengths)
            self.graph = capture(self.step)  # it steps a few times: the prompts are read again below
        torch.manual_seed(seed)  # after the capture, whose steps draw noise too
        self._read_prompts(ids, lengths)
        step = self.graph.replay if self.graph is not None else self.step
        chosen = 1  # the prompts' forward pass chose the first token
        while chosen < new_tokens and not (chosen % FINISH_CHECK_EVERY == 0 and bool(self.chosen.finished.all())):
            step()
            chosen += 1
        return [self._until_end(row) for row in self.chosen.tokens[:, :chosen].tolist()]

    def step(self) -> None:
        """Feed each row's last token, choose its next one. Every tensor written keeps its storage."""
        visible = (self.slots >= self.start) & (self.slots <= self.slot)  # [B, L]
        logits = self._forward(self.chosen.next_input, visible[:, None, None, :], self.slot - self.start)
        self.slot += 1
        self.chosen.choose(logits)

    def _read_prompts(self, ids: Tensor, lengths: Tensor) -> None:
        """Start a batch: empty the cache, read the left-padded prompts ids [B, P] (lengths [B]), choose
        each row's first token."""
        self.cache.reset()
        width = ids.shape[1]
        self.start.copy_((width - lengths)[:, None])
        self.slot.fill_(width)
        self.chosen.reset()
        query = self.slots[:width, None]  # [P, 1]
        # A padding query sees itself only: a query that sees nothing would give NaN, which its keys
        # and values would carry into the cache (masked, but NaN times a zero weight is NaN).
        own = (self.slots >= self.start[:, :, None]) & (self.slots <= query)  # [B, P, L]
        visible = own | (self.slots == query)
        positions = (self.slots[:width] - self.start).clamp(min=0)  # [B, P]
        self.chosen.choose(self._forward(ids, visible[:, None], positions))

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        """The next-token logits [B, V] after ids [B, T]; the cache stores them after the slots it holds
        (it counts them itself, in step with self.slot)."""
        output = self.model(ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{CACHE_KEYWORD: self.cache})
        return output.logits[:, -1]

    def _left_padded(self, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """ids [B, P] (each prompt at the right end of its row), lengths [B]."""
        if len(prompts) != self.batch_size:
            raise ValueError(f"the sampler takes {self.batch_size} prompts at a time, not {len(prompts)}")
        width = max(len(prompt) for prompt in prompts)
        if not 0 < width < self.max_len:
            raise ValueError(f"prompts must have 1 to {self.max_len - 1} tokens, the longest has {width}")
        ids = torch.full((len(prompts), width), self.plan.pad_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        lengths = torch.tensor([len(prompt) for prompt in prompts])
        return ids.to(self.slots.device), lengths.to(self.slots.device)

    def _until_end(self, row: list[int]) -> list[int]:
        """A row's tokens up to and including its first stop token."""
        stops = set(self.plan.eos_token_ids)
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        return row[:end]


def grouped_query_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs) -> tuple[Tensor, None]:
    """transformers' sdpa attention, except for one query token per row under a mask (every decoding
    step): `masked_decode_attention`, which reads the cache once, as it is, and on CUDA only the slots
    a row sees. query [B, H, T, D], key and value [B, H/G, L, D], attention_mask [B, 1, T, L] (True:
    seen) -> ([B, T, H, D], None)."""
    batch, _, length, dim = query.shape
    if length > 1 or attention_mask is None:  # sdpa copies nothing without a mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = dim ** -0.5 if scaling is None else scaling
    seen = attention_mask[:, 0, 0].expand(batch, -1)  # [B, L]
    return masked_decode_attention(query[:, :, 0], key, value, seen, scale)[:, None], None


def check_context(config, max_len: int) -> None:
    """Refuse samples longer than the teacher's context or its sliding attention window."""
    config = config.get_text_config()
    context = getattr(config, "max_position_embeddings", None)
    if context and max_len > context:
        raise UserError(f"--seq-len {max_len} is longer than the teacher's context of {context} tokens; give "
                        f"at most {context}")
    window = getattr(config, "sliding_window", None)
    if window and max_len > window:
        raise UserError(f"--seq-len {max_len} is longer than the teacher's sliding attention window of "
                        f"{window} tokens, which sampling does not implement; give at most {window}")
