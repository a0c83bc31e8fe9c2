"""Loading a model to generate with, and the warnings about prompts longer than it ever saw."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rwkvinside.errors import UserError
from rwkvinside.export.export import trained_context
from rwkvinside.modeling.hybrid import HybridModel
from rwkvinside.modeling.student import load_student

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # as lm-eval and torch name them


def resolve_device(name: str) -> torch.device:
    """"auto": the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bf16 on a GPU, fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise UserError(f"--dtype must be auto or one of {', '.join(DTYPES)}, not '{name}'")
    return DTYPES[name]


def load_model(folder: str | Path, device: str = "auto",
               dtype: str = "auto") -> tuple[HybridModel, Any, dict[str, Any]]:
    """(model, tokenizer, metadata) from a student checkpoint or an exported folder, ready to generate.

    metadata gains "trained_context": the sequence length it was distilled on, if known.
    """
    where = resolve_device(device)
    model, tokenizer, metadata = load_student(Path(folder), dtype=resolve_dtype(dtype, where), device=where)
    if tokenizer is None:
        raise UserError(f"'{folder}' has no tokenizer files; copy the teacher's tokenizer files into it")
    metadata["trained_context"] = trained_context(Path(folder), metadata)
    return model, tokenizer, metadata


def warn_if_longer_than_seen(total_tokens: int, model: HybridModel, metadata: dict[str, Any]) -> None:
    """Warn (never fail) when a sequence goes past what the student was trained on, or past the
    teacher's own context for the attention layers it kept."""
    trained = metadata.get("trained_context")
    if trained and total_tokens > trained:
        logger.warning("the sequence (%d tokens with the new ones) is longer than the %d-token sequences "
                       "the student was distilled on; quality past that length is untested", total_tokens,
                       trained)
    positions = getattr(model.config, "max_position_embeddings", None)
    kept_attention = len(model.converted_layers) < model.config.num_hidden_layers
    if kept_attention and positions and total_tokens > positions:
        logger.warning("the sequence (%d tokens) is longer than the teacher's context of %d tokens, which "
                       "the layers kept as attention were trained for", total_tokens, positions)
