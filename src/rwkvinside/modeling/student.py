"""The student: a teacher's causal LM in which chosen attention layers are RWKV-7 time mixers.

`RWKVInsideForCausalLM` is the one student class. Training builds it from a teacher
(`modeling.convert`), a stage saves it with `save_pretrained`, the next stage, generation and
evaluation load it back with `from_pretrained`, and an export is the same folder plus this module
turned into remote code (`export.codegen`), which needs only torch and transformers.

It is the teacher's own architecture, built by transformers from the stored teacher config, with
the converted layers' attention replaced by `RWKVAttention`. Its parameter names are the teacher's
("model.layers.0.self_attn.mixer.x_r", "lm_head.weight").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from rwkvinside.errors import UserError
from rwkvinside.modeling.attention import ForwardContext, RWKVAttention, cache_of
from rwkvinside.modeling.configuration import RWKVInsideConfig
from rwkvinside.modeling.decode import decoding_plan, fixed_buffers_hold, recurrent_generate
from rwkvinside.modeling.state import CACHE_KEYWORD, RecurrentCache, take_cache
from rwkvinside.modeling.teachers import (AttentionGeometry, TeacherFamily, attention_of, compile_pointwise_blocks,
                                          decoder_layers, family_for, projection_biases, set_attention)
from rwkvinside.modeling.time_mixer import RWKV7TimeMixer, TimeMixerConfig


def check_rwkv_layers(layers: list[int] | tuple[int, ...] | None, num_layers: int) -> tuple[int, ...]:
    """The converted layers, sorted and unique; None means all of them."""
    if layers is None:
        return tuple(range(num_layers))
    layers = tuple(sorted(set(layers)))
    if not layers:
        raise UserError("no layer chosen to convert; give at least one layer index (or none for all)")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"layer index {bad[0]} is out of range: the teacher has {num_layers} layers "
                        f"(valid indices 0..{num_layers - 1})")
    return layers


def check_head_size(head_size: int | None, family: TeacherFamily, geometry: AttentionGeometry) -> int:
    """The student's head size (None: the teacher's head_dim); it must divide the attention width."""
    head_size = geometry.head_dim if head_size is None else head_size
    if head_size <= 0 or geometry.attention_size % head_size:
        raise UserError(f"head size {head_size} does not divide the attention width {geometry.attention_size}; "
                        f"choose a divisor such as {geometry.head_dim}")
    if family.qk_norms and head_size != geometry.head_dim:
        raise UserError(f"{family.name} normalises q and k per head of {geometry.head_dim}; "
                        f"the student's head size must be {geometry.head_dim}, not {head_size}")
    return head_size


def mixer_config(attention: nn.Module, family: TeacherFamily, geometry: AttentionGeometry, layer_idx: int,
                 head_size: int, value_residual: bool) -> TimeMixerConfig:
    """The shape of the time mixer that takes the place of `attention` (the teacher's, or its skeleton)."""
    return TimeMixerConfig(
        hidden_size=geometry.hidden_size,
        num_heads=geometry.attention_size // head_size,
        head_size=head_size,
        layer_id=layer_idx,
        num_layers=geometry.num_layers,
        bias=projection_biases(attention, family),
        qk_norm_eps=geometry.rms_norm_eps if family.qk_norms else None,
        value_residual=value_residual,
    )


def with_lead(lead: int, input_ids: Tensor, attention_mask: Tensor | None
              ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """input_ids [B, T] with `lead` read just before each row's first real token (after any left
    padding, which leaves the state untouched only where it comes first), the mask to match, and
    where each original position went ([B, T]; None: position t went to t + 1, no padding)."""
    if attention_mask is None:
        return torch.cat([input_ids.new_full((input_ids.shape[0], 1), lead), input_ids], dim=1), None, None
    first = attention_mask.int().argmax(dim=1, keepdim=True)  # each row's first real token
    led = torch.cat([input_ids[:, :1], input_ids], dim=1).scatter(1, first, lead)
    led_mask = torch.cat([attention_mask[:, :1], attention_mask], dim=1).scatter(1, first, 1)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return led, led_mask, positions + (positions >= first).long()


def without_lead(hidden: Tensor, moved: Tensor | None) -> Tensor:
    """[B, T + 1, C] -> [B, T, C]: the outputs at the original positions (`with_lead`'s `moved`)."""
    if moved is None:
        return hidden[:, 1:]
    return hidden.gather(1, moved[..., None].expand(-1, -1, hidden.shape[-1]))


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
        text_config = config.text_config
        family = family_for(text_config)
        geometry = AttentionGeometry.of(text_config)
        layers = check_rwkv_layers(config.rwkv_layers, geometry.num_layers)
        head_size = check_head_size(config.head_size, family, geometry)
        language_model = AutoModelForCausalLM.from_config(text_config)
        # One context per model: v_first and the padding mask of the current forward pass.
        self.context = ForwardContext()
        decoder = decoder_layers(language_model, family)
        for i in layers:
            mixer = RWKV7TimeMixer(mixer_config(attention_of(decoder[i], family), family, geometry, i, head_size,
                                                value_residual=i != layers[0]))
            set_attention(decoder[i], family, RWKVAttention(mixer, i, self.context))
        self.family = family
        self.model = language_model.base_model
        self.lm_head = language_model.get_output_embeddings()
        self.context.follow(self.model)
        self.post_init()

    @property
    def rwkv_layers(self) -> tuple[int, ...]:
        return tuple(self.config.rwkv_layers)

    def converted_attention(self) -> dict[int, RWKVAttention]:
        """The module in each converted layer's attention slot, by layer index."""
        decoder = decoder_layers(self, self.family)
        return {i: attention_of(decoder[i], self.family) for i in self.rwkv_layers}

    def compile_layers(self, **options) -> None:
        """torch.compile the work around the state updates (`options` go to torch.compile): every
        converted layer's time mixer (RWKV7TimeMixer.compile_around_state_update says what and why)
        and every decoder layer's norms and feed-forward block (`compile_pointwise_blocks`). A second
        call changes nothing."""
        for slot in self.converted_attention().values():
            slot.mixer.compile_around_state_update(**options)
        compile_pointwise_blocks(self, self.family, **options)

    def new_cache(self) -> RecurrentCache:
        """An empty generation cache: recurrent states for the converted layers, keys/values for the rest."""
        return RecurrentCache(self.config.text_config, self.rwkv_layers)

    def check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None, cached: bool = False) -> None:
        """cached: a generation cache is passed, so the mask may also cover the tokens it has read. A 4D
        mask is one prepared for the attention layers (a decoding step's over fixed key/value buffers)."""
        device = self.lm_head.weight.device
        if input_ids.device != device:
            raise ValueError(f"input_ids are on {input_ids.device} but the model is on {device}; "
                             "move the batch to the model's device")
        if attention_mask is None or attention_mask.dim() == 4 or attention_mask.shape == input_ids.shape:
            return
        (batch, length), (mask_batch, mask_length) = input_ids.shape, attention_mask.shape
        if not (cached and mask_batch == batch and mask_length > length):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                             f"{tuple(input_ids.shape)}; they must match")

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The final hidden states [B, T, C] (after the last norm), before the LM head: losses apply the
        head a chunk of the sequence at a time, so full-vocabulary logits never exist for a whole batch."""
        self.check_inputs(input_ids, attention_mask)
        leads = self.config.lead_token_id is not None
        return self._body(input_ids, attention_mask, leads, use_cache=False).last_hidden_state

    def _body(self, input_ids: Tensor | None, attention_mask: Tensor | None, leads: bool, **kwargs):
        """The decoder body's outputs; where `leads`, with the lead read first and its position taken
        out of the hidden states again (`with_lead`)."""
        if not leads:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if input_ids is None:
            raise ValueError("a student with a lead token reads input_ids, not inputs_embeds")
        led, led_mask, moved = with_lead(self.config.lead_token_id, input_ids, attention_mask)
        kwargs["position_ids"] = None  # every layer is RWKV-7 (convert checks it): none reads positions
        outputs = self.model(input_ids=led, attention_mask=led_mask, **kwargs)
        outputs.last_hidden_state = without_lead(outputs.last_hidden_state, moved)
        if outputs.hidden_states is not None:
            outputs.hidden_states = tuple(without_lead(h, moved) for h in outputs.hidden_states)
        return outputs

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
        if input_ids is not None:
            self.check_inputs(input_ids, attention_mask, cached=cache is not None)
        if use_cache and cache is None:
            cache = self.new_cache()
        kwargs[CACHE_KEYWORD] = cache
        leads = self.config.lead_token_id is not None and (cache is None or cache.get_seq_length() == 0)
        outputs = self._body(input_ids, attention_mask, leads, position_ids=position_ids, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, **kwargs)
        if leads and cache is not None:  # the cache counts the sequence's tokens, not the lead
            for layer in cache.layers:
                layer.length -= 1
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

    def generate(self, input_ids: torch.LongTensor | None = None, **kwargs):
        """Generation from the recurrent state, its one-token step captured in a CUDA graph on a GPU (kept
        attention layers decode from fixed key/value buffers: `modeling.decode`); transformers' own
        `generate` for options that loop does not implement, and for a padded batch whose kept
        attention layers those buffers cannot hold (a sliding window). Either way the converted
        layers' states are carried in a `new_cache()` unless a cache is passed (as `cache`, or
        `past_key_values` before transformers 5.24)."""
        kwargs.setdefault("use_cache", True)  # a student saved during training may say False
        if kwargs["use_cache"] and cache_of(kwargs) is None:
            kwargs[CACHE_KEYWORD] = self.new_cache()
        plan = decoding_plan(self.generation_config, kwargs) if input_ids is not None else None
        mask, cache = kwargs.get("attention_mask"), cache_of(kwargs)
        # Kept attention layers need the padding at every step, which only the fixed buffers carry.
        if plan is None or (mask is not None and not bool(mask.all()) and not fixed_buffers_hold(self, cache)):
            return super().generate(input_ids, **kwargs)
        return recurrent_generate(self, input_ids, mask, cache, plan)
