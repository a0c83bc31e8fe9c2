"""The run configuration: a tree of typed dataclasses, loaded from YAML, overridable by `a.b=c`.

Every field has a commented default; unknown or mistyped keys are errors that name the key.
The resolved configuration is saved with every run and checkpoint (`to_dict`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rwkvinside.errors import UserError

STAGES = (1, 2, 3)
TRAINABLE = ("mixers", "all_but_mlp", "all")
BUDGETS = ("max_steps", "max_tokens", "max_time")


@dataclass
class TeacherConfig:
    source: str = "smollm2-135m"  # a local HF folder, a .gguf file, or the embedded "smollm2-135m"
    trust_remote_code: bool = False  # only for teachers whose code you trust


@dataclass
class ConvertConfig:
    layers: list[int] | None = None  # decoder layers to convert; None: all
    head_size: int | None = None  # None: the teacher's head_dim
    init: str = "teacher"  # "teacher" (r,k,v,o from q,k,v,o) or "rwkv"

    def __post_init__(self):
        if self.init not in ("teacher", "rwkv"):
            raise ValueError(f"convert.init must be 'teacher' or 'rwkv', not '{self.init}'")


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # text corpora for stages 1-2 (files or folders)
    chat: list[str] = field(default_factory=list)  # chat data for stage 3 (JSONL/Parquet `messages`)
    eval: list[str] = field(default_factory=list)  # held-out text for perplexity
    seq_len: int = 512  # tokens per training sequence
    eval_tokens: int = 16384  # held-out tokens scored at the end of a stage (0: skip)
    streaming: bool = False  # read corpora lazily (for data larger than memory)
    shuffle_buffer: int = 10000  # sequences held for shuffling in streaming mode
    seed: int = 0

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be at least 2, not {self.seq_len}")
        if self.eval_tokens < 0:
            raise ValueError("data.eval_tokens must be >= 0")


@dataclass
class StageConfig:
    """Optimisation and budget of one stage. A budget of 0 means unlimited; at least one is set, and
    the stage ends at the first one reached. A stage section naming any budget key replaces the
    stage's default budget (its other budget keys default to 0)."""

    lr: float = 1e-3  # peak learning rate, reached after warm-up
    lr_final: float = 1e-5  # reached at the end of the budget by cosine decay
    warmup_steps: int = 10
    weight_decay: float = 0.0  # at the start ...
    weight_decay_final: float = 0.0  # ... and at the end (linear in between)
    max_steps: int = 0  # optimizer steps
    max_tokens: int = 0  # trained target tokens, summed over ranks
    max_time: float = 0.0  # seconds of training
    trainable: str = "mixers"  # "mixers", "all_but_mlp" or "all"
    kl_weight: float = 1.0  # stage 2: weight of KL(teacher || student)
    ce_weight: float = 0.0  # stage 2: weight of the student's cross-entropy (stage 3 always uses CE)
    temperature: float = 1.0  # stage 2: softening of both distributions; the KL is scaled by T^2

    def __post_init__(self):
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, not '{self.trainable}'")
        if self.lr <= 0 or self.lr_final < 0 or self.lr_final > self.lr:
            raise ValueError(f"need 0 <= lr_final <= lr and lr > 0 (got lr={self.lr}, lr_final={self.lr_final})")
        if min(self.warmup_steps, self.max_steps, self.max_tokens, self.max_time) < 0:
            raise ValueError("warmup_steps, max_steps, max_tokens and max_time must be >= 0")
        if not (self.max_steps or self.max_tokens or self.max_time):
            raise ValueError("set a budget: max_steps, max_tokens or max_time")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, not {self.temperature}")
        if self.kl_weight < 0 or self.ce_weight < 0:
            raise ValueError("kl_weight and ce_weight must be >= 0")


def _stage1() -> StageConfig:
    return StageConfig(lr=1e-3, lr_final=1e-5, max_steps=100, trainable="mixers")


def _stage2() -> StageConfig:
    return StageConfig(lr=1e-4, lr_final=1e-5, max_steps=100, trainable="mixers")


def _stage3() -> StageConfig:
    return StageConfig(lr=1e-5, lr_final=1e-6, max_steps=100, trainable="all", kl_weight=0.0, ce_weight=1.0)


STAGE_DEFAULTS = {1: _stage1, 2: _stage2, 3: _stage3}
STAGE_SECTIONS = {f"stage{number}": make for number, make in STAGE_DEFAULTS.items()}


