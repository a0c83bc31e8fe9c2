"""Losses of the three stages, as pure functions.

Labels arrive already shifted by the data pipeline (labels[:, t] is the target of position t,
-100 where there is none), so nothing here shifts them again. The LM head is applied a chunk of
the sequence at a time under activation checkpointing: full-vocabulary logits never exist for the
whole batch at once, neither in the forward pass nor saved for the backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def mean_alignment_loss(per_layer: dict[int, Tensor]) -> Tensor:
    """Stage 1: the mean of the per-layer alignment losses."""
    return torch.stack(list(per_layer.values())).mean()


@dataclass
class DistillTerms:
    """Sums over the target tokens of one batch; divide by `tokens` for means."""

    kl: Tensor  # KL(teacher || student) * T^2, summed
    student_ce: Tensor
    teacher_ce: Tensor  # no gradient: the teacher's own loss, worth logging
    tokens: Tensor  # number of target tokens


def _chunk_terms(student_hidden: Tensor, teacher_hidden: Tensor | None, labels: Tensor,
                 student_head: nn.Module, teacher_head: nn.Module | None,
                 temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """KL, student CE and teacher CE summed over one chunk's target tokens. hidden: [B, t, C]"""
    mask = labels != IGNORE_INDEX  # [B, t]
    student_logits = student_head(student_hidden).float()  # [B, t, V]
    student_ce = F.cross_entropy(student_logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum")
    if teacher_hidden is None:
        zero = student_ce.new_zeros(())
        return zero, student_ce, zero
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden).float()
        teacher_ce = F.cross_entropy(teacher_logits.flatten(0, 1), labels.flatten(),
                                     ignore_index=IGNORE_INDEX, reduction="sum")
        teacher_logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    student_logp = F.log_softmax(student_logits / temperature, dim=-1)
    kl_per_token = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # [B, t]
    kl = (kl_per_token * mask).sum() * temperature**2
    return kl, student_ce, teacher_ce


def distill_terms(student_hidden: Tensor, labels: Tensor, student_head: nn.Module,
                  teacher_hidden: Tensor | None = None, teacher_head: nn.Module | None = None,
                  temperature: float = 1.0, chunk: int = 256) -> DistillTerms:
    """Stage 2 (with a teacher) and stage 3 (without): the loss terms, a sequence chunk at a time.

    student_hidden, teacher_hidden: [B, T, C] final hidden states; labels: [B, T], shifted.
    """
    totals = [student_hidden.new_zeros((), dtype=torch.float32) for _ in range(3)]
    for start in range(0, labels.shape[1], chunk):
        piece = slice(start, start + chunk)
        if not (labels[:, piece] != IGNORE_INDEX).any():
            continue
        terms = checkpoint(
            _chunk_terms,
            student_hidden[:, piece],
            None if teacher_hidden is None else teacher_hidden[:, piece],
            labels[:, piece], student_head, teacher_head, temperature,
            use_reentrant=False,
            # Under DeepSpeed ZeRO-3 the head weight seen by the recomputation is an empty
            # placeholder (shape [0]) once the head's forward has released it; the head's backward
            # gathers it whole again before the weight is used. torch's metadata check would
            # reject the placeholder.
            determinism_check="none",
        )
        totals = [total + term for total, term in zip(totals, terms)]
    kl, student_ce, teacher_ce = totals
    return DistillTerms(kl=kl, student_ce=student_ce, teacher_ce=teacher_ce.detach(),
                        tokens=(labels != IGNORE_INDEX).sum())
