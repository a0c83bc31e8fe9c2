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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rwkvinside.errors import UserError

STAGES = (1, 2, 3)
TRAINABLE = ("mixers", "all_but_mlp", "all")  # what a stage trains (modeling.alignment.select_trainable)
INITIALISATIONS = ("teacher", "teacher_copy", "rwkv")  # how the time mixers start (modeling.convert)
KEEP_CRITERIA = ("kl", "alignment")  # how stage 1 judges the layers to keep as attention
ALIGNMENT_LOSSES = ("relative", "mse")  # stage 1's per-layer loss
BUDGETS = ("max_steps", "max_tokens", "max_time")
# data.eos_first for an all-RWKV student: half the windows led by the EOS (data.eos_first says why)
ALL_RWKV_EOS_FIRST = 0.5
# Our dtype names, and the names torch and lm-eval give the same dtypes.
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class TeacherConfig:
    source: str = "smollm2-135m"  # a local HF folder, a .gguf file, or the embedded "smollm2-135m"
    trust_remote_code: bool = False  # only for teachers whose code you trust


@dataclass
class ConvertConfig:
    layers: list[int] | None = None  # decoder layers to convert; None: all
    head_size: int | None = None  # None: the teacher's head_dim
    # "teacher": r,k,v,o from q,k,v,o, and what they see at step 0 as the teacher's (no token shift,
    # gate 1, each layer its own value); "teacher_copy": the copies alone, the rest RWKV-7's
    # initialisation; "rwkv": RWKV-7's initialisation throughout
    init: str = "teacher"
    untie_embeddings: bool = False  # give a student of a tied teacher an LM head of its own
    # After stage 1, the N converted layers judged worst go back to the teacher's attention for the
    # later stages (never the first converted layer: it makes v_first). Judged by "kl": the KL
    # increase when only that layer is the student's; or by "alignment": its final stage-1 loss.
    keep_attention: int = 0
    keep_criterion: str = "kl"
    # An all-RWKV student reads the EOS before every sequence it starts from an empty state, in its own
    # forward (training, generation, evaluation, the exported model alike): its first token is then
    # always the one whose state it learned, as the windows led by the EOS give it, while the teacher
    # is matched on text as it comes (BENCHMARKS.md: the stage-2 spikes come from the student's own
    # first token; at full budget the lead matched half-led windows' held-out scores with 2 spikes
    # against 156). The lead is one of the data.seq_len tokens the student reads, and data.eos_first
    # defaults to false. null (the default): on for an all-RWKV student, off where attention stays.
    lead: bool | None = None

    def __post_init__(self):
        if self.init not in INITIALISATIONS:
            raise ValueError(f"convert.init must be one of {', '.join(INITIALISATIONS)}, not '{self.init}'")
        if self.keep_attention < 0:
            raise ValueError(f"convert.keep_attention must be >= 0, not {self.keep_attention}")
        if self.lead and (self.layers is not None or self.keep_attention):
            raise ValueError("convert.lead needs an all-RWKV student (kept attention layers would see the lead "
                             "at position 0): drop convert.layers and convert.keep_attention, or convert.lead")
        if self.keep_criterion not in KEEP_CRITERIA:
            raise ValueError(f"convert.keep_criterion must be one of {', '.join(KEEP_CRITERIA)}, "
                             f"not '{self.keep_criterion}'")


@dataclass
class WeightedPath:
    """An entry of data.train with a weight, `{path: synth/, weight: 2}`: each packed window of the
    path appears `weight` times per epoch (2: twice; 0.5: a random half of them, drawn anew each
    epoch; data/build.py). A plain path has weight 1."""

    path: str = ""
    weight: float = 1.0

    def __post_init__(self):
        if not self.path:
            raise ValueError("an entry with a weight needs a path: {path: ..., weight: ...}")
        if self.weight <= 0:
            raise ValueError(f"the weight of '{self.path}' must be > 0, not {self.weight}")


