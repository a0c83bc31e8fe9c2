"""The family adapter table, and students initialised from their teacher's attention."""

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, GPT2Config, LlamaConfig

from rwkvinside.errors import UserError
from rwkvinside.modeling.convert import OWN_VALUE_LOGIT, ConversionSpec, convert, copy_attention_into_mixer
from rwkvinside.modeling.student import RWKVInsideForCausalLM, mixer_config
from rwkvinside.modeling.teachers import (FAMILIES, AttentionGeometry, attention_of, decoder_layers,
                                          family_for, family_of)
from rwkvinside.modeling.time_mixer import RWKV7TimeMixer

HEAD = 16  # the tiny teachers: 4 query heads and 2 key-value heads of 16 -> groups of 2


def converted_pairs(teacher, student: RWKVInsideForCausalLM):
    """(teacher attention, student mixer) for every converted layer (the teacher keeps its attentions)."""
    layers = decoder_layers(teacher, student.family)
    return [(attention_of(layers[i], student.family), slot.mixer)
            for i, slot in student.converted_attention().items()]


def repeat_kv_heads(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[kv_heads * D, ...] -> [kv_heads * groups * D, ...]: kv head j serves query heads j*groups.."""
    heads = weight.shape[0] // HEAD
    return weight.reshape(heads, HEAD, *weight.shape[1:]).repeat_interleave(groups, dim=0).flatten(0, 1)


def test_families_cover_the_supported_teachers(root_conftest):
    assert set(FAMILIES) == {"llama", "qwen2", "qwen3", "mistral"} == set(root_conftest.SUPPORTED_FAMILIES)
    assert FAMILIES["qwen3"].qk_norms == ("q_norm", "k_norm")
    assert all(FAMILIES[name].qk_norms is None for name in ("llama", "qwen2", "mistral"))


def test_geometry_is_read_off_the_config(make_teacher, family):
    geometry = AttentionGeometry.of(make_teacher(family).config)
    assert (geometry.hidden_size, geometry.num_heads, geometry.num_kv_heads, geometry.head_dim,
            geometry.num_layers) == (64, 4, 2, HEAD, 4)


def test_decoder_layers_are_found_by_family_in_teachers_and_students(make_teacher, family):
    teacher = make_teacher(family)
    entry = family_of(teacher)
    assert entry is FAMILIES[family] is family_for(teacher.config)
    assert decoder_layers(teacher, entry) is teacher.model.layers
    student = convert(teacher, ConversionSpec(layers=(1,)))
    assert student.family is entry
    layers = decoder_layers(student, entry)
    assert layers is student.model.layers and len(layers) == 4
    assert attention_of(layers[1], entry) is student.converted_attention()[1]
    assert attention_of(layers[0], entry) is layers[0].self_attn


@torch.no_grad()
def test_teacher_init_copies_q_k_v_o(make_teacher, family):
    teacher = make_teacher(family)
    if family == "qwen3":  # q_norm/k_norm start at ones: make them distinguishable from the default
        for layer in teacher.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    student = convert(teacher, ConversionSpec(init="teacher"))

    for attention, mixer in converted_pairs(teacher, student):
        assert mixer.config.num_heads == 4 and mixer.config.head_size == HEAD
        assert torch.equal(mixer.receptance.weight, attention.q_proj.weight)
        assert torch.equal(mixer.output.weight, attention.o_proj.weight)
        for student, source in ((mixer.key, attention.k_proj), (mixer.value, attention.v_proj)):
            assert student.weight.shape == (64, 64) and source.weight.shape == (2 * HEAD, 64)
            assert torch.equal(student.weight, repeat_kv_heads(source.weight, groups=2))
            # query head 3 belongs to the group of kv head 1, query head 1 to kv head 0
            assert torch.equal(student.weight[3 * HEAD:4 * HEAD], source.weight[HEAD:2 * HEAD])
            assert torch.equal(student.weight[1 * HEAD:2 * HEAD], source.weight[:HEAD])
        if family == "qwen2":
            assert torch.equal(mixer.receptance.bias, attention.q_proj.bias)
            assert torch.equal(mixer.key.bias, repeat_kv_heads(attention.k_proj.bias, groups=2))
            assert torch.equal(mixer.value.bias, repeat_kv_heads(attention.v_proj.bias, groups=2))
            assert mixer.output.bias is None and attention.o_proj.bias is None
            assert mixer.key.bias.abs().min() > 0  # the fixture made the biases non-trivial
        else:
            assert all(p.bias is None for p in (mixer.receptance, mixer.key, mixer.value, mixer.output))
        if family == "qwen3":
            assert torch.equal(mixer.r_norm.weight, attention.q_norm.weight)
            assert torch.equal(mixer.k_norm.weight, attention.k_norm.weight)
            assert mixer.r_norm.eps == mixer.k_norm.eps == teacher.config.rms_norm_eps
        else:
            assert mixer.r_norm is None and mixer.k_norm is None


@torch.no_grad()
def test_teacher_init_starts_each_mixer_where_the_teacher_projections_were(make_teacher, family):
    """init="teacher" beyond the copies: no token shift, a gate of one, each layer mostly its own value."""
    student = convert(make_teacher(family), ConversionSpec(layers=(1, 2, 3), init="teacher"))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 64, generator=generator)
    v_first = torch.randn(2, 7, 64, generator=generator)
    for i, slot in student.converted_attention().items():
        mixer = slot.mixer
        assert all(torch.count_nonzero(mu) == 0 for mu in (mixer.x_r, mixer.x_w, mixer.x_k, mixer.x_v,
                                                          mixer.x_a, mixer.x_g))
        mixed = mixer.mix(x, None if slot.produces_v_first else v_first)
        torch.testing.assert_close(mixed.gate, torch.ones_like(mixed.gate))
        assert mixer.g2.std() > 0  # a gate of one, but B_g's rows are not all alike
        own = mixer.value(x)  # the unshifted input, as the teacher's v_proj read it
        if slot.produces_v_first:
            torch.testing.assert_close(mixed.v.flatten(2), own)
        else:
            assert torch.equal(mixer.v0, torch.full_like(mixer.v0, OWN_VALUE_LOGIT)) and OWN_VALUE_LOGIT < -2
            share = torch.sigmoid(torch.tensor(OWN_VALUE_LOGIT))  # of v_first mixed in
            torch.testing.assert_close(mixed.v.flatten(2), own + (v_first - own) * share)


@torch.no_grad()
def test_teacher_copy_init_is_the_copies_on_the_rwkv_initialisation(make_teacher, family):
    teacher = make_teacher(family)
    torch.manual_seed(3)
    copied = convert(teacher, ConversionSpec(init="teacher_copy"))
    torch.manual_seed(3)
    fresh = convert(teacher, ConversionSpec(init="rwkv"))
    projections = ("receptance.", "key.", "value.", "output.", "r_norm.", "k_norm.")
    pairs = zip(converted_pairs(teacher, copied), converted_pairs(teacher, fresh))
    for (attention, mixer), (_, fresh_mixer) in pairs:
        assert torch.equal(mixer.receptance.weight, attention.q_proj.weight)
        assert torch.equal(mixer.output.weight, attention.o_proj.weight)
        rest = {name: p for name, p in fresh_mixer.named_parameters() if not name.startswith(projections)}
        assert "x_r" in rest and "g2" in rest
        assert all(torch.equal(mixer.get_parameter(name), p) for name, p in rest.items())


@torch.no_grad()
def test_rwkv_init_ignores_the_teacher(make_teacher, family):
    teacher = make_teacher(family)
    student = convert(teacher, ConversionSpec(init="rwkv"))
    for attention, mixer in converted_pairs(teacher, student):
        assert not torch.equal(mixer.receptance.weight, attention.q_proj.weight)
        assert mixer.receptance.weight.abs().max() <= 0.5 / 64**0.5  # RWKV-7's uniform init
        assert torch.count_nonzero(mixer.output.weight) == 0
        for bias in (mixer.receptance.bias, mixer.key.bias, mixer.value.bias):
            assert bias is None or torch.count_nonzero(bias) == 0
        if mixer.r_norm is not None:
            assert torch.equal(mixer.r_norm.weight, torch.ones(HEAD))


def test_student_head_size_may_differ_from_the_teacher(make_teacher):
    """Same width, regrouped: 2 heads of 32 read the same rows as 4 heads of 16."""
    teacher = make_teacher("llama")
    student = convert(teacher, ConversionSpec(layers=(2,), head_size=32))
    (attention, mixer), = converted_pairs(teacher, student)
    assert (mixer.config.num_heads, mixer.config.head_size) == (2, 32)
    assert torch.equal(mixer.key.weight, repeat_kv_heads(attention.k_proj.weight, groups=2))


@torch.no_grad()
def test_copy_attention_into_mixer_sets_only_the_projections_and_norms(make_teacher, family):
    """The rest of the mixer (decays, token shift, LoRAs, ...) keeps its RWKV-7 initialisation."""
    teacher = make_teacher(family)
    entry, geometry = FAMILIES[family], AttentionGeometry.of(teacher.config)
    attention = attention_of(decoder_layers(teacher, entry)[2], entry)
    if family == "qwen3":  # q_norm/k_norm start at ones, as the mixer's own norms do
        attention.q_norm.weight.uniform_(0.5, 1.5)
        attention.k_norm.weight.uniform_(0.5, 1.5)
    mixer = RWKV7TimeMixer(mixer_config(attention, entry, geometry, 2, HEAD, value_residual=True))
    before = {name: p.clone() for name, p in mixer.named_parameters()}

    copy_attention_into_mixer(attention, mixer, entry, geometry)

    copied = {"receptance.weight", "key.weight", "value.weight", "output.weight"}
    copied |= {f"{name}.bias" for name in ("receptance", "key", "value") if family == "qwen2"}
    copied |= {"r_norm.weight", "k_norm.weight"} if family == "qwen3" else set()
    changed = {name for name, p in mixer.named_parameters() if not torch.equal(p, before[name])}
    assert changed == copied
    assert torch.equal(mixer.receptance.weight, attention.q_proj.weight)
    assert torch.equal(mixer.value.weight, repeat_kv_heads(attention.v_proj.weight, groups=2))


def test_unknown_family_is_refused():
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    gpt2 = AutoModelForCausalLM.from_config(config)
    supported = "supported families: llama, mistral, qwen2, qwen3"
    with pytest.raises(UserError, match=rf"'gpt2' is not supported; {supported}"):
        family_for(gpt2.config)
    with pytest.raises(UserError, match=rf"'gpt2' is not supported; {supported}"):
        convert(gpt2)


def test_model_without_lm_head_is_refused():
    bare = AutoModel.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, vocab_size=64))
    assert type(bare).__name__ == "LlamaModel"
    with pytest.raises(UserError, match=r"LlamaModel.*is not a causal language model"):
        family_of(bare)
    with pytest.raises(UserError, match="not a causal language model"):
        convert(bare)
