"""Perplexity on held-out text, for a student and its teacher on the same batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from rwkvinside.distill.losses import distill_terms

HiddenFn = Callable[[Tensor, Tensor], Tensor]  # (input_ids, attention_mask) -> final hidden [B, T, C]


def teacher_hidden_fn(teacher: nn.Module) -> HiddenFn:
    def hidden(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return teacher.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state
    return hidden


@torch.no_grad()
def perplexity(hidden: HiddenFn, head: nn.Module, batches: Iterable[dict[str, Tensor]], device: torch.device,
               max_tokens: int = 0, chunk: int = 256) -> tuple[float, int]:
    """(exp of the mean cross-entropy over target tokens, tokens scored); stops after max_tokens (0: all)."""
    total, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        terms = distill_terms(hidden(batch["input_ids"], batch["attention_mask"]), batch["labels"], head,
                              chunk=chunk)
        total += float(terms.student_ce)
        tokens += int(terms.tokens)
        if max_tokens and tokens >= max_tokens:
            break
    return (math.exp(total / tokens) if tokens else float("nan")), tokens
