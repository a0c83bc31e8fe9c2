"""`rwkvinside export`: a student checkpoint as a standard Hugging Face folder.

    config.json                  RWKVInsideConfig: the teacher config, the converted layers, auto_map
    configuration_rwkvinside.py  generated from the package (codegen.py)
    modeling_rwkvinside.py       generated from the package (codegen.py)
    model.safetensors            the weights, under the teacher's own parameter names
    generation_config.json       from the teacher config's special tokens
    tokenizer files              with the chat template
    rwkvinside.json              conversion and provenance, so `load_student` reads the folder back
    README.md                    model card: teacher, stages, tokens, measured retention

`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it with only torch and
transformers installed. The folder is written beside the target and renamed into place.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from rwkvinside import __version__
from rwkvinside.errors import UserError
from rwkvinside.export.card import model_card
from rwkvinside.export.codegen import CONFIGURATION_FILE, MODELING_FILE, write_remote_code
from rwkvinside.export.configuration import RWKVInsideConfig
from rwkvinside.export.modeling import RWKVInsideForCausalLM
from rwkvinside.modeling.hybrid import HybridModel
from rwkvinside.modeling.student import METADATA_FILE, load_student, replace_folder

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
AUTO_MAP = {
    "AutoConfig": f"{CONFIGURATION_FILE.removesuffix('.py')}.RWKVInsideConfig",
    "AutoModelForCausalLM": f"{MODELING_FILE.removesuffix('.py')}.RWKVInsideForCausalLM",
}


def trained_context(folder: Path, metadata: dict[str, Any]) -> int | None:
    """The sequence length the student was distilled on: from its metadata, or from the run's
    config.yaml when the checkpoint sits in a run folder (runs/<run>/stage<N>/student)."""
    if metadata.get("trained_context"):
        return int(metadata["trained_context"])
    run_config = Path(folder).resolve().parent.parent / "config.yaml"
    if run_config.is_file():
        import yaml

        config = yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}
        seq_len = config.get("data", {}).get("seq_len")
        return int(seq_len) if seq_len else None
    return None


def to_hf_model(model: HybridModel, context: int | None = None) -> RWKVInsideForCausalLM:
    """The student as an RWKVInsideForCausalLM (same weights, same logits), in the student's dtype."""
    text_config = model.config.to_dict()
    text_config["use_cache"] = True  # generation caches by default; training had it off
    config = RWKVInsideConfig(text_config=text_config, rwkv_layers=list(model.converted_layers),
                              head_size=model.spec.head_size, trained_context=context)
    dtype = model.lm_head.weight.dtype
    hf_model = RWKVInsideForCausalLM(config).to(dtype)
    hf_model.load_state_dict(model.model.state_dict())
    return hf_model.eval()


def export_student(checkpoint: Path, output: Path, dtype: str = "bf16", overwrite: bool = False) -> Path:
    """Write the exported folder for a student checkpoint; returns `output`."""
    checkpoint, output = Path(checkpoint), Path(output)
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise UserError(f"output folder '{output}' already exists; choose another --output or pass "
                        "--overwrite")
    model, tokenizer, metadata = load_student(checkpoint)
    if tokenizer is None:
        raise UserError(f"the student checkpoint {checkpoint} has no tokenizer files; an exported model "
                        "needs them (copy the teacher's tokenizer files into the checkpoint)")
    context = trained_context(checkpoint, metadata)
    hf_model = to_hf_model(model, context).to(DTYPES[dtype])
    hf_model.config.auto_map = AUTO_MAP

    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hf_model.save_pretrained(tmp)
        write_remote_code(tmp)
        tokenizer.save_pretrained(tmp)
        exported = {**metadata, "trained_context": context,
                    "export": {"dtype": dtype, "rwkvinside": __version__, "source": str(checkpoint)}}
        (tmp / METADATA_FILE).write_text(json.dumps(exported, indent=2), encoding="utf-8")
        (tmp / "README.md").write_text(model_card(hf_model.config, exported, checkpoint), encoding="utf-8")
        replace_folder(tmp, output)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write {output} ({error.strerror or error}); free disk space or choose "
                        "another --output") from None
    logger.info("exported %s to %s (%s)", checkpoint, output, dtype)
    return output
