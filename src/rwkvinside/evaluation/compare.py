"""Student against teacher on held-out text: perplexity of each, next-token agreement, KL(teacher || student).

Both read the same windows (`heldout_batches`, the training batch contract) and are scored by the
training loss's own function (`rwkvinside.scoring.score`), so evaluation and training cannot
disagree about what a perplexity or a KL is.

The same figures are also given for the start of each window alone, its first WINDOW_START target
tokens: there the teacher's attention has almost no context either, while a recurrent student
begins from an empty state with an arbitrary first token, which a student that only ever saw
windows led by the EOS (`data.eos_first`) has never had to do.
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

SUMS = ("tokens", "student_ce", "teacher_ce", "agreement", "kl")
WINDOW_START = 32  # target tokens at the start of a window, also scored on their own


@torch.no_grad()
def compare(student: nn.Module, teacher: nn.Module | None, batches: Iterable[dict[str, Tensor]],
            device: torch.device, max_tokens: int = 0, chunk: int = 256) -> dict[str, Any]:
    """Scores over the batches: the student's (and the teacher's) perplexity, and with a teacher the
    share of positions where their argmaxes agree and the mean KL per target token; under "start",
    the same over each window's first WINDOW_START target tokens. Both models are causal LMs (a
    student or a Hugging Face model); stops after max_tokens target tokens (0: all)."""
    parts = {"start": slice(0, WINDOW_START), "rest": slice(WINDOW_START, None)}
    totals = {part: dict.fromkeys(SUMS, 0.0) for part in parts}
    for batch in batches:
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        student_hidden = final_hidden_states(student, ids, mask)
        teacher_hidden = final_hidden_states(teacher, ids, mask) if teacher is not None else None
        sums = {}  # (part, name) -> a scalar on the device, read back once a batch
        for part, where in parts.items():
            scores = score(student_hidden[:, where], student.get_output_embeddings(), labels[:, where],
                           None if teacher is None else teacher_hidden[:, where],
                           None if teacher is None else teacher.get_output_embeddings(), chunk=chunk)
            sums.update({(part, name): value for name in SUMS if (value := getattr(scores, name)) is not None})
        for (part, name), value in zip(sums, torch.stack([v.float() for v in sums.values()]).tolist()):
            totals[part][name] += value
        if max_tokens and sum(part["tokens"] for part in totals.values()) >= max_tokens:
            break
    whole = {name: totals["start"][name] + totals["rest"][name] for name in SUMS}
    return {**_figures(whole, teacher is not None), "start": _figures(totals["start"], teacher is not None)}


def _figures(sums: dict[str, float], with_teacher: bool) -> dict[str, Any]:
    tokens = int(sums["tokens"])
    n = max(tokens, 1)
    return {
        "tokens": tokens,
        "student_ppl": math.exp(sums["student_ce"] / n) if tokens else float("nan"),
        "teacher_ppl": math.exp(sums["teacher_ce"] / n) if with_teacher and tokens else None,
        "agreement": sums["agreement"] / n if with_teacher else None,
        "kl": sums["kl"] / n if with_teacher else None,
    }


def compare_on_file(path: Path, student: nn.Module, teacher: nn.Module | None, tokenizer, seq_len: int,
                    batch_size: int, device: torch.device, max_tokens: int = 0, chunk: int = 256) -> dict[str, Any]:
    """`compare` over one text file in windows of seq_len tokens, each scored without the previous
    window's context."""
    batches = heldout_batches([path], tokenizer, seq_len, batch_size=batch_size)
    return {"path": str(path), **compare(student, teacher, batches, device, max_tokens, chunk)}
