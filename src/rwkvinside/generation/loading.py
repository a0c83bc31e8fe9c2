"""Loading a student to generate with, and the warnings about prompts longer than it ever saw."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rwkvinside.config import resolve_device, resolve_dtype
from rwkvinside.errors import UserError
from rwkvinside.modeling.student import RWKVInsideForCausalLM
from rwkvinside.modeling.student_folder import load_student

logger = logging.getLogger(__name__)


def load_model(folder: str | Path, device: str = "auto",
               dtype: str = "auto") -> tuple[RWKVInsideForCausalLM, Any, dict[str, Any]]:
    """(student, tokenizer, provenance) from a student folder, an exported folder or a run folder,
    ready to generate."""
    where = resolve_device(device)
    model, tokenizer, metadata = load_student(Path(folder), dtype=resolve_dtype(dtype, where), device=where)
    if tokenizer is None:
        raise UserError(f"'{folder}' has no tokenizer files; copy the teacher's tokenizer files into it")
    return model, tokenizer, metadata


def warn_if_longer_than_seen(total_tokens: int, model: RWKVInsideForCausalLM) -> None:
    """Warn (never fail) when a sequence goes past what the student was trained on, or past the
    teacher's own context for the attention layers it kept."""
    trained = model.config.trained_context
    if trained and total_tokens > trained:
        logger.warning("the sequence (%d tokens with the new ones) is longer than the %d-token sequences "
                       "the student was distilled on; quality past that length is untested", total_tokens,
                       trained)
    positions = model.config.max_position_embeddings
    kept_attention = len(model.rwkv_layers) < model.config.num_hidden_layers
    if kept_attention and positions and total_tokens > positions:
        logger.warning("the sequence (%d tokens) is longer than the teacher's context of %d tokens, which "
                       "the layers kept as attention were trained for", total_tokens, positions)
