"""The model class of an exported folder (the tail of the generated `modeling_rwkvinside.py`).

`RWKVInsideForCausalLM` is the teacher's own architecture, built by transformers from the stored
teacher config, with the converted layers' attention replaced by the toolkit's RWKV-7 students.
Its parameter names are the teacher's ("model.layers.0.self_attn.mixer.x_r", "lm_head.weight"),
so a student checkpoint's weights load into it unchanged. `codegen.py` inlines everything this
module imports from rwkvinside, so the exported file needs only torch and transformers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from rwkvinside.export.configuration import RWKVInsideConfig
from rwkvinside.modeling.hybrid import ConversionSpec, ForwardContext, build_students, validate_spec
from rwkvinside.modeling.state import CACHE_KEYWORD, RecurrentCache, take_cache
from rwkvinside.modeling.teachers import FAMILIES, AttentionGeometry, decoder_layers, set_attention
from rwkvinside.modeling.time_mixer import RWKV7TimeMixer


class RWKVInsidePreTrainedModel(PreTrainedModel):
    config_class = RWKVInsideConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The RWKV-7 initialisation for time mixers, transformers' for the teacher's modules."""
        if isinstance(module, RWKV7TimeMixer):
            module.reset_parameters()
        else:
            super()._init_weights(module)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # `generate` must not make a plain DynamicCache: `forward` makes a RecurrentCache instead.
        return False


class RWKVInsideForCausalLM(RWKVInsidePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RWKVInsideConfig):
        super().__init__(config)
        teacher = AutoModelForCausalLM.from_config(config.text_config)
        family = FAMILIES[config.text_config.model_type]
        geometry = AttentionGeometry.of(config.text_config)
        spec = ConversionSpec(layers=tuple(config.rwkv_layers), head_size=config.head_size, init="rwkv")
        # One context per model: v_first and the padding mask of the current forward pass.
        self.context = ForwardContext()
        students = build_students(teacher, family, geometry, validate_spec(spec, family, geometry), spec,
                                  self.context)
        decoder = decoder_layers(teacher)
        for i, student in students.items():
            set_attention(decoder[i], family, student)
        self.model = teacher.base_model
        self.lm_head = teacher.get_output_embeddings()
        self.context.follow(self.model)
        self.post_init()

    def new_cache(self) -> RecurrentCache:
        """An empty generation cache: recurrent states for the converted layers, keys/values for the rest."""
        return RecurrentCache(self.config.text_config, self.config.rwkv_layers)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """As the teacher's *ForCausalLM.forward. input_ids: [B, T]; attention_mask: [B, T], or
        [B, past + T] with a cache (`cache`, or `past_key_values` before transformers 5.24), which is
        made here when use_cache and none is given. Returns logits [B, T or logits_to_keep, V]."""
        use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
        cache = take_cache(kwargs)
        if use_cache and cache is None:
            cache = self.new_cache()
        kwargs[CACHE_KEYWORD] = cache
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden_states = outputs.last_hidden_state
        # Only the positions whose logits are asked for (generate asks for the last one).
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.text_config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions,
                                      **{CACHE_KEYWORD: getattr(outputs, CACHE_KEYWORD)})