@dataclass
class DataConfig:
    # text corpora for stages 1-2 (files or folders), each a path or {path: ..., weight: ...}
    train: list[str | WeightedPath] = field(default_factory=list)
    chat: list[str] = field(default_factory=list)  # chat data for stage 3 (JSONL/Parquet `messages`)
    eval: list[str] = field(default_factory=list)  # held-out text for perplexity
    seq_len: int = 512  # tokens the student reads per training sequence (its lead is one: convert.lead)
    # the fraction of packed training sequences that start with the EOS, as a document does; the others
    # are plain slices of the stream (true: every one, false: none). A window that starts mid-text puts
    # an arbitrary token at position 0, the teacher's attention sink, and stage 2's gradient spiked
    # there. But a student that only ever saw the EOS first does not handle an ordinary first token,
    # as prompts and mid-text windows have: a hybrid reached 2.5x the teacher's perplexity mid-text
    # instead of 1.2x, and an all-RWKV student on an H200 continued "The capital of France is" with
    # " 180000...". null (the default): off where the student reads a lead of its own (convert.lead,
    # the all-RWKV default) and where attention stays (convert.layers or convert.keep_attention);
    # ALL_RWKV_EOS_FIRST for an all-RWKV student without its lead (on an H200 half beat always on every
    # held-out file, and its continuations are sound; its stage-2 spikes are back). BENCHMARKS.md has the runs.
    eos_first: bool | float | None = None
    eval_tokens: int = 16384  # tokens scored of each held-out file after a stage (0: skip)
    streaming: bool = False  # read corpora lazily (for data larger than memory)
    shuffle_buffer: int = 10000  # sequences held for shuffling in streaming mode
    seed: int = 0

    @property
    def eos_first_fraction(self) -> float:
        """The fraction of training windows that start with the EOS. `Config` resolves eos_first=None
        from the conversion; a DataConfig used on its own (no conversion to go by) takes the all-RWKV
        default."""
        return float(ALL_RWKV_EOS_FIRST if self.eos_first is None else self.eos_first)

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be at least 2, not {self.seq_len}")
        if self.eval_tokens < 0:
            raise ValueError("data.eval_tokens must be >= 0")
        if not 0 <= self.eos_first_fraction <= 1:
            raise ValueError(f"data.eos_first must be true, false or a fraction in [0, 1], not {self.eos_first}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be at least 1, not {self.shuffle_buffer}")
        if self.streaming and any(weight != 1 for _, weight in train_entries(self.train)):
            raise ValueError("weights in data.train need data.streaming false: a stream is read once per "
                             "epoch in file order, so a weight could only repeat a window next to itself")


