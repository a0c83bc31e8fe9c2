"""Student against teacher on held-out text: perplexity of each, next-token agreement, KL(teacher || student).

Both read the same windows (`heldout_batches`, the training batch contract) and are scored by the
training loss's own function (`rwkvinside.scoring.score`), so evaluation and training cannot
disagree about what a perplexity or a KL is.

The same figures are also given for parts of the targets, where a recurrent student and softmax
attention may part ways:
- "start": each window's first WINDOW_START target tokens. The teacher's attention has almost no
  context there either, while the student begins from an empty state with an arbitrary first token,
  which a student that only ever saw windows led by the EOS (`data.eos_first`) has never had to do.
- "seen" and "unseen": targets that the window's input already held at or before their position,
  which attention can copy from its context and a fixed-size state must have kept, and the others.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rwkvinside.data import IGNORE_INDEX, heldout_batches
from rwkvinside.scoring import final_hidden_states, score

SUMS = ("tokens", "student_ce", "teacher_ce", "agreement", "kl")
WINDOW_START = 32  # target tokens at the start of a window, also scored on their own


@torch.no_grad()
def compare(student: nn.Module, teacher: nn.Module | None, batches: Iterable[dict[str, Tensor]],
            device: torch.device, max_tokens: int = 0, chunk: int = 256) -> dict[str, Any]:
    """Scores over the batches: the student's (and the teacher's) perplexity, and with a teacher the
    share of positions where their argmaxes agree and the mean KL per target token; under "start",
    "seen" and "unseen", the same over those targets (the module docstring says which). Both models
    are causal LMs (a student or a Hugging Face model); stops after max_tokens target tokens (0: all)."""
    totals = {part: dict.fromkeys(SUMS, 0.0) for part in ("start", "rest", "seen")}
    for batch in batches:
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        student_hidden = final_hidden_states(student, ids, mask)
        teacher_hidden = final_hidden_states(teacher, ids, mask) if teacher is not None else None
        # Each part's targets: start and rest split the windows (no extra work), seen is a mask.
        parts = {"start": (slice(0, WINDOW_START), labels), "rest": (slice(WINDOW_START, None), labels),
                 "seen": (slice(None), labels.masked_fill(~seen_before(ids, labels), IGNORE_INDEX))}
        sums = {}  # (part, name) -> a scalar on the device, read back once a batch
        for part, (where, targets) in parts.items():
            scores = score(student_hidden[:, where], student.get_output_embeddings(), targets[:, where],
                           None if teacher is None else teacher_hidden[:, where],
                           None if teacher is None else teacher.get_output_embeddings(), chunk=chunk)
            sums.update({(part, name): value for name in SUMS if (value := getattr(scores, name)) is not None})
        for (part, name), value in zip(sums, torch.stack([v.float() for v in sums.values()]).tolist()):
            totals[part][name] += value
        if max_tokens and totals["start"]["tokens"] + totals["rest"]["tokens"] >= max_tokens:
            break
    whole = {name: totals["start"][name] + totals["rest"][name] for name in SUMS}
    unseen = {name: whole[name] - totals["seen"][name] for name in SUMS}
    with_teacher = teacher is not None
    return {**_figures(whole, with_teacher), "start": _figures(totals["start"], with_teacher),
            "seen": _figures(totals["seen"], with_teacher), "unseen": _figures(unseen, with_teacher)}


def seen_before(ids: Tensor, labels: Tensor) -> Tensor:
    """[B, T] bool: the target at t is a token the input already held at a position <= t. Each row's
    first position of every token it holds, then one comparison per target: memory B x vocabulary,
    not B x T x T."""
    batch, length = ids.shape
    positions = torch.arange(length, device=ids.device)
    vocabulary = int(torch.maximum(ids.max(), labels.max())) + 1
    first = torch.full((batch, vocabulary), length, dtype=torch.long, device=ids.device)
    first.scatter_reduce_(1, ids, positions.expand(batch, -1), reduce="amin")
    targets = labels != IGNORE_INDEX
    return (first.gather(1, labels.clamp(min=0)) <= positions) & targets


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
