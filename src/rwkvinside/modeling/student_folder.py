"""The student folder: what a stage writes and the next stage, export, generation and eval read.

    config.json          RWKVInsideConfig: the teacher's config, the converted layers, the trained context
    model.safetensors    the weights, under the teacher's own parameter names
    generation_config.json
    tokenizer files      as the teacher's tokenizer saves them (chat template included)
    rwkvinside.json      provenance: format, teacher, the stages run and their tokens, the run folder

It is `RWKVInsideForCausalLM.save_pretrained` plus the tokenizer and the provenance, so an exported
folder (the same plus generated code and a model card) loads through the same class. Written into a
temporary sibling folder and renamed into place, so a crash mid-save leaves any earlier folder intact.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from rwkvinside.errors import UserError, writing_into
from rwkvinside.modeling.configuration import RWKVInsideConfig
from rwkvinside.modeling.student import RWKVInsideForCausalLM

logger = logging.getLogger(__name__)

METADATA_FILE = "rwkvinside.json"
WEIGHTS_FILE = "model.safetensors"
# 3: config.json is an RWKVInsideConfig (the one student class). 2: config.json was the teacher's own,
# the converted layers were in rwkvinside.json; such a folder still loads (read in memory as a 3).
FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)
STAGE_FOLDERS = ("stage3", "stage2", "stage1")  # a run folder's students, the last stage first
STUDENT = "student"


def replace_folder(tmp: Path, final: Path) -> None:
    """Move a fully written `tmp` folder to `final`, replacing any older one."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_student(student: RWKVInsideForCausalLM, tokenizer, folder: Path, provenance: dict[str, Any],
                  weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write the student's files into the new folder `folder` (detach stage 1's teacher attentions first).

    `weights` is the student's state dict where the model's own tensors are not whole (ZeRO-3
    partitions them; the engine gathers them); by default the model's own.
    """
    student.save_pretrained(folder, state_dict=weights)
    metadata = {"format": FORMAT_VERSION, **provenance}
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_student(student: RWKVInsideForCausalLM, tokenizer, folder: Path, provenance: dict[str, Any],
                 weights: dict[str, torch.Tensor] | None = None) -> None:
    """`write_student` atomically: into a temporary sibling folder, then renamed into place."""
    folder = Path(folder)
    with new_folder_for(folder, "free disk space or choose another --output; earlier checkpoints are intact") as tmp:
        write_student(student, tokenizer, tmp, provenance, weights)


@contextmanager
def new_folder_for(folder: Path, fix: str) -> Iterator[Path]:
    """A fresh temporary sibling of `folder` to write into; once the block completes it replaces
    `folder`. A failure removes it and leaves `folder` as it was (a full disk: a one-line UserError)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with writing_into(tmp, str(folder), fix):
        yield tmp
        replace_folder(tmp, folder)


def resolve_student_folder(path: str | Path) -> Path:
    """A student folder as given, or the last stage's student of a run folder (named in a log line)."""
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        return path
    if (path / "run.json").is_file():
        for stage in STAGE_FOLDERS:
            student = path / stage / STUDENT
            if (student / METADATA_FILE).is_file():
                logger.info("using the student of %s in the run %s: %s", stage, path, student)
                return student
        raise UserError(f"the run '{path}' has no finished stage yet (no stageN/{STUDENT} folder); finish a "
                        f"stage first (rwkvinside distill --output {path} --resume)")
    raise UserError(f"'{path}' is neither a student folder (it needs {METADATA_FILE}) nor a run folder; give "
                    f"the --output of a distill run, a stage's {STUDENT} folder or an exported folder")


def read_metadata(folder: Path) -> dict[str, Any]:
    """The provenance of a student folder, checked; a run folder stands for its last stage's student."""
    folder = resolve_student_folder(folder)
    path = folder / METADATA_FILE
    if not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"'{folder}' has no {WEIGHTS_FILE}; re-run the stage that wrote it")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is corrupt (not JSON); re-run the stage that wrote it") from None
    if metadata.get("format") not in READABLE_FORMATS:
        raise UserError(f"'{folder}' holds a student of format {metadata.get('format')}; this rwkvinside reads "
                        f"formats {', '.join(map(str, READABLE_FORMATS))}: re-run the stage that wrote it with "
                        "this version")
    return metadata


def student_config(folder: Path, metadata: dict[str, Any]) -> RWKVInsideConfig:
    """The student's configuration; a format-2 folder's is made from its teacher config and metadata."""
    if metadata["format"] == FORMAT_VERSION:
        return RWKVInsideConfig.from_pretrained(folder)
    from transformers import AutoConfig

    conversion = metadata["conversion"]
    text_config = AutoConfig.from_pretrained(folder).to_dict()
    text_config["use_cache"] = True
    return RWKVInsideConfig(text_config=text_config, rwkv_layers=conversion["layers"],
                            head_size=conversion["head_size"], trained_context=metadata.get("trained_context"))


def load_student(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                 ) -> tuple[RWKVInsideForCausalLM, Any, dict[str, Any]]:
    """(student in eval mode, tokenizer or None, provenance) from a student folder, an exported
    folder or a run folder (its last stage's student)."""
    from transformers import AutoTokenizer

    folder = resolve_student_folder(folder)
    metadata = read_metadata(folder)
    config = student_config(folder, metadata)
    try:
        student, loading = RWKVInsideForCausalLM.from_pretrained(folder, config=config, dtype=dtype,
                                                                 output_loading_info=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{folder / WEIGHTS_FILE} does not load ({first_line}); re-run the stage that wrote "
                        "it") from None
    mismatch = sorted(loading["missing_keys"]) + sorted(loading["unexpected_keys"]) + sorted(
        str(key) for key in loading["mismatched_keys"])
    if mismatch:
        raise UserError(f"{folder / WEIGHTS_FILE} does not match its config (e.g. {mismatch[0]}); re-run the "
                        "stage that wrote it")
    student = student.to(device).eval()
    # Given the config, the tokenizer need not read config.json (an exported folder's names remote code).
    tokenizer = (AutoTokenizer.from_pretrained(folder, config=config.text_config)
                 if (folder / "tokenizer_config.json").is_file() else None)
    return student, tokenizer, metadata