def train_entries(entries: list[str | WeightedPath]) -> list[tuple[str, float]]:
    """(path, weight) of each entry of data.train."""
    return [(entry, 1.0) if isinstance(entry, str) else (entry.path, entry.weight) for entry in entries]


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
    # stage 1: "mse": the plain squared error (deep layers' large outputs weigh most); "relative":
    # each token's error over the squared norm of the teacher's output there, every layer alike.
    # mse gave the lower held-out perplexity after 20 demo steps (BENCHMARKS.md)
    alignment_loss: str = "mse"
    # the learning rate of the weights the student took over from the teacher (embeddings, MLPs,
    # norms, kept attention) as a fraction of `lr`; the time mixers train at `lr` itself
    teacher_lr_scale: float = 1.0

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
        if self.alignment_loss not in ALIGNMENT_LOSSES:
            raise ValueError(f"alignment_loss must be one of {', '.join(ALIGNMENT_LOSSES)}, "
                             f"not '{self.alignment_loss}'")
        if self.teacher_lr_scale < 0:
            raise ValueError(f"teacher_lr_scale must be >= 0, not {self.teacher_lr_scale}")


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
    # torch.compile the work around the state updates: the time mixers' steps, the decoder layers' norms
    # and MLPs (RWKVInsideForCausalLM.compile_layers; stage 2's teacher's too) and the stage 2-3 loss's
    # chunks; fewer, fused kernels; the first step pays the compilation
    compile: bool = False
    # replay each optimizer step from a CUDA graph captured at the third step (one process on a GPU;
    # packed batches): the host's Python and kernel launches, which bound a small model's step, go away
    cuda_graph: bool = True

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_bad_steps", "loss_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.dtype not in ("auto", "fp32", "bf16"):  # fp16 would need loss scaling
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

    def __post_init__(self):
        all_rwkv = self.convert.layers is None and self.convert.keep_attention == 0
        if self.convert.lead is None:
            self.convert.lead = all_rwkv
        if self.data.eos_first is None:
            # a student with convert.lead reads the EOS first already
            self.data.eos_first = ALL_RWKV_EOS_FIRST if all_rwkv and not self.convert.lead else False
        if self.convert.lead and self.data.seq_len < 3:
            raise ValueError(f"data.seq_len must be at least 3 with convert.lead (the lead is one of the tokens "
                             f"the student reads), not {self.data.seq_len}")
        if self.train.compile and self.engine.kind == "deepspeed" and self.engine.zero_stage == 3:
            raise ValueError("train.compile does not work with DeepSpeed ZeRO-3, which gathers each module's "
                             "partitioned weights in hooks around its own forward call: set engine.zero_stage "
                             "to 2 or train.compile=false")

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
                errors.append((option, error))
        # A mapping was meant for the dataclass option: its error (say, a misspelt key) is the one to show.
        fitting = [error for option, error in errors
                   if dataclasses.is_dataclass(option) == isinstance(value, dict)]
        raise (fitting or [error for _, error in errors])[0]
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
    """The configuration from an optional YAML file plus `key.path=value` overrides.

    An override naming a stage's budget (max_steps, max_tokens, max_time) replaces that stage's
    budget: the file's other budget keys of that stage are cleared unless overridden too, so
    `stage1.max_time=140` over a file's `max_steps: 60` runs for 140 s, not 60 steps."""
    tree = read_yaml(path) if path is not None else {}
    budgets_given: dict[str, set[str]] = {}
    for text in overrides:
        key_path, value = parse_override(text)
        if len(key_path) == 2 and key_path[0] in STAGE_SECTIONS and key_path[1] in BUDGETS:
            budgets_given.setdefault(key_path[0], set()).add(key_path[1])
        set_path(tree, key_path, value)
    for section, given in budgets_given.items():
        for key in set(BUDGETS) - given:
            tree[section][key] = 0
    return build(Config, tree)


def names_config_key(key: str) -> bool:
    """Whether `key` (a.b.c) is the path of a configuration field."""
    cls: Any = Config
    for name in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if name not in fields:
            return False
        cls = typing.get_type_hints(cls)[name]
    return True


def looks_like_override(argument: str) -> bool:
    """Whether a command-line argument is a `section.key=value` override: its key names a config field,
    or its first part names a config section and it is no existing path (a misspelt key then gets the
    config's own error, which suggests the right one). `year=2024` or `a=b` are no overrides."""
    key, equals, _ = argument.partition("=")
    if not equals or "." not in key:
        return False
    if names_config_key(key):
        return True
    return key.split(".")[0] in {f.name for f in dataclasses.fields(Config)} and not Path(argument).exists()


def number_type(kind: type, minimum: float | None = None, maximum: float | None = None,
                above: float | None = None) -> Callable[[str], Any]:
    """An argparse `type` for a number within bounds (`above`: strictly greater than), so a command
    refuses an out-of-range value with one line."""

    def parse(text: str):
        import argparse

        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum) or (
                above is not None and value <= above):
            bounds = [f">= {minimum:g}" if minimum is not None else "", f"> {above:g}" if above is not None else "",
                      f"<= {maximum:g}" if maximum is not None else ""]
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {' and '.join(b for b in bounds if b)}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def resolve_device(name: str, local_rank: int = 0):
    """A torch.device from a device name; "auto": this process's GPU when there is one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; give auto, cpu, cuda or cuda:N") from None


def resolve_dtype(name: str, device):
    """A torch dtype from one of DTYPES' names (or torch's own name for it); "auto": bf16 on a GPU,
    float32 elsewhere."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    torch_names = {**DTYPES, **{long: long for long in DTYPES.values()}}
    if name not in torch_names:
        raise UserError(f"unknown dtype '{name}'; give auto or one of {', '.join(DTYPES)}")
    return getattr(torch, torch_names[name])


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
