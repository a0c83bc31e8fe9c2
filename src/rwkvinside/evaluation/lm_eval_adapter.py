"""lm-evaluation-harness support: `rwkvinside` as an lm-eval model type.

An exported folder already works with lm-eval's own `hf` model type:

    lm_eval --model hf --model_args pretrained=EXPORTED_DIR,trust_remote_code=True --tasks ...

This adapter also takes a student checkpoint folder (converted in memory, nothing written):

    import rwkvinside.evaluation.lm_eval_adapter  # registers "rwkvinside"
    lm_eval.simple_evaluate(model="rwkvinside", model_args={"pretrained": CHECKPOINT_DIR}, tasks=[...])

Importing this module imports lm_eval (`pip install 'rwkvinside[eval]'`); nothing else in rwkvinside does.
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from rwkvinside.export.configuration import is_exported_folder
from rwkvinside.modeling.student import METADATA_FILE


@register_model("rwkvinside")
class RWKVInsideLM(HFLM):
    """HFLM over an RWKVInside student: an exported folder, or a student checkpoint folder."""

    def __init__(self, pretrained: str, **kwargs) -> None:
        folder = Path(pretrained)
        kwargs["backend"] = "causal"
        if (folder / METADATA_FILE).is_file() and not is_exported_folder(folder):
            from rwkvinside.export.export import to_hf_model
            from rwkvinside.generation.loading import load_model

            device, dtype = kwargs.pop("device", "auto"), kwargs.pop("dtype", "auto")
            model, tokenizer, metadata = load_model(folder, device, dtype)
            super().__init__(pretrained=to_hf_model(model, metadata["trained_context"]), tokenizer=tokenizer,
                             **kwargs)
        else:
            super().__init__(pretrained=pretrained, trust_remote_code=True, **kwargs)
