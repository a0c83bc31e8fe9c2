"""The run configuration: typed sections, YAML files and `a.b=c` overrides, errors that name the key."""

import dataclasses
import typing
from pathlib import Path

import pytest

from rwkvinside.config import (STAGE_DEFAULTS, Config, StageConfig, build, load_config, parse_override,
                               save_config)
from rwkvinside.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# A valid value other than the default for every key of every section. A key added to the config
# without a line here fails `test_every_key_has_an_override_case`.
OVERRIDES = {
    "teacher.source": ("/models/qwen", "/models/qwen"),
    "teacher.trust_remote_code": ("true", True),
    "convert.layers": ("[0, 2, 5]", [0, 2, 5]),
    "convert.head_size": ("32", 32),
    "convert.init": ("rwkv", "rwkv"),
    "convert.untie_embeddings": ("true", True),
    "convert.keep_attention": ("8", 8),
    "convert.keep_criterion": ("alignment", "alignment"),
    "convert.lead": ("false", False),
    "data.train": ("[a.txt, b/]", ["a.txt", "b/"]),
    "data.chat": ("chat.jsonl", ["chat.jsonl"]),  # a single path where a list is expected
    "data.eval": ("[held.txt]", ["held.txt"]),
    "data.seq_len": ("1024", 1024),
    "data.eos_first": ("0.5", 0.5),
    "data.eval_tokens": ("0", 0),
    "data.streaming": ("true", True),
    "data.shuffle_buffer": ("50", 50),
    "data.seed": ("7", 7),
    "train.batch_size": ("8", 8),
    "train.grad_accum": ("4", 4),
    "train.grad_clip": ("0.5", 0.5),
    "train.activation_checkpointing": ("yes", True),
    "train.dtype": ("bf16", "bf16"),
    "train.device": ("cpu", "cpu"),
    "train.seed": ("3", 3),
    "train.max_bad_steps": ("10", 10),
    "train.teacher_device": ("cpu", "cpu"),
    "train.loss_chunk": ("64", 64),
    "train.compile": ("true", True),
    "train.cuda_graph": ("false", False),
    "checkpoint.save_every": ("25", 25),
    "checkpoint.keep_last": ("5", 5),
    "log.progress": ("false", False),
    "log.tensorboard": ("off", False),
    "engine.kind": ("deepspeed", "deepspeed"),
    "engine.zero_stage": ("3", 3),
    "engine.offload_optimizer": ("true", True),
    "engine.deepspeed_config": ("ds.json", "ds.json"),
}
STAGE_OVERRIDES = {
    "lr": ("5e-5", 5e-5),  # YAML 1.1 reads 5e-5 (no dot) as a string
    "lr_final": ("2.0e-6", 2e-6),
    "warmup_steps": ("0", 0),
    "weight_decay": ("0.1", 0.1),
    "weight_decay_final": ("0.01", 0.01),
    "max_steps": ("1e3", 1000),  # an integer written in exponent notation
    "max_tokens": ("100_000", 100_000),
    "max_time": ("3600", 3600.0),
    "trainable": ("all", "all"),
    "kl_weight": ("0.5", 0.5),
    "ce_weight": ("2", 2.0),
    "temperature": ("2.0", 2.0),
    "alignment_loss": ("relative", "relative"),
    "teacher_lr_scale": ("0.1", 0.1),
}
for _number in STAGE_DEFAULTS:
    OVERRIDES |= {f"stage{_number}.{key}": case for key, case in STAGE_OVERRIDES.items()}
