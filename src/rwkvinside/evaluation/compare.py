"""Student against teacher on held-out text: perplexity of each, next-token agreement, KL(teacher || student).

Both read the same windows (`heldout_batches`, the training batch contract) and are scored by the
training loss's own function (`rwkvinside.scoring.score`), so evaluation and training cannot
disagree about what a perplexity or a KL is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rwkvinside.data import heldout_batches
from rwkvinside.scoring import final_hidden_states, score

SUMS = ("student_ce", "teacher_ce", "agreement", "kl")


@torch.no_grad()
def compare(student: nn.Module, teacher: nn.Module | None, batches: Iterable[dict[str, Tensor]],
            device: torch.device, max_tokens: int = 0, chunk: int = 256) -> dict[str, Any]:
    """Scores over the batches: the student's (and the teacher's) perplexity, and with a teacher the
    share of positions where their argmaxes agree and the mean KL per target token. Both models are
    causal LMs (a student or a Hugging Face model); stops after max_tokens target tokens (0: all)."""
    totals = dict.fromkeys(SUMS, 0.0)
    tokens = 0
    for batch in batches:
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        teacher_hidden = final_hidden_states(teacher, ids, mask) if teacher is not None else None
        scores = score(final_hidden_states(student, ids, mask), student.get_output_embeddings(), labels,
                       teacher_hidden, teacher.get_output_embeddings() if teacher is not None else None,
                       chunk=chunk)
        values = [getattr(scores, name) for name in SUMS]
        read = torch.stack([scores.tokens.float()] + [v.float() for v in values if v is not None]).tolist()
        tokens += int(read[0])
        for name, value in zip([n for n, v in zip(SUMS, values) if v is not None], read[1:]):
            totals[name] += value
        if max_tokens and tokens >= max_tokens:
            break
    n = max(tokens, 1)
    with_teacher = teacher is not None
    return {
        "tokens": tokens,
        "student_ppl": math.exp(totals["student_ce"] / n) if tokens else float("nan"),
        "teacher_ppl": math.exp(totals["teacher_ce"] / n) if with_teacher and tokens else None,
        "agreement": totals["agreement"] / n if with_teacher else None,
        "kl": totals["kl"] / n if with_teacher else None,
    }


def compare_on_file(path: Path, student: nn.Module, teacher: nn.Module | None, tokenizer, seq_len: int,
                    batch_size: int, device: torch.device, max_tokens: int = 0, chunk: int = 256) -> dict[str, Any]:
    """`compare` over one text file in windows of seq_len tokens, each scored without the previous
    window's context."""
    batches = heldout_batches([path], tokenizer, seq_len, batch_size=batch_size)
    return {"path": str(path), **compare(student, teacher, batches, device, max_tokens, chunk)}
