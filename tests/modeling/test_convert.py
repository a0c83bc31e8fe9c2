"""convert(): which layers become time mixers, the tensors the student shares with its teacher, the
teacher left as it was, an LM head of the student's own, the bad specs that must build nothing, and
keep_teacher_attention() giving converted layers back to the teacher's attention."""

import pytest
import torch

from rwkvinside.config import INITIALISATIONS
from rwkvinside.errors import UserError
from rwkvinside.modeling.alignment import AligningAttention
from rwkvinside.modeling.attention import RWKVAttention
from rwkvinside.modeling.convert import ConversionSpec, convert, keep_teacher_attention
from rwkvinside.modeling.student import RWKVInsideForCausalLM

from .helpers import BATCH, LENGTH, attention_slots, random_ids, right_padding_mask, shares_storage

TIED = {"llama", "qwen3"}  # the tiny teachers whose LM head is their input embedding (tests/conftest.py)


def converted_names(layers) -> tuple[str, ...]:
    """The prefixes of the converted layers' attention slots in a teacher or student state dict."""
    return tuple(f"model.layers.{i}.self_attn." for i in layers)


# --- which layers are converted ------------------------------------------------------------------

def test_all_layers_converted_by_default(make_teacher, family):
    teacher = make_teacher(family)
    student = convert(teacher)
    assert isinstance(student, RWKVInsideForCausalLM)
    assert student.rwkv_layers == (0, 1, 2, 3) and student.config.rwkv_layers == [0, 1, 2, 3]
    slots = attention_slots(student, family)
    assert all(type(slot) is RWKVAttention for slot in slots)  # stages 2-3: no teacher attention attached
    converted = student.converted_attention()
    assert list(converted) == [0, 1, 2, 3] and list(converted.values()) == slots
    assert [slot.layer_idx for slot in slots] == [0, 1, 2, 3]
    assert [slot.produces_v_first for slot in slots] == [True, False, False, False]


def test_a_subset_keeps_the_teacher_attention_elsewhere(make_teacher, family):
    teacher = make_teacher(family)
    originals = attention_slots(teacher, family)
    student = convert(teacher, ConversionSpec(layers=(3, 1, 3)))
    assert student.rwkv_layers == (1, 3)
    assert sorted(student.converted_attention()) == [1, 3]
    slots = attention_slots(student, family)
    for i in (0, 2):  # the student's own module of the teacher's class, on the teacher's weights
        assert type(slots[i]) is type(originals[i]) and type(slots[i]).__name__.endswith("Attention")
        assert slots[i] is not originals[i]
        kept, own = dict(slots[i].named_parameters()), dict(originals[i].named_parameters())
        assert kept.keys() == own.keys() and len(kept) >= 4
        assert all(shares_storage(kept[name], own[name]) for name in own)
    for i in (1, 3):
        assert type(slots[i]) is RWKVAttention and slots[i].layer_idx == i
    assert [slots[i].produces_v_first for i in (1, 3)] == [True, False]


def test_the_student_starts_in_the_teacher_mode_dtype_and_device(make_teacher):
    teacher = make_teacher("qwen3").to(torch.bfloat16).train()
    student = convert(teacher, ConversionSpec(layers=(0, 2)))
    assert student.training
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}  # the mixers included
    assert {p.device for p in student.parameters()} | {b.device for b in student.buffers()} == {
        torch.device("cpu")}  # nothing is left on the meta device the skeleton was built on
    assert not convert(make_teacher("qwen3")).training  # the fixture's teachers are in eval mode


# --- the teacher is left as it was ------------------------------------------------------------------

def test_convert_leaves_the_teacher_untouched(make_teacher, family):
    teacher = make_teacher(family)
    originals = attention_slots(teacher, family)
    state_before = {name: p.clone() for name, p in teacher.state_dict().items()}
    grads_before = [p.requires_grad for p in teacher.parameters()]
    ids, mask = random_ids(BATCH, LENGTH), right_padding_mask()
    with torch.no_grad():
        logits_before = teacher(input_ids=ids, attention_mask=mask).logits

    student = convert(teacher, ConversionSpec(layers=(0, 2, 3)))
    with torch.no_grad():
        student_logits = student(ids, mask, use_cache=False).logits
        logits_after = teacher(input_ids=ids, attention_mask=mask).logits

    assert attention_slots(teacher, family) == originals  # its own attention modules, in its own layers
    assert not any(isinstance(m, RWKVAttention) for m in teacher.modules())
    assert [p.requires_grad for p in teacher.parameters()] == grads_before and not teacher.training
    state_after = teacher.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[name], value) for name, value in state_before.items())
    torch.testing.assert_close(logits_after, logits_before, rtol=0, atol=0)
    assert (student_logits - logits_before).abs().max() > 1e-3  # the student is really another model


