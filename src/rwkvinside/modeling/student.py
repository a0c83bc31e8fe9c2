"""The student checkpoint: the folder a stage writes and the next stage, export and eval read.

    config.json          the teacher's Hugging Face config (the architecture around the mixers)
    rwkvinside.json      conversion spec and provenance (teacher, stages run, tokens seen)
    model.safetensors    every weight of the hybrid model, students in the attention slots
    tokenizer files      as the teacher's tokenizer saves them

Written into a temporary sibling folder and renamed into place, so a crash mid-save leaves any
earlier folder intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rwkvinside.errors import UserError, writing_into
from rwkvinside.modeling.hybrid import ConversionSpec, HybridModel

METADATA_FILE = "rwkvinside.json"
WEIGHTS_FILE = "model.safetensors"
# 2: the first converted layer has no value-residual weights (v0, v1, v2): it produces v_first.
FORMAT_VERSION = 2


def replace_folder(tmp: Path, final: Path) -> None:
    """Move a fully written `tmp` folder to `final`, replacing any older one."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_student(model: HybridModel, tokenizer, folder: Path, provenance: dict[str, Any],
                 weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write the student (teacher attentions dropped first) atomically to `folder`.

    `weights` is the language model's state dict where the model's own tensors are not whole
    (ZeRO-3 partitions them; the engine gathers them); by default the model's state dict.
    """
    if model.aligning:
        model.drop_teacher_attention()
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with writing_into(tmp, f"the student to {folder}",
                      "free disk space or choose another --output; earlier checkpoints are intact"):
        model.config.to_json_file(tmp / "config.json")
        spec = model.spec
        metadata = {
            "format": FORMAT_VERSION,
            "conversion": {"layers": list(model.converted_layers), "head_size": spec.head_size,
                           "init": spec.init},
            **provenance,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
        state = untied_state_dict(model.model.state_dict() if weights is None else weights)
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_folder(tmp, folder)


def untied_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict on the CPU, ready for safetensors: a tensor shared under two names (tied
    embeddings) is copied for its second name, and only then, not the whole model."""
    state, seen = {}, set()
    for name, tensor in weights.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        state[name] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return state


def read_metadata(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / METADATA_FILE
    if not folder.is_dir() or not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"'{folder}' is not a student checkpoint (it needs {METADATA_FILE} and {WEIGHTS_FILE}); "
                        "give the folder a stage wrote (e.g. runs/<run>/stage1/student)")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is corrupt (not JSON); re-run the stage that wrote it") from None
    if metadata.get("format") != FORMAT_VERSION:
        raise UserError(f"'{folder}' holds a student of format {metadata.get('format')}; this rwkvinside reads "
                        f"format {FORMAT_VERSION}: re-run the stage that wrote it with this version")
    return metadata


def teacher_config(folder: Path):
    """The architecture around the mixers: a checkpoint's config.json, or the teacher config inside an
    exported folder's (`rwkvinside export`, which also writes rwkvinside.json)."""
    from transformers import AutoConfig

    from rwkvinside.export.configuration import RWKVInsideConfig, is_exported_folder

    if is_exported_folder(folder):
        return RWKVInsideConfig.from_pretrained(folder).text_config
    return AutoConfig.from_pretrained(folder)


def load_student(folder: Path, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> tuple[HybridModel, Any, dict[str, Any]]:
    """(model in stage 2/3 mode, tokenizer, metadata) from a student checkpoint or exported folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    metadata = read_metadata(folder)
    conversion = metadata["conversion"]
    config = teacher_config(folder)
    skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    spec = ConversionSpec(layers=tuple(conversion["layers"]), head_size=conversion["head_size"], init="rwkv")
    model = HybridModel(skeleton, spec, align=False)
    try:
        state = load_file(folder / WEIGHTS_FILE, device=str(device))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{folder / WEIGHTS_FILE} is corrupt or unreadable ({error}); "
                        "re-run the stage that wrote it") from None
    result = model.model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                                         strict=False)
    # An exported folder leaves out a tied LM head (transformers saves the shared tensor once).
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in result.missing_keys if "rotary_emb" not in k and k not in tied]
    if missing or result.unexpected_keys:
        problem = f"missing {missing[0]}" if missing else f"unexpected {result.unexpected_keys[0]}"
        raise UserError(f"{folder / WEIGHTS_FILE} does not match its config ({problem}); "
                        "re-run the stage that wrote it")
    if config.tie_word_embeddings:
        model.model.tie_weights()
    model.model.eval()
    # Given the config, the tokenizer need not read config.json (an exported folder's names remote code).
    tokenizer = (AutoTokenizer.from_pretrained(folder, config=config)
                 if (folder / "tokenizer_config.json").is_file() else None)
    return model, tokenizer, metadata