# Stage 1 trains only the time mixers (the teacher attentions are still in place); stage 3 all by default.
OVERRIDES["stage1.trainable"] = ("mixers", "mixers")
OVERRIDES["stage3.trainable"] = ("all_but_mlp", "all_but_mlp")


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        annotation = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(annotation):
            keys += all_keys(annotation, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def get(config: Config, key: str):
    value = config
    for name in key.split("."):
        value = getattr(value, name)
    return value


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_valid():
    config = load_config()
    assert config == Config()
    assert config.stage(1).trainable == "mixers" and config.stage(3).trainable == "all"
    assert config.stage(3).ce_weight == 1.0 and config.stage(3).kl_weight == 0.0


def test_every_key_has_an_override_case():
    assert sorted(all_keys()) == sorted(OVERRIDES)


@pytest.mark.parametrize("key", sorted(OVERRIDES))
def test_every_key_is_overridable(key):
    text, expected = OVERRIDES[key]
    config = load_config(overrides=[f"{key}={text}"])
    assert get(config, key) == expected
    assert get(Config(), key) != expected or key == "stage1.trainable"  # the override did something
    assert type(get(config, key)) is type(expected)


def test_null_override_sets_an_optional_key_to_none():
    assert load_config(overrides=["convert.layers=null"]).convert.layers is None
    assert load_config(overrides=["convert.layers=[1]", "convert.layers=null"]).convert.layers is None


def test_yaml_file_then_overrides_in_order(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: 2\n  grad_accum: 3\nstage2:\n  lr: 2.0e-4\n")
    config = load_config(path, ["train.batch_size=16", "train.batch_size=32"])
    assert config.train.batch_size == 32  # the last override wins
    assert config.train.grad_accum == 3
    assert config.stage2.lr == 2e-4


def test_save_and_load_round_trip(tmp_path):
    config = load_config(overrides=["convert.layers=[1, 3]", "stage1.lr=5e-4", "data.train=[x.txt]"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_a_partial_stage_section_keeps_that_stages_own_defaults(tmp_path):
    path = write(tmp_path, "stage3:\n  lr: 2.0e-5\nstage2:\n  temperature: 2.0\n")
    config = load_config(path)
    assert config.stage3.lr == 2e-5
    assert config.stage3.lr_final == STAGE_DEFAULTS[3]().lr_final
    assert config.stage3.trainable == "all" and config.stage3.ce_weight == 1.0  # not StageConfig's defaults
    assert config.stage2.lr == STAGE_DEFAULTS[2]().lr
    assert load_config(overrides=["stage3.warmup_steps=0"]).stage3.trainable == "all"


@pytest.mark.parametrize("budget, value", [("max_tokens", 100_000_000), ("max_time", 60.0)])
def test_a_budget_given_for_a_stage_replaces_its_default_budget(budget, value):
    """README: `stage1.max_tokens=100_000_000` must not stop at the default 100 steps."""
    stage = load_config(overrides=[f"stage1.{budget}={value}"]).stage1
    assert getattr(stage, budget) == value
    assert stage.max_steps == 0
    both = load_config(overrides=["stage1.max_tokens=1000", "stage1.max_steps=5"]).stage1
    assert (both.max_tokens, both.max_steps) == (1000, 5)


def test_an_empty_section_is_all_defaults(tmp_path):
    path = write(tmp_path, "train:\nstage2:\n  # lr: 1e-4\n")
    config = load_config(path, ["stage2.warmup_steps=3"])
    assert config.train == Config().train
    assert config.stage2 == dataclasses.replace(STAGE_DEFAULTS[2](), warmup_steps=3)


@pytest.mark.parametrize("override, named, suggestion", [
    ("trian.batch_size=4", "trian", "train"),
    ("train.batchsize=4", "train.batchsize", "train.batch_size"),
    ("stage2.temprature=2", "stage2.temprature", "stage2.temperature"),
])
def test_unknown_keys_are_named_with_a_suggestion(override, named, suggestion):
    with pytest.raises(UserError, match=rf"unknown config key '{named}'; did you mean '{suggestion}'"):
        load_config(overrides=[override])


def test_unknown_key_in_a_yaml_file(tmp_path):
    with pytest.raises(UserError, match=r"'data\.seqlen'.*'data\.seq_len'"):
        load_config(write(tmp_path, "data:\n  seqlen: 64\n"))


@pytest.mark.parametrize("override, key, expected", [
    ("train.batch_size=abc", "train.batch_size", "an integer"),
    ("train.batch_size=2.5", "train.batch_size", "an integer"),
    ("train.batch_size=true", "train.batch_size", "an integer"),
    ("stage1.lr=fast", "stage1.lr", "a number"),
    ("stage1.lr=.nan", "stage1.lr", "a finite number"),
    ("stage1.lr=.inf", "stage1.lr", "a finite number"),
    ("log.progress=maybe", "log.progress", "true or false"),
    ("teacher.source=[a, b]", "teacher.source", "a string"),
    ("data.train={a: 1}", "data.train", "a list"),
    ("convert.layers=[0, x]", r"convert.layers\[1\]", "an integer"),
    ("train=4", "train", "a mapping"),
])
def test_mistyped_values_name_the_key(override, key, expected):
    with pytest.raises(UserError, match=rf"config key '{key}' must be {expected}"):
        load_config(overrides=[override])


@pytest.mark.parametrize("override, named", [
    ("train.batch_size=0", "train.batch_size"),
    ("train.dtype=fp16", "train.dtype"),
    ("stage2.trainable=some", "trainable"),
    ("stage1.lr_final=1", "lr_final"),
    ("engine.zero_stage=4", "engine.zero_stage"),
    ("data.seq_len=1", "data.seq_len"),
    ("data.seq_len=2", "data.seq_len must be at least 3 with convert.lead"),  # the lead and one token of text
    ("data.eos_first=1.5", "data.eos_first"),
    ("stage3.max_steps=0", "budget"),
])
def test_invalid_values_name_the_field(override, named):
    with pytest.raises(UserError, match=named):
        load_config(overrides=[override])


@pytest.mark.parametrize("overrides, expected", [
    ([], False),  # every layer converted: the student reads its own lead (convert.lead)
    (["convert.lead=false"], 0.5),  # every layer converted, no lead: half the windows led by the EOS
    (["convert.keep_attention=8"], False),  # attention layers stay: they need their sink from any first token
    (["convert.layers=[0, 1, 2]"], False),
    (["convert.keep_attention=8", "data.eos_first=true"], True),  # what the user says wins
    (["data.eos_first=false"], False),
    (["convert.keep_attention=8", "data.eos_first=0.5"], 0.5),
    (["convert.lead=true"], False),  # the student reads the EOS first in its own forward
])
def test_eos_first_by_default_for_half_of_the_windows_of_an_all_rwkv_student_without_its_lead(overrides, expected):
    data = load_config(overrides=overrides).data
    assert data.eos_first == expected and data.eos_first_fraction == float(expected)


def test_compile_is_refused_under_zero_3():
    with pytest.raises(UserError, match="train.compile.*ZeRO-3"):
        load_config(overrides=["train.compile=true", "engine.kind=deepspeed", "engine.zero_stage=3"])
    assert load_config(overrides=["train.compile=true", "engine.kind=deepspeed"]).train.compile


def test_a_setting_is_not_a_section():
    with pytest.raises(UserError, match="train.batch_size"):
        load_config(overrides=["train.batch_size.x=1"])


def test_malformed_override():
    with pytest.raises(UserError, match="key.path=value"):
        load_config(overrides=["train.batch_size"])


def test_override_values_parse_as_yaml():
    assert parse_override("a.b=5e-5") == (["a", "b"], "5e-5")  # left to the float field to read
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=null") == (["a", "b"], None)
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")
    assert parse_override("a.b=") == (["a", "b"], "")


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: 2\n  grad_accum: [1, 2\nstage1:\n  lr: 1\n")
    with pytest.raises(UserError, match=r"not valid YAML at line [345],"):
        load_config(path)


def test_yaml_that_is_not_a_mapping(tmp_path):
    with pytest.raises(UserError, match="mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_non_utf8_config_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("teacher:\n  source: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_an_empty_file_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing yet\n")) == Config()


def test_build_rejects_unknown_keys_of_nested_dataclasses():
    with pytest.raises(UserError, match="unknown config key 'stage1.lrr'; did you mean 'stage1.lr'"):
        build(Config, {"stage1": {"lrr": 1e-3}})
    assert build(StageConfig, {"max_steps": 5}).max_steps == 5


SHIPPED = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "src/rwkvinside/configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_configs_load(path):
    load_config(path)


def test_the_demo_config_is_shipped():
    assert any(p.name == "demo.yaml" for p in SHIPPED)


@pytest.mark.parametrize("overrides, expected", [
    ([], True),  # every layer converted
    (["convert.lead=false"], False),
    (["convert.keep_attention=4"], False),  # attention layers would see the lead at position 0
    (["convert.layers=[0, 1]"], False),
])
def test_an_all_rwkv_student_reads_a_lead_by_default(overrides, expected):
    assert load_config(overrides=overrides).convert.lead is expected


def test_a_lead_token_is_for_an_all_rwkv_student():
    assert load_config(overrides=["convert.lead=true"]).convert.lead
    for kept in (["convert.keep_attention=4"], ["convert.layers=[0, 1]"]):
        with pytest.raises(UserError, match="convert.lead needs an all-RWKV student"):
            load_config(overrides=["convert.lead=true", *kept])