# --- the tensors the student shares with its teacher -------------------------------------------------

def test_student_shares_the_teacher_non_attention_tensors(make_teacher, family):
    teacher = make_teacher(family)
    student = convert(teacher, ConversionSpec(layers=(1, 3)))

    assert shares_storage(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert shares_storage(student.model.layers[2].mlp.down_proj.weight,
                          teacher.model.layers[2].mlp.down_proj.weight)
    assert shares_storage(student.model.norm.weight, teacher.model.norm.weight)
    assert shares_storage(student.lm_head.weight, teacher.lm_head.weight)
    assert shares_storage(student.model.rotary_emb.inv_freq, teacher.model.rotary_emb.inv_freq)
    if family in TIED:
        assert student.lm_head.weight is student.model.embed_tokens.weight  # one parameter, as in the teacher
    else:
        assert not shares_storage(student.lm_head.weight, student.model.embed_tokens.weight)

    with torch.no_grad():  # shared, not copied: the teacher's change is the student's
        teacher.model.layers[2].mlp.down_proj.weight[0, 0] += 1.0
    torch.testing.assert_close(student.model.layers[2].mlp.down_proj.weight,
                               teacher.model.layers[2].mlp.down_proj.weight, rtol=0, atol=0)


def test_student_shares_everything_but_the_converted_attentions(make_teacher, family):
    """Name by name: every tensor the two models have in common is one tensor; the student's own are
    exactly the converted layers' mixers, and only the converted layers' attentions are left out."""
    teacher = make_teacher(family)
    student = convert(teacher, ConversionSpec(layers=(1, 3)))
    teachers, students = teacher.state_dict(), student.state_dict()

    common = teachers.keys() & students.keys()
    assert all(shares_storage(students[name], teachers[name]) for name in common)
    assert any(name.startswith("model.layers.0.self_attn.") for name in common)  # kept attentions shared
    assert {name for name in students.keys() - teachers.keys()} == {
        name for name in students if name.startswith(converted_names((1, 3))) and ".mixer." in name}
    assert {name for name in teachers.keys() - students.keys()} == {
        name for name in teachers if name.startswith(converted_names((1, 3)))}
    teacher_storages = {t.untyped_storage().data_ptr() for t in teachers.values()}
    for slot in student.converted_attention().values():
        assert all(p.untyped_storage().data_ptr() not in teacher_storages for p in slot.mixer.parameters())


# --- an LM head of the student's own -----------------------------------------------------------------

def test_untie_embeddings_gives_the_student_of_a_tied_teacher_a_head_of_its_own(tmp_path, make_teacher):
    teacher = make_teacher("llama")
    assert teacher.config.tie_word_embeddings and teacher.lm_head.weight is teacher.model.embed_tokens.weight
    torch.manual_seed(0)
    tied = convert(teacher, ConversionSpec(layers=(1,)))
    torch.manual_seed(0)
    student = convert(teacher, ConversionSpec(layers=(1,), untie_embeddings=True))

    assert student.config.tie_word_embeddings is False
    assert student.config.text_config.tie_word_embeddings is False
    assert teacher.config.tie_word_embeddings is True  # the teacher's config is not touched
    head, embedding = student.lm_head.weight, student.model.embed_tokens.weight
    assert shares_storage(embedding, teacher.model.embed_tokens.weight)
    assert not shares_storage(head, embedding) and torch.equal(head, embedding)  # a copy, to train apart
    ids = random_ids(BATCH, LENGTH)
    with torch.no_grad():
        torch.testing.assert_close(student(ids, use_cache=False).logits, tied(ids, use_cache=False).logits,
                                   rtol=0, atol=0)
        head[0] += 1.0
    assert not torch.equal(head, embedding) and torch.equal(embedding, teacher.lm_head.weight)

    student.save_pretrained(tmp_path)
    loaded = RWKVInsideForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, head)
    assert torch.equal(loaded.model.embed_tokens.weight, embedding)


def test_untie_embeddings_changes_nothing_for_an_untied_teacher(make_teacher):
    teacher = make_teacher("qwen2")
    student = convert(teacher, ConversionSpec(layers=(1,), untie_embeddings=True))
    assert student.config.tie_word_embeddings is False
    assert shares_storage(student.lm_head.weight, teacher.lm_head.weight)  # the teacher's own head, shared


