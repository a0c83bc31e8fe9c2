"""The model card (README.md) of an exported folder: what the student is, how it was made, how it scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rwkvinside.evaluation.report import markdown_tables
from rwkvinside.modeling.configuration import RWKVInsideConfig

USAGE = """\
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{path}", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True)
inputs = tokenizer("Once upon a time", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0]))
```

`generate` carries each RWKV-7 layer's state (a fixed-size matrix per head) instead of a key/value
cache, so those layers cost the same per token at any context length. On CUDA the WKV-7 kernels of
[flash-linear-attention](https://github.com/fla-org/flash-linear-attention) are required
(`pip install flash-linear-attention`); on the CPU plain PyTorch runs.
"""


def _layers(indices: list[int]) -> str:
    return ("layer " if len(indices) == 1 else "layers ") + ", ".join(map(str, indices))


def _stages(metadata: dict[str, Any]) -> list[str]:
    history = metadata.get("history") or []
    if not history:
        return ["(no distillation history recorded)"]
    lines = ["| stage | tokens | steps |", "|---|---|---|"]
    lines += [f"| {h['stage']} | {h['tokens']:,} | {h['steps']:,} |" for h in history]
    total = sum(h["tokens"] for h in history)
    return [*lines, "", f"{total:,} tokens in all."]


def _distill_summary(report: dict[str, Any]) -> list[str]:
    """One line per held-out file of the run's report: teacher, freshly converted and final student."""
    base = report.get("baseline") or {}
    stages = report.get("stages") or {}
    last = stages[max(stages, key=int)].get("heldout") or [] if stages else []
    by_file = [{Path(f["path"]).name: f["student_ppl"] for f in scores}
               for scores in (base.get("teacher") or [], base.get("fresh_student") or [], last)]
    teacher, fresh, final = by_file
    return [f"Held-out perplexity on {name} during distillation: teacher {teacher[name]:.2f}, freshly converted "
            f"student {fresh[name]:.2f}, final student {final[name]:.2f}." for name in final
            if name in teacher and name in fresh] + ([""] if final else [])


def model_card(config: RWKVInsideConfig, metadata: dict[str, Any], evaluation: dict[str, Any] | None = None,
               distillation: dict[str, Any] | None = None) -> str:
    """README.md text for an exported folder: `metadata` is the student's provenance, `evaluation` an
    `rwkvinside eval` report and `distillation` the run's report.json, where there are such."""
    layers = config.rwkv_layers
    total = config.text_config.num_hidden_layers
    kept = [i for i in range(total) if i not in layers]
    teacher = metadata.get("teacher", "unknown")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [rwkv, rwkv7, linear-attention, distillation, rwkvinside]",
        "---",
        "",
        f"# RWKV-7 student of {teacher}",
        "",
        f"The {config.text_config.model_type} architecture of `{teacher}` with {len(layers)} of its {total} "
        f"attention layers replaced by RWKV-7 time mixers ({_layers(layers)}), distilled "
        "with RWKVInside. "
        + (f"{_layers(kept).capitalize()} {'keeps' if len(kept) == 1 else 'keep'} softmax attention. "
           if kept else "No softmax attention is left. ")
        + (f"Trained on sequences of {config.trained_context} tokens." if config.trained_context else ""),
        "",
        "## Distillation",
        "",
        *_stages(metadata),
        "",
    ]
    if evaluation or distillation:
        lines += ["## Measured retention", ""]
        lines += _distill_summary(distillation) if distillation else []
        lines += markdown_tables(evaluation) if evaluation else []
    lines += ["## Usage", "", USAGE.format(path="PATH/TO/THIS/FOLDER")]
    return "\n".join(lines)