@dataclass
class TrainConfig:
    batch_size: int = 4  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    activation_checkpointing: bool = False
    dtype: str = "auto"  # "auto": bf16 on GPU, fp32 on CPU; or "fp32", "bf16"
    device: str = "auto"  # "auto": cuda if available, else cpu
    seed: int = 0
    max_bad_steps: int = 3  # NaN/inf losses in a row before the run stops
    teacher_device: str = "same"  # stage 2's frozen teacher: "same" device or "cpu" (offloaded)
    loss_chunk: int = 256  # tokens per chunk of the LM head in the stage 2/3 losses

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_bad_steps", "loss_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.dtype must be auto, fp32 or bf16, not '{self.dtype}'")
        if self.teacher_device not in ("same", "cpu"):
            raise ValueError(f"train.teacher_device must be 'same' or 'cpu', not '{self.teacher_device}'")


@dataclass
class CheckpointConfig:
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    keep_last: int = 2  # checkpoints kept per stage

    def __post_init__(self):
        if self.save_every < 0 or self.keep_last < 1:
            raise ValueError("checkpoint.save_every must be >= 0 and keep_last >= 1")


@dataclass
class LogConfig:
    progress: bool = True  # a progress bar on the terminal
    tensorboard: bool = True


@dataclass
class EngineConfig:
    kind: str = "plain"  # "plain" (one process) or "deepspeed"
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    offload_optimizer: bool = False  # DeepSpeed: optimizer state in CPU memory
    deepspeed_config: str | None = None  # a DeepSpeed JSON whose entries override ours

    def __post_init__(self):
        if self.kind not in ("plain", "deepspeed"):
            raise ValueError(f"engine.kind must be 'plain' or 'deepspeed', not '{self.kind}'")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"engine.zero_stage must be 0-3, not {self.zero_stage}")


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage1: StageConfig = field(default_factory=STAGE_DEFAULTS[1])
    stage2: StageConfig = field(default_factory=STAGE_DEFAULTS[2])
    stage3: StageConfig = field(default_factory=STAGE_DEFAULTS[3])
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def stage(self, number: int) -> StageConfig:
        return getattr(self, f"stage{number}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- building dataclasses from plain data, with errors that name the key --------------------


def _check_value(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, key)
            except UserError as error:
                errors.append(error)
        raise errors[0]
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single path or index where a list is expected
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' must be a list, not {type(value).__name__}")
        return [_check_value(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping of settings, not {type(value).__name__}")
        return build(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}' must be true or false, not {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _exponent_number(value)
        if isinstance(number, float) and number.is_integer():
            return int(number)  # 1e6: YAML reads it as a string (1e6) or a float (1.0e6)
        raise UserError(f"config key '{key}' must be an integer, not {value!r}")
    if annotation is float:
        value = _exponent_number(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"config key '{key}' must be a finite number, not {value!r}")
            return float(value)
        raise UserError(f"config key '{key}' must be a number, not {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise UserError(f"config key '{key}' must be a string, not {value!r}")
    raise TypeError(f"unsupported annotation {annotation} for {key}")


def _exponent_number(value: Any) -> Any:
    """YAML 1.1 reads 5e-5 and 1e6 (no dot) as strings: those as floats, anything else unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _stage_section(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """A stage section over that stage's own defaults. A section that names any budget sets the
    whole budget: `stage1.max_tokens=1e8` alone must not also stop at the default max_steps."""
    defaults = dataclasses.asdict(STAGE_SECTIONS[name]())
    if any(key in given for key in BUDGETS):
        defaults |= {key: 0 for key in BUDGETS}
    return {**defaults, **given}


def build(cls: type, values: dict[str, Any], prefix: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise UserError(f"unknown config key '{prefix}{key}'{hint}")
        if value is None and dataclasses.is_dataclass(hints[key]):
            value = {}  # an empty section (every key commented out): all defaults
        if cls is Config and key in STAGE_SECTIONS and isinstance(value, dict):
            # a stage section starts from that stage's own defaults, not StageConfig's
            value = _stage_section(key, value)
        kwargs[key] = _check_value(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ValueError as error:
        section = prefix.rstrip(".") or "config"
        raise UserError(f"invalid {section}: {error}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a', 'b'], c), the value parsed as YAML (numbers, booleans, lists, null)."""
    if "=" not in text:
        raise UserError(f"override '{text}' is not of the form key.path=value (e.g. train.batch_size=8)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def set_path(tree: dict, path: list[str], value: Any) -> None:
    for name in path[:-1]:
        if tree.get(name) is None:  # absent, or an empty section in the YAML file
            tree[name] = {}
        node = tree[name]
        if not isinstance(node, dict):
            raise UserError(f"config key '{name}' is a value, not a section; cannot set '{'.'.join(path)}'")
        tree = node
    tree[path[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist; give the path of a YAML file (see configs/)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"config file '{path}' is not UTF-8 text; save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"config file '{path}' is not valid YAML{where}; fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of sections (teacher:, data:, ...)")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The configuration from an optional YAML file plus `key.path=value` overrides."""
    tree = read_yaml(path) if path is not None else {}
    for text in overrides:
        key_path, value = parse_override(text)
        set_path(tree, key_path, value)
    return build(Config, tree)


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