# --- keep_teacher_attention --------------------------------------------------------------------------

def test_keep_teacher_attention_gives_layers_back_to_the_teacher_attention(make_teacher, family):
    teacher = make_teacher(family)
    originals = attention_slots(teacher, family)
    torch.manual_seed(0)
    student = convert(teacher, ConversionSpec(layers=(0, 1, 3)))
    torch.manual_seed(0)  # the same mixers for layers 0 and 1 (they are initialised first)
    expected = convert(teacher, ConversionSpec(layers=(0, 1)))

    reduced = keep_teacher_attention(student, teacher, [3])

    assert reduced.rwkv_layers == (0, 1) and student.rwkv_layers == (0, 1, 3)  # a new model
    slots = attention_slots(reduced, family)
    assert type(slots[3]) is type(originals[3])
    kept, own = dict(slots[3].named_parameters()), dict(originals[3].named_parameters())
    assert kept.keys() == own.keys() and all(shares_storage(kept[name], own[name]) for name in own)
    assert slots[0].produces_v_first and not slots[1].produces_v_first
    students = student.state_dict()
    for name, tensor in reduced.state_dict().items():  # the rest: the student's own tensors
        if not name.startswith("model.layers.3."):
            assert shares_storage(tensor, students[name]), name
    if family in TIED:
        assert reduced.lm_head.weight is reduced.model.embed_tokens.weight
    ids, mask = random_ids(BATCH, LENGTH), right_padding_mask()
    with torch.no_grad():
        torch.testing.assert_close(reduced(ids, mask, use_cache=False).logits,
                                   expected(ids, mask, use_cache=False).logits, rtol=0, atol=0)


def test_the_v_first_producer_cannot_go_back_to_attention(make_teacher):
    teacher = make_teacher("mistral")
    student = convert(teacher, ConversionSpec(layers=(1, 2, 3)))
    with pytest.raises(UserError, match=r"layer 1 is the first converted layer \(it makes v_first\)"):
        keep_teacher_attention(student, teacher, [1, 3])
    assert student.rwkv_layers == (1, 2, 3)


# --- bad input: each refused with a message naming the problem, and nothing built ---------------------

def cast_one_layer_to_float64(teacher):
    teacher.model.layers[2].to(torch.float64)


BAD_SPECS = {  # case: (family, spec, damage done to the teacher first, message)
    "layer out of range": ("llama", ConversionSpec(layers=(1, 4)), None,
                           r"layer index 4 is out of range.*4 layers"),
    "negative layer": ("llama", ConversionSpec(layers=(-1,)), None, r"layer index -1 is out of range"),
    "empty layer list": ("mistral", ConversionSpec(layers=()), None, r"no layer chosen"),
    "head size not dividing": ("qwen2", ConversionSpec(head_size=24), None,
                               r"head size 24 does not divide .* 64"),
    "zero head size": ("llama", ConversionSpec(head_size=0), None, r"head size 0 does not divide"),
    "qwen3 head size": ("qwen3", ConversionSpec(head_size=32), None,
                        r"qwen3 .* head size must be 16, not 32"),
    "unknown init": ("llama", ConversionSpec(init="xavier"), None,
                     rf"unknown initialisation 'xavier'; choose one of {', '.join(INITIALISATIONS)}"),
    "mixed dtypes": ("llama", ConversionSpec(), cast_one_layer_to_float64, r"mixes dtypes.*float32.*float64"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_is_refused_and_leaves_the_teacher_untouched(make_teacher, case):
    family, spec, damage, message = BAD_SPECS[case]
    teacher = make_teacher(family)
    if damage is not None:
        damage(teacher)
    slots_before = attention_slots(teacher, family)
    state_before = {name: p.clone() for name, p in teacher.state_dict().items()}
    grads_before = [p.requires_grad for p in teacher.parameters()]

    with pytest.raises(UserError, match=message):
        convert(teacher, spec)

    assert attention_slots(teacher, family) == slots_before
    assert not any(isinstance(m, (AligningAttention, RWKVAttention)) for m in teacher.modules())
    assert [p.requires_grad for p in teacher.parameters()] == grads_before
    state_after = teacher.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[name], value) for name, value in state_before.items())


def test_teacher_spread_over_devices_is_refused(make_teacher):
    teacher = make_teacher("llama")
    teacher.model.layers[1].to("meta")
    with pytest.raises(UserError, match=r"spread over devices \['cpu', 'meta'\]"):
        convert(teacher)
    assert not any(isinstance(m, RWKVAttention) for m in teacher.modules())
