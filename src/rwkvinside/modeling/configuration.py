"""The configuration of a student: a teacher's architecture with some attention layers as RWKV-7.

Only transformers is imported here: this module becomes `configuration_rwkvinside.py` in an
exported folder, which must load where rwkvinside is not installed.
"""

from __future__ import annotations

from typing import Any

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
        lead_token_id (`int`, *optional*):
            A token the student reads before every sequence it starts from an empty state (the EOS),
            just before the first real token; its output is dropped. None: no lead.

    Every attribute of the teacher's configuration reads through this one as well (`config.vocab_size`,
    `config.num_hidden_layers`, ...), as generic tools expect of a causal LM's config.
    """

    model_type = "rwkvinside"
    text_config: dict | PreTrainedConfig | None = None
    rwkv_layers: list[int] | None = None
    head_size: int | None = None
    trained_context: int | None = None
    lead_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.text_config, dict):
            text_config = dict(self.text_config)
            self.text_config = AutoConfig.for_model(text_config.pop("model_type"), **text_config)
        if self.text_config is not None:
            # transformers ties the LM head to the embeddings by the outer config's flag.
            self.tie_word_embeddings = self.text_config.tie_word_embeddings
        super().__post_init__(**kwargs)

    def __getattr__(self, name: str) -> Any:
        """Called only for names this config lacks: the teacher's configuration answers them."""
        text_config = self.__dict__.get("text_config")
        if name.startswith("_") or text_config is None:
            raise AttributeError(f"{type(self).__name__} has no attribute '{name}'")
        return getattr(text_config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        """A setting of the teacher's configuration (`config.use_cache = False`) is set there, where the
        model reads it; this config's own fields and properties, and new attributes, stay here."""
        text_config = self.__dict__.get("text_config")
        if (text_config is not None and not name.startswith("_") and name not in self.__dict__
                and not hasattr(type(self), name) and hasattr(text_config, name)):
            setattr(text_config, name, value)
        else:
            super().__setattr__(name, value)
