"""The configuration of an exported model (becomes `configuration_rwkvinside.py` in the folder).

Only transformers is imported here: the exported folder must load where rwkvinside is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, PreTrainedConfig


class RWKVInsideConfig(PreTrainedConfig):
    r"""A teacher's Hugging Face architecture in which some attention layers are RWKV-7 time mixers.

    Args:
        text_config (`dict` or `PreTrainedConfig`):
            The teacher's own configuration (Llama, Qwen2, Qwen3, Mistral): everything around the mixers.
        rwkv_layers (`list[int]`):
            The decoder layers whose attention is an RWKV-7 time mixer; the others keep softmax attention.
        head_size (`int`, *optional*):
            The time mixers' head size; None means the teacher's head_dim.
        trained_context (`int`, *optional*):
            The longest sequence the student was distilled on, if known.
    """

    model_type = "rwkvinside"
    text_config: dict | PreTrainedConfig | None = None
    rwkv_layers: list[int] | None = None
    head_size: int | None = None
    trained_context: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.text_config, dict):
            text_config = dict(self.text_config)
            self.text_config = AutoConfig.for_model(text_config.pop("model_type"), **text_config)
        if self.text_config is not None:
            # transformers ties the LM head to the embeddings by the outer config's flag.
            self.tie_word_embeddings = self.text_config.tie_word_embeddings
        super().__post_init__(**kwargs)


def is_exported_folder(folder: Path) -> bool:
    """Whether `folder` holds an exported model (its config.json is an RWKVInsideConfig)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text(encoding="utf-8")).get("model_type") == RWKVInsideConfig.model_type
