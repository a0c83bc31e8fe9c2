"""`rwkvinside eval`: a student and its teacher side by side.

Per held-out file: perplexity of both, how often their next-token argmax agree, mean KL(teacher ||
student). Then passkey retrieval at 1x, 2x, 4x and 8x the training length. Returns the report dict
of `report.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rwkvinside.errors import UserError
from rwkvinside.data import pad_id
from rwkvinside.evaluation.compare import compare_on_file
from rwkvinside.evaluation.passkey import ANSWER_TOKENS, passkey_recall
from rwkvinside.generation.loading import load_model
from rwkvinside.modeling.loading import load_teacher

logger = logging.getLogger(__name__)

PASSKEY_MULTIPLES = (1, 2, 4, 8)
DEFAULT_SEQ_LEN = 512  # the distillation default, for students whose training length is unknown


def passkey_lengths(seq_len: int, lengths: Sequence[int] | None) -> list[int]:
    """The passkey context lengths in tokens: the given ones, or 1x, 2x, 4x, 8x seq_len."""
    lengths = list(lengths) if lengths else [m * seq_len for m in PASSKEY_MULTIPLES]
    bad = [n for n in lengths if n <= 0]
    if bad:
        raise UserError(f"passkey length {bad[0]} is not a positive number of tokens; give lengths >= 1 "
                        "(or a positive --seq-len)")
    return lengths


def _generator(model: nn.Module, pad: int):
    """prompt ids [1, T] -> the greedy continuation [1, ANSWER_TOKENS] (transformers' generate)."""
    device = next(model.parameters()).device

    def generate(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(device)
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS,
                                do_sample=False, use_cache=True, pad_token_id=pad)
        return output[:, ids.shape[1]:]

    return generate


def _load_teacher(source: str | None, dtype: torch.dtype,
                  device: torch.device) -> tuple[nn.Module | None, str | None]:
    if source is None:
        logger.warning("no teacher given or recorded in the checkpoint; evaluating the student alone")
        return None, None
    teacher, _ = load_teacher(source, dtype=dtype, device=device)
    return teacher, source


def evaluate(model_folder: str | Path, data: Sequence[str | Path], teacher: str | None = None,
             seq_len: int | None = None, lengths: Sequence[int] | None = None, trials: int = 5,
             batch_size: int = 1, max_tokens: int = 0, device: str = "auto",
             dtype: str = "auto") -> dict[str, Any]:
    """The report for a student (a student, exported or run folder) against its teacher.

    teacher: a --teacher source; None takes the one recorded in the checkpoint.
    seq_len: the training length (windows for perplexity, unit of the passkey lengths); None takes
        the one recorded, else DEFAULT_SEQ_LEN. lengths: passkey lengths in tokens (default 1x-8x seq_len).
    max_tokens: scored target tokens per file (0: all).
    """
    if seq_len is not None and seq_len <= 0:
        raise UserError(f"--seq-len must be a positive number of tokens, not {seq_len}")
    student, tokenizer, metadata = load_model(model_folder, device, dtype)
    seq_len = seq_len or student.config.trained_context or DEFAULT_SEQ_LEN
    lengths = passkey_lengths(seq_len, lengths)
    param = student.lm_head.weight
    teacher_model, teacher_source = _load_teacher(teacher or metadata.get("teacher"), param.dtype,
                                                  param.device)

    files = []
    for path in data:
        logger.info("scoring %s", path)
        files.append(compare_on_file(Path(path), student, teacher_model, tokenizer, seq_len, batch_size,
                                     param.device, max_tokens))

    pad = pad_id(tokenizer)
    teacher_context = teacher_model.config.max_position_embeddings if teacher_model is not None else None
    rows = []
    for length in lengths:
        logger.info("passkey at %d tokens", length)
        row = {"tokens": length, "multiple": length / seq_len,
               "student": passkey_recall(_generator(student, pad), tokenizer, length, trials),
               "teacher": None, "past_teacher_context": bool(teacher_context and length > teacher_context)}
        if teacher_model is not None:
            row["teacher"] = passkey_recall(_generator(teacher_model, pad), tokenizer, length, trials)
        rows.append(row)
    return {"model": str(model_folder), "run": metadata.get("run"), "teacher": teacher_source, "seq_len": seq_len,
            "teacher_context": teacher_context, "files": files, "passkey": {"trials": trials, "rows": rows}}
