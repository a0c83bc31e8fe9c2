"""The batch contract that the training loop and the losses rely on.

A batch is a dict of LongTensors, all [B, T]:

- `input_ids`: token ids, right-padded;
- `labels`: `labels[:, t]` is the target of position t, i.e. the next token — shifted here, exactly
  once (losses never shift again) — and `IGNORE_INDEX` where there is no target (padding, and in
  SFT every position whose next token is not an assistant token);
- `attention_mask`: 1 for real tokens, 0 for padding.

`shifted_sample` is the only place in the package that shifts.
"""

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import TypeVar

import torch

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index

T = TypeVar("T")
Sample = dict[str, torch.Tensor]  # the batch keys, each [T]
Batch = dict[str, torch.Tensor]  # the batch keys, each [B, T]
BATCH_KEYS = ("input_ids", "labels", "attention_mask")


def shifted_sample(tokens: torch.Tensor, seq_len: int, pad_id: int,
                   target_mask: torch.Tensor | None = None) -> Sample:
    """One training sample from a token run of at most seq_len+1 tokens.

    tokens: [n], 2 <= n <= seq_len+1. target_mask: [n] bool, which tokens may be targets (None: all).
    Returns input_ids = tokens[:-1] and labels = tokens[1:] (IGNORE_INDEX where the target is not
    in target_mask), both right-padded to [seq_len]; the last token is a target only, never an input.
    """
    length = tokens.numel() - 1
    if not 1 <= length <= seq_len:
        raise ValueError(f"a sample needs 2..{seq_len + 1} tokens, got {tokens.numel()}")
    tokens = tokens.long()
    input_ids = torch.full((seq_len,), pad_id, dtype=torch.long)
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(seq_len, dtype=torch.long)
    input_ids[:length] = tokens[:-1]
    targets = tokens[1:]
    if target_mask is not None:
        targets = targets.masked_fill(~target_mask[1:], IGNORE_INDEX)
    labels[:length] = targets
    attention_mask[:length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack samples ([T] each) into a batch ([B, T] each)."""
    return {key: torch.stack([sample[key] for sample in samples]) for key in BATCH_KEYS}


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """Which positions have a target: labels that are not IGNORE_INDEX (padding never does)."""
    return labels != IGNORE_INDEX


def target_tokens(batch: Batch) -> torch.Tensor:
    """Trained target tokens in a batch, as a 0-dim tensor (reading it is the caller's choice)."""
    return target_mask(batch["labels"]).sum()


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items; the last may be shorter."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
