"""The family adapter table, and students initialised from their teacher's attention."""

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, GPT2Config, LlamaConfig

from rwkvinside.errors import UserError
from rwkvinside.modeling.hybrid import ConversionSpec, HybridModel
from rwkvinside.modeling.teachers import FAMILIES, AttentionGeometry, family_of

HEAD = 16  # the tiny teachers: 4 query heads and 2 key-value heads of 16 -> groups of 2


def converted_pairs(model: HybridModel):
    """(teacher attention, student mixer) for every converted layer, in stage 1."""
    return [(model.model.model.layers[i].self_attn.teacher, student.mixer)
            for i, student in model.students().items()]


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


@torch.no_grad()
def test_teacher_init_copies_q_k_v_o(make_teacher, family):
    teacher = make_teacher(family)
    if family == "qwen3":  # q_norm/k_norm start at ones: make them distinguishable from the default
        for layer in teacher.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    model = HybridModel(teacher, ConversionSpec(init="teacher"))

    for attention, mixer in converted_pairs(model):
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
def test_rwkv_init_ignores_the_teacher(make_teacher, family):
    model = HybridModel(make_teacher(family), ConversionSpec(init="rwkv"))
    for attention, mixer in converted_pairs(model):
        assert not torch.equal(mixer.receptance.weight, attention.q_proj.weight)
        assert mixer.receptance.weight.abs().max() <= 0.5 / 64**0.5  # RWKV-7's uniform init
        assert torch.count_nonzero(mixer.output.weight) == 0
        for bias in (mixer.receptance.bias, mixer.key.bias, mixer.value.bias):
            assert bias is None or torch.count_nonzero(bias) == 0
        if mixer.r_norm is not None:
            assert torch.equal(mixer.r_norm.weight, torch.ones(HEAD))


def test_student_head_size_may_differ_from_the_teacher(make_teacher):
    """Same width, regrouped: 2 heads of 32 read the same rows as 4 heads of 16."""
    model = HybridModel(make_teacher("llama"), ConversionSpec(layers=(2,), head_size=32))
    (attention, mixer), = converted_pairs(model)
    assert (mixer.config.num_heads, mixer.config.head_size) == (2, 32)
    assert torch.equal(mixer.key.weight, repeat_kv_heads(attention.k_proj.weight, groups=2))


def test_unknown_family_is_refused():
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    gpt2 = AutoModelForCausalLM.from_config(config)
    supported = "supported families: llama, mistral, qwen2, qwen3"
    with pytest.raises(UserError, match=rf"'gpt2' is not supported; {supported}"):
        HybridModel(gpt2)


def test_model_without_lm_head_is_refused():
    bare = AutoModel.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, vocab_size=64))
    assert type(bare).__name__ == "LlamaModel"
    with pytest.raises(UserError, match=r"LlamaModel.*is not a causal language model"):
        family_of(bare)
    with pytest.raises(UserError, match="not a causal language model"):
        HybridModel(bare)
