"""Student against teacher on held-out text: perplexity of each, next-token agreement, KL(teacher || student).

Both read the same windows (`heldout_batches`, the training batch contract); the LM heads run a
chunk of the sequence at a time, so full-vocabulary logits never exist for a whole window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkvinside.data import heldout_batches
from rwkvinside.distill.losses import IGNORE_INDEX

HiddenFn = Callable[[Tensor, Tensor], Tensor]  # (input_ids, attention_mask) -> final hidden states [B, T, C]


@dataclass
class Side:
    """A model under evaluation: its final hidden states and its LM head."""

    hidden: HiddenFn
    head: nn.Module


@dataclass
class Totals:
    """Sums over target tokens."""

    tokens: int = 0
    student_nll: float = 0.0
    teacher_nll: float = 0.0
    agreements: int = 0
    kl: float = 0.0

    def add(self, other: Totals) -> None:
        self.tokens += other.tokens
        self.student_nll += other.student_nll
        self.teacher_nll += other.teacher_nll
        self.agreements += other.agreements
        self.kl += other.kl


def _chunk_totals(student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor) -> Totals:
    """Sums over one chunk. logits: [B, t, V] float32; labels: [B, t] (IGNORE_INDEX where no target)."""
    mask = labels != IGNORE_INDEX
    targets = labels.clamp(min=0)[..., None]
    student_logp = F.log_softmax(student_logits, dim=-1)
    totals = Totals(tokens=int(mask.sum()),
                    student_nll=float(-(student_logp.gather(-1, targets)[..., 0] * mask).sum()))
    if teacher_logits is not None:
        teacher_logp = F.log_softmax(teacher_logits, dim=-1)
        totals.teacher_nll = float(-(teacher_logp.gather(-1, targets)[..., 0] * mask).sum())
        same = student_logits.argmax(-1) == teacher_logits.argmax(-1)
        totals.agreements = int((same & mask).sum())
        kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # [B, t]
        totals.kl = float((kl * mask).sum())
    return totals


@torch.no_grad()
def compare_on_file(path: Path, student: Side, teacher: Side | None, tokenizer, seq_len: int, batch_size: int,
                    device: torch.device, max_tokens: int = 0, chunk: int = 256) -> dict[str, Any]:
    """Scores of one text file: student (and teacher) perplexity, agreement and mean KL per target token.

    max_tokens: stop after this many target tokens (0: the whole file).
    """
    totals = Totals()
    for batch in heldout_batches([path], tokenizer, seq_len, batch_size=batch_size):
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        student_hidden = student.hidden(ids, mask)
        teacher_hidden = teacher.hidden(ids, mask) if teacher is not None else None
        for start in range(0, labels.shape[1], chunk):
            piece = slice(start, start + chunk)
            totals.add(_chunk_totals(
                student.head(student_hidden[:, piece]).float(),
                teacher.head(teacher_hidden[:, piece]).float() if teacher is not None else None,
                labels[:, piece]))
        if max_tokens and totals.tokens >= max_tokens:
            break
    n = max(totals.tokens, 1)
    return {
        "path": str(path),
        "tokens": totals.tokens,
        "student_ppl": math.exp(totals.student_nll / n),
        "teacher_ppl": math.exp(totals.teacher_nll / n) if teacher is not None else None,
        "agreement": totals.agreements / n if teacher is not None else None,
        "kl": totals.kl / n if teacher is not None else None,
    }
