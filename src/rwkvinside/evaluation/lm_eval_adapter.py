"""lm-evaluation-harness support: `rwkvinside` as an lm-eval model type.

An exported folder already works with lm-eval's own `hf` model type:

    lm_eval --model hf --model_args pretrained=EXPORTED_DIR,trust_remote_code=True --tasks ...

This adapter also takes a student folder or a run folder, loaded with rwkvinside's own class (no
remote code):

    import rwkvinside.evaluation.lm_eval_adapter  # registers "rwkvinside"
    lm_eval.simple_evaluate(model="rwkvinside", model_args={"pretrained": FOLDER}, tasks=[...])

Importing this module imports lm_eval (`pip install 'rwkvinside[eval]'`); nothing else in rwkvinside does.
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from rwkvinside.generation.loading import load_model


@register_model("rwkvinside")
class RWKVInsideLM(HFLM):
    """HFLM over an RWKVInside student: a student folder, an exported folder or a run folder."""

    def __init__(self, pretrained: str, **kwargs) -> None:
        device, dtype = kwargs.pop("device", "auto"), kwargs.pop("dtype", "auto")
        model, tokenizer, _ = load_model(pretrained, device, dtype)
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", **kwargs)
