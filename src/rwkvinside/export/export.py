"""`rwkvinside export`: a student as a standard Hugging Face folder.

    config.json                  RWKVInsideConfig, with auto_map naming the generated code
    configuration_rwkvinside.py  generated from the package (codegen.py)
    modeling_rwkvinside.py       generated from the package (codegen.py)
    model.safetensors            the weights, under the teacher's own parameter names
    generation_config.json       from the teacher config's special tokens
    tokenizer files              with the chat template
    rwkvinside.json              provenance, so the folder reads back like any student folder
    README.md                    model card: teacher, stages, tokens, measured retention

It is the student folder in the chosen dtype plus the generated code and the card:
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it with only torch and
transformers installed, and rwkvinside loads it with its own class. The folder is written beside
the target and renamed into place.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rwkvinside import __version__
from rwkvinside.config import DTYPES
from rwkvinside.errors import UserError
from rwkvinside.export.card import model_card
from rwkvinside.export.codegen import CONFIGURATION_FILE, MODELING_FILE, write_remote_code
from rwkvinside.modeling.student_folder import load_student, new_folder_for, resolve_student_folder, write_student

logger = logging.getLogger(__name__)

AUTO_MAP = {
    "AutoConfig": f"{CONFIGURATION_FILE.removesuffix('.py')}.RWKVInsideConfig",
    "AutoModelForCausalLM": f"{MODELING_FILE.removesuffix('.py')}.RWKVInsideForCausalLM",
}


def export_student(checkpoint: str | Path, output: str | Path, dtype: str = "bf16", overwrite: bool = False,
                   evaluation: dict[str, Any] | None = None, distillation: dict[str, Any] | None = None) -> Path:
    """Write the exported folder for a student (a student or run folder); returns `output`.

    evaluation, distillation: an `rwkvinside eval` report and the run's report.json for the model card.
    """
    output = Path(output)
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise UserError(f"output folder '{output}' already exists; choose another --output or pass "
                        "--overwrite")
    checkpoint = resolve_student_folder(checkpoint)
    student, tokenizer, metadata = load_student(checkpoint, dtype=getattr(torch, DTYPES[dtype]))
    if tokenizer is None:
        raise UserError(f"the student {checkpoint} has no tokenizer files; an exported model needs them "
                        "(copy the teacher's tokenizer files into it)")
    student.config.auto_map = AUTO_MAP
    provenance = {key: value for key, value in metadata.items() if key != "format"}
    provenance["export"] = {"dtype": dtype, "rwkvinside": __version__, "source": str(checkpoint)}
    with new_folder_for(output, "free disk space or choose another --output") as tmp:
        write_student(student, tokenizer, tmp, provenance)
        write_remote_code(tmp)
        (tmp / "README.md").write_text(model_card(student.config, provenance, evaluation, distillation),
                                       encoding="utf-8")
    logger.info("exported %s to %s (%s)", checkpoint, output, dtype)
    return output
