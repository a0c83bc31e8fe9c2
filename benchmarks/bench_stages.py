"""Training-step speed on one GPU: the teacher's own full fine-tuning step against the three ways
the distillation trains (stage 1; stage 2 training everything; stage 2 training the time mixers).

    python benchmarks/bench_stages.py --teacher /tmp/t/smollm2.gguf --cold-start     # the H200 run
    python benchmarks/bench_stages.py --teacher random --models smollm2 qwen2.5-0.5b qwen2.5-1.5b
    python benchmarks/bench_stages.py --dry-run                # tiny, on the CPU: every code path
    # DeepSpeed (ZeRO-2), stage 2 only, the same global batch and the same --out: 1 process, then 2
    TORCH_CUDA_ARCH_LIST=9.0 deepspeed --num_gpus 1 benchmarks/bench_stages.py --deepspeed --teacher random
    TORCH_CUDA_ARCH_LIST=9.0 deepspeed --num_gpus 2 benchmarks/bench_stages.py --deepspeed --teacher random

Most of a run's time is Triton compiling and autotuning fla's kernels on first use: on an H200
(2026-11-30) stage 1's warm-up took 4.5 minutes, the WKV-7 benchmark's fla-defaults variant (other
kernels) almost 3 more, and --cold-start repeats stage 1's in a fresh process; smollm2 with
--cold-start takes about 15 minutes, without it about 9.

Measured, each from a freshly built model, on the same synthetic data (random token ids, labels the
next tokens, a fixed seed):

- the teacher's full fine-tuning step as a user would run it: transformers' model with sdpa, the HF
  model's own cross-entropy, fused AdamW through the project's `PlainEngine` (bf16 weights, float32
  master weights), one micro-batch of --batch-size x --grad-accum sequences: the baseline;
- the same with float32 weights under bf16 autocast and fused AdamW directly on them;
- stage 1, stage 2 (trainable=all) and stage 2 (trainable=mixers), each through the project's own
  training code: `convert`, `attach_teacher_attention` (stage 1), `select_trainable`, `make_engine`
  and `Trainer.step` with `STAGES[n]`; micro-batch --batch-size, --grad-accum micro-batches a step,
  so every row trains the same tokens per optimizer step;
- with --compile, each stage step again with `train.compile` (the work around the state updates
  compiled: the time mixers' steps, the norms and MLPs), right after the same step without it; "warmup_s" holds the untimed steps' seconds,
  the first of which pays the compilation;
- with --lead, the student reads a lead token before each sequence (`convert.lead`): "extra" as one
  token more than --seq-len (the toolkit until 2026-12-07), "within" as the first of --seq-len (its
  windows one token shorter, as `rwkvinside distill` now cuts them); tokens/s counts the targets;
- with --cuda-graph, each stage step again with `train.compile` and `train.cuda_graph` (the step
  replayed from a CUDA graph; its untimed warm-up runs at least to the step that captures).

Each runs --warmup steps (the first autotunes Triton kernels), then --steps timed steps, synchronised
around each (the median is reported), then one step under torch.profiler: the device time under each
of the code's `record_function` labels ("teacher forward", "wkv7", "loss", "optimizer"), each with
the backward of what ran under it (matched by autograd sequence number), and the rest of the step.
Peak memory is the allocator's peak from the built model on. Then a WKV-7 micro-benchmark (forward
+ backward at the stage shape: fla's defaults, the RWKV-7 decay bound, all layers' heads in one call
as stage 1 does) and, with --cold-start, stage 1's first step in a fresh process with an empty Triton
cache (seconds from "teacher loaded" to "first step complete").

--deepspeed measures only the two stage-2 steps, through `DeepSpeedEngine` (ZeRO-2). Under a launcher
the global batch stays --batch-size x --grad-accum sequences, split over the processes, so the losses
must match the 1-process run's (bf16: to about 1e-2): they are printed side by side, with the
speed-up, when the 1-process result is in --out.

A run of smollm2 with --cold-start outlasts a 10-minute command limit; split it, each part with its own
--out (the Triton cache of a machine that stays up between them shortens the later parts):
    --skip wkv7 --out A;  --skip steps --out B;  --skip steps wkv7 --cold-start --out C

Writes bench_stages-<model>.json (bench_stages-<model>-deepspeed-<N>gpu.json) and .md to --out
(default $OUT, else benchmarks/results/) and prints the table last.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile, record_function

from rwkvinside.config import STAGE_DEFAULTS, Config, EngineConfig, TrainConfig, resolve_device
from rwkvinside.distill.cuda_graph import WARMUP_STEPS
from rwkvinside.distill.engine import (ADAM_BETAS, ADAM_EPS, PlainEngine, launched_world, leave_process_group,
                                      make_engine)
from rwkvinside.distill.loop import Progress, Trainer, garbage_collected_between_steps
from rwkvinside.distill.metrics import RunLog
from rwkvinside.distill.stages import STAGES, Stage
from rwkvinside.modeling.alignment import attach_teacher_attention, learning_rate_scales, select_trainable
from rwkvinside.modeling.convert import ConversionSpec, convert
from rwkvinside.modeling.loading import load_teacher
from rwkvinside.modeling.teachers import AttentionGeometry
from rwkvinside.modeling.time_mixer import MAX_LOG_DECAY
from rwkvinside.ops.wkv7 import wkv7
from rwkvinside.ops.wkv7 import tuned
from rwkvinside.ops.wkv7.fla import RWKV7_CHUNK_OPTIONS, fla_available, wkv7_fla_chunk

logger = logging.getLogger("bench_stages")

ROOT = Path(__file__).resolve().parents[1]
# The parts of a step the code names with torch.profiler.record_function (grep the sources).
LABELS = ("teacher forward", "wkv7", "loss", "optimizer")
# The shapes: (model_type, config). Random weights unless --teacher loads smollm2's.
SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
           "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 100000.0}
QWEN25 = {"vocab_size": 151936, "max_position_embeddings": 32768, "tie_word_embeddings": True,
          "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False}
MODELS = {
    "smollm2": ("llama", SMOLLM2),
    "qwen2.5-0.5b": ("qwen2", {**QWEN25, "hidden_size": 896, "num_hidden_layers": 24,
                               "num_attention_heads": 14, "num_key_value_heads": 2,
                               "intermediate_size": 4864}),
    "qwen2.5-1.5b": ("qwen2", {**QWEN25, "hidden_size": 1536, "num_hidden_layers": 28,
                               "num_attention_heads": 12, "num_key_value_heads": 2,
                               "intermediate_size": 8960}),
}
# --dry-run's teacher: a tiny random llama (4 heads of 16, 2 key-value heads).
TINY = ("llama", {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                  "tie_word_embeddings": True})
MEASUREMENTS = {  # key -> row label, in the order of the table
    "teacher": "teacher fine-tuning: bf16 weights, fp32 master weights (PlainEngine)",
    "teacher_autocast": "teacher fine-tuning: fp32 weights, bf16 autocast",
    "stage1": "stage 1 (attention alignment)",
    "stage1_compiled": "stage 1, train.compile",
    "stage1_graphed": "stage 1, train.compile + train.cuda_graph",
    "stage2_all": "stage 2, trainable=all",
    "stage2_all_compiled": "stage 2, trainable=all, train.compile",
    "stage2_all_graphed": "stage 2, trainable=all, train.compile + train.cuda_graph",
    "stage2_mixers": "stage 2, trainable=mixers",
    "stage2_mixers_compiled": "stage 2, trainable=mixers, train.compile",
    "stage2_mixers_graphed": "stage 2, trainable=mixers, train.compile + train.cuda_graph",
}
LEADS = ("none", "extra", "within")  # --lead
LEAD_TOKEN = 0  # any id: the step's cost does not depend on it
TEACHER_LR = 1e-5  # a full fine-tuning learning rate; the step's cost does not depend on it
LOSS_TOLERANCE = 2e-2  # relative; bf16 runs on different process counts agree to about 1e-2


# ---- settings ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", "--model", nargs="+", choices=list(MODELS), default=["smollm2"],
                   help="teacher shapes to measure (default: smollm2)")
    p.add_argument("--teacher", default="smollm2-135m",
                   help="smollm2's weights: a .gguf file, an HF folder, 'smollm2-135m' (the embedded "
                        "teacher, the default) or 'random' (its shape, random weights); the qwen shapes are "
                        "always random")
    p.add_argument("--batch-size", type=int, default=8, help="the student's micro-batch (sequences)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="the student's micro-batches per optimizer step; the teacher runs them as one "
                        "micro-batch of batch-size x grad-accum sequences")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (Triton autotuning)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cold-start", action="store_true",
                   help="also time stage 1's first step in a fresh process with an empty Triton cache (fla's "
                        "kernel choices seeded from the record the package ships for this GPU, as in a user's run)")
    p.add_argument("--cold-start-untuned", action="store_true",
                   help="with --cold-start, also time it without the shipped record (every kernel autotunes)")
    p.add_argument("--record-fla-configs", type=Path, metavar="JSON",
                   help="write fla's kernel choices made in this run into this record file (merged), e.g. "
                        "src/rwkvinside/ops/wkv7/tuned/sm90.json")
    p.add_argument("--skip", nargs="+", choices=("steps", "wkv7"), default=[],
                   help="parts not to measure, to split a run over several commands (give each its own --out)")
    p.add_argument("--compile", action="store_true",
                   help="also measure each stage step with train.compile (after the same step without)")
    p.add_argument("--lead", choices=LEADS, default="none",
                   help="the student's lead token: none, one more than --seq-len, or the first of them")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also measure each stage step with train.compile and train.cuda_graph (its profile "
                        "shows the replayed graph's kernels without the code's labels)")
    p.add_argument("--rows", nargs="+", choices=list(MEASUREMENTS), default=[],
                   help="measure only these rows (default: all; the teacher's is every ratio's baseline)")
    p.add_argument("--deepspeed", action="store_true",
                   help="only the stage-2 steps, through DeepSpeed ZeRO-2 (run with 1, then 2 processes)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"),
                   help="output folder (default $OUT, else benchmarks/results/)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, float32, a tiny random llama (model 'tiny'), batch 2 x 32, 1 warm-up + 2 timed "
                        "steps, --cold-start (and --cold-start-untuned) included")
    p.add_argument("--cold-start-child", help=argparse.SUPPRESS)  # internal: the child's result file
    p.add_argument("--without-tuned-record", action="store_true", help=argparse.SUPPRESS)  # internal: child
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        args.models, args.batch_size, args.grad_accum, args.seq_len = ["tiny"], 2, 1, 32
        args.warmup, args.steps, args.cold_start, args.cold_start_untuned = 1, 2, True, True
    for name in ("batch_size", "grad_accum", "seq_len", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.deepspeed and args.cold_start and not args.dry_run:
        p.error("--cold-start measures the plain engine's stage 1; run it without --deepspeed")
    return args


@dataclass(frozen=True)
class World:
    """This process: its rank among `size` processes, its device, the compute dtype."""

    rank: int
    size: int
    device: torch.device
    dtype: torch.dtype

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def launch_alone() -> None:
    """What a launcher sets for one process (`deepspeed --num_gpus 1` without the launcher): the
    DeepSpeed engine needs a process group, which otherwise it would look for through MPI."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


def make_world(args: argparse.Namespace) -> World:
    rank, local_rank, size = launched_world()
    if args.dry_run:
        # Tiny ops split over threads only wait on each other, badly so on a busy machine (the tests
        # do the same: tests/conftest.py).
        torch.set_num_threads(1)
    device = torch.device("cpu") if args.dry_run else resolve_device("auto", local_rank)
    if not args.dry_run and device.type != "cuda":
        raise SystemExit("no GPU here: run with --dry-run for the CPU version")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and the allocator's statistics follow the current device
    if args.batch_size % size:
        raise SystemExit(f"--batch-size {args.batch_size} must split evenly over {size} processes")
    return World(rank, size, device, torch.float32 if args.dry_run else torch.bfloat16)


def run_config(args: argparse.Namespace, world: World, trainable: str, deepspeed: bool,
               variant: str = "eager") -> Config:
    """The distillation config of a measurement: the micro-batch per process (the global batch split
    over the processes), a step budget for the schedule, the stages' own learning rates. variant:
    "eager", "compiled" (train.compile) or "graphed" (train.compile and train.cuda_graph)."""
    total_steps = warmup_steps(args, variant) + args.steps + 1  # + the profiled step
    train = TrainConfig(batch_size=args.batch_size // world.size, grad_accum=args.grad_accum, seed=args.seed,
                        compile=variant != "eager", cuda_graph=variant == "graphed")
    stages = {f"stage{n}": dataclasses.replace(STAGE_DEFAULTS[n](), max_steps=total_steps) for n in (1, 2)}
    stages["stage2"] = dataclasses.replace(stages["stage2"], trainable=trainable)
    engine = EngineConfig(kind="deepspeed" if deepspeed else "plain", zero_stage=2)
    return Config(train=train, engine=engine, **stages)


# ---- models and data -----------------------------------------------------------------------------


def build_teacher(model: str, args: argparse.Namespace, world: World) -> tuple[nn.Module, str]:
    """(teacher in eval mode, frozen, on the device in the compute dtype; where its weights came from)."""
    if model == "smollm2" and args.teacher != "random":
        teacher, _ = load_teacher(args.teacher, dtype=world.dtype, device=world.device)
        teacher.set_attn_implementation("sdpa")
        source = args.teacher
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        model_type, shape = TINY if model == "tiny" else MODELS[model]
        config = AutoConfig.for_model(model_type, **shape)
        torch.manual_seed(args.seed)  # the same weights in every process and every run
        with world.device:  # initialised where it runs: a 1.5B model initialises slowly on the CPU
            teacher = AutoModelForCausalLM.from_config(config, dtype=world.dtype, attn_implementation="sdpa")
        teacher.config.use_cache = False
        source = "random"
    return teacher.requires_grad_(False).eval(), source


def synthetic_batches(vocab_size: int, seq_len: int, global_batch: int, seed: int, world: World
                      ) -> Iterator[dict[str, Tensor]]:
    """Endless batches of the data contract (src/rwkvinside/data/batch.py), each [global_batch /
    world.size, seq_len]: random token ids, labels the next tokens (shifted here, once), an all-ones
    mask. Every process draws the same global batch and keeps its own rows, so the processes together
    see what one process sees at the same global batch."""
    generator = torch.Generator().manual_seed(seed)
    rows = global_batch // world.size
    mine = slice(world.rank * rows, (world.rank + 1) * rows)
    while True:
        tokens = torch.randint(0, vocab_size, (global_batch, seq_len + 1), generator=generator)[mine]
        input_ids = tokens[:, :-1].contiguous()
        yield {"input_ids": input_ids, "labels": tokens[:, 1:].contiguous(),
               "attention_mask": torch.ones_like(input_ids)}


def window_len(args: argparse.Namespace) -> int:
    """Tokens of text a sequence holds: --seq-len, less the lead where the lead is one of them."""
    return args.seq_len - 1 if args.lead == "within" else args.seq_len


def conversion(args: argparse.Namespace) -> ConversionSpec:
    return ConversionSpec(lead_token_id=None if args.lead == "none" else LEAD_TOKEN)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()  # engines and optimizers hold reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- the steps measured --------------------------------------------------------------------------

Step = Callable[[], float]  # one optimizer step; returns its loss (read back once, after the step)


def trainer_step(stage: Stage, config: Config, student: nn.Module, teacher: nn.Module | None,
                 args: argparse.Namespace, world: World) -> Step:
    """The project's own step: select_trainable, make_engine, Trainer.step over synthetic batches."""
    stage_config = config.stage(stage.number)
    trainable = select_trainable(student, stage_config.trainable)
    engine = make_engine(student, trainable, config.train, config.engine, world.device, world.dtype,
                         learning_rate_scales(student, trainable, stage_config.teacher_lr_scale))
    vocab_size = student.config.text_config.vocab_size
    loader = synthetic_batches(vocab_size, window_len(args), args.batch_size, args.seed, world)
    log = RunLog(None, f"stage{stage.number}", None, progress=False, tensorboard=False)  # writes nothing
    trainer = Trainer(stage, config, student, teacher, loader, engine, Path(args.out), log)
    student.train()
    progress = Progress()

    def step() -> float:
        record = trainer.step(progress)
        if not record["applied"]:
            logger.warning("step %d: not applied (loss or gradient not finite)", record["step"])
        progress.step = record["step"]
        progress.tokens += record["tokens_in_step"]
        return record["loss"]

    return step


def variant_of(key: str) -> str:
    """A measurement's variant, which its key ends with: "compiled", "graphed", or else "eager"."""
    return next((variant for variant in ("compiled", "graphed") if key.endswith(f"_{variant}")), "eager")


def warmup_steps(args: argparse.Namespace, variant: str) -> int:
    """--warmup, but at least up to the step that captures the CUDA graph, which is not timed."""
    return max(args.warmup, WARMUP_STEPS + 1) if variant == "graphed" else args.warmup


def build_stage1(teacher: nn.Module, args: argparse.Namespace, world: World, variant: str = "eager") -> Step:
    """Stage 1 as the pipeline builds it: the student shares the teacher's tensors and holds its
    attentions beside the time mixers."""
    torch.manual_seed(args.seed)  # the mixers' initialisation
    student = convert(teacher, conversion(args))
    attach_teacher_attention(student, teacher)
    config = run_config(args, world, "mixers", False, variant)
    return trainer_step(STAGES[1], config, student, None, args, world)


def build_stage2(teacher: nn.Module, trainable: str, args: argparse.Namespace, world: World,
                 variant: str = "eager") -> Step:
    """Stage 2: a student with weights of its own (the pipeline loads stage 1's from its folder; here a
    converted copy of the teacher) beside the frozen teacher, which gives the logits."""
    torch.manual_seed(args.seed)
    student = convert(copy.deepcopy(teacher), conversion(args))  # the copy's attentions go with it
    config = run_config(args, world, trainable, args.deepspeed, variant)
    return trainer_step(STAGES[2], config, student, teacher, args, world)


def teacher_batches(teacher: nn.Module, args: argparse.Namespace, world: World
                    ) -> Iterator[dict[str, Tensor]]:
    """The teacher's micro-batches: all of a step's sequences (batch-size x grad-accum) at once, on the
    device. No attention mask: packed text masks nothing, and the Trainer drops such masks too."""
    batches = synthetic_batches(teacher.config.vocab_size, window_len(args),
                                args.batch_size * args.grad_accum, args.seed, world)
    for batch in batches:
        yield {key: batch[key].to(world.device) for key in ("input_ids", "labels")}


def hf_loss(teacher: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The HF model's own cross-entropy. Our labels are shifted already: `shift_labels` stops the
    model from shifting them a second time."""
    return teacher(input_ids=batch["input_ids"], labels=batch["labels"], shift_labels=batch["labels"]).loss


def build_teacher_finetune(teacher: nn.Module, args: argparse.Namespace, world: World) -> Step:
    """Full fine-tuning through PlainEngine: every parameter trained, bf16 weights for compute, a
    float32 master copy of each for fused AdamW (the scheme the student trains with)."""
    teacher.requires_grad_(True).train()
    train = TrainConfig(batch_size=args.batch_size * args.grad_accum)  # grad_accum 1: one micro-batch
    engine = PlainEngine(dict(teacher.named_parameters()), train, world.device)
    engine.set_schedule(TEACHER_LR, 0.0)
    batches = teacher_batches(teacher, args, world)

    def step() -> float:
        loss = hf_loss(teacher, next(batches))
        engine.backward(loss)
        _, applied = engine.finish_step()
        loss, applied = torch.stack([loss.detach().float(), applied.float()]).tolist()
        if not applied:
            logger.warning("teacher step not applied (loss or gradient not finite)")
        return loss

    return step


def build_teacher_autocast(teacher: nn.Module, args: argparse.Namespace, world: World) -> Step:
    """Full fine-tuning the other common way: float32 weights, the forward pass under bf16 autocast,
    fused AdamW (PlainEngine's betas, eps and clipping) directly on the weights."""
    for param in teacher.parameters():  # not teacher.float(): transformers refuses it on a GGUF-loaded model
        param.data = param.data.float()
    teacher.requires_grad_(True).train()
    params = list(teacher.parameters())
    optimizer = torch.optim.AdamW(params, lr=TEACHER_LR, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0,
                                  fused=True)
    clip = TrainConfig().grad_clip
    batches = teacher_batches(teacher, args, world)

    def step() -> float:
        with torch.autocast(world.device.type, dtype=torch.bfloat16):
            loss = hf_loss(teacher, next(batches))
        loss.backward()
        with record_function("optimizer"):
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


# ---- measuring -----------------------------------------------------------------------------------


def timed_steps(step: Step, count: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Run `count` steps, synchronised around each: (their losses, their seconds)."""
    losses, seconds = [], []
    for _ in range(count):
        synchronize(device)
        started = time.perf_counter()
        losses.append(step())
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return losses, seconds


def measure(key: str, build: Callable[[], Step], args: argparse.Namespace, world: World) -> dict[str, Any]:
    """Build a step, run --warmup + --steps steps (synchronised around each timed one) and one step
    under the profiler; the step's objects are freed before returning."""
    logger.info("%s: building", MEASUREMENTS[key])
    free_memory(world.device)
    tokens = args.batch_size * args.grad_accum * window_len(args)  # targets per optimizer step, all processes
    result: dict[str, Any] = {"label": MEASUREMENTS[key], "tokens_per_step": tokens}
    step = None
    try:
        step = build()
        with garbage_collected_between_steps():  # as Trainer.run; Trainer.step collects now and then
            if world.cuda:
                torch.cuda.reset_peak_memory_stats(world.device)
            # the first warm-up step compiles (Triton, and torch.compile where asked)
            warmup = warmup_steps(args, variant_of(key))
            losses, result["warmup_s"] = timed_steps(step, warmup, world.device)
            timed_losses, times = timed_steps(step, args.steps, world.device)
            losses += timed_losses
            loss, result["profile"] = profiled_step(step, world.device)
            losses.append(loss)
            median = statistics.median(times)
            peak = torch.cuda.max_memory_allocated(world.device) / 2**30 if world.cuda else None
            result.update(step_ms=[1e3 * t for t in times], median_ms=1e3 * median,
                          tokens_per_s=tokens / median, tokens_per_s_per_gpu=tokens / median / world.size,
                          losses=losses, peak_gb=peak)
            logger.info("%s: %.1f ms/step, %.0f tokens/s; losses %s", MEASUREMENTS[key],
                        result["median_ms"], result["tokens_per_s"], " ".join(f"{x:.5g}" for x in losses))
    except torch.cuda.OutOfMemoryError:
        logger.warning("%s: out of memory", MEASUREMENTS[key])
        result["error"] = "out of memory"
    finally:
        del step
        free_memory(world.device)
    return result


def profiled_step(step: Step, device: torch.device) -> tuple[float, dict[str, Any]]:
    """One step under torch.profiler; (its loss, its time by label in ms). On the CPU the times are
    CPU times (there is no device timeline)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        loss = step()
        synchronize(device)
    return loss, time_by_label(prof, on_device=device.type == "cuda")


def time_by_label(prof: profile, on_device: bool) -> dict[str, Any]:
    """Device time (CPU time without a device) of one profiled step, split by LABELS.

    `by_label_ms` attributes each op's own kernels (own CPU time on the CPU) to the nearest label
    around it; an op of the backward pass, which runs outside every label (in autograd's own thread
    on a GPU), goes to the label its forward op ran under, found by the autograd sequence number
    that both carry. "rest" is the step's total minus the labels: on a GPU the total is every kernel,
    copy and memset of the step. `ranges_ms` is the plain reading of `key_averages()`: the kernels
    launched inside each label's range, forward only. A label absent from the step counts 0.
    """
    from torch.autograd import DeviceType

    events = prof.events()
    host = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    own = (lambda e: e.self_device_time_total) if on_device else (lambda e: e.self_cpu_time_total)
    forward = forward_labels(host)
    by_label = dict.fromkeys(LABELS, 0.0)
    for event in host:
        label = label_of(event, forward)
        if label is not None:
            by_label[label] += own(event)
    if on_device:
        total = sum(e.time_range.elapsed_us() for e in events
                    if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
    else:
        total = sum(own(e) for e in host)
    ranges = dict.fromkeys(LABELS, 0.0)
    for row in prof.key_averages():
        if row.key in ranges and row.device_type == DeviceType.CPU:  # not the GPU-side annotation rows
            ranges[row.key] += row.device_time_total if on_device else row.cpu_time_total
    by_label["rest"] = max(0.0, total - sum(by_label.values()))
    return {"clock": "device" if on_device else "cpu", "total_ms": total / 1e3,
            "by_label_ms": {k: v / 1e3 for k, v in by_label.items()},
            "ranges_ms": {k: v / 1e3 for k, v in ranges.items()}}


BACKWARD_SCOPE = 1  # RecordScope::BACKWARD_FUNCTION: an autograd node running in the backward pass
EVALUATE = "autograd::engine::evaluate_function: "


def backward_key(event) -> tuple[int, int] | None:
    """(sequence number, forward thread) of a backward-pass event: what its forward op carries as
    (sequence number, thread)."""
    if event.sequence_nr >= 0 and (event.scope == BACKWARD_SCOPE or event.name.startswith(EVALUATE)):
        return event.sequence_nr, event.fwd_thread
    return None


def enclosing_label(event) -> str | None:
    while event is not None:
        if event.name in LABELS:
            return event.name
        event = event.cpu_parent
    return None


def forward_labels(host_events: list) -> dict[tuple[int, int], str]:
    """(sequence number, thread) of every forward op that ran under a label -> that label."""
    found = {}
    for event in host_events:
        if event.sequence_nr >= 0 and backward_key(event) is None:
            label = enclosing_label(event)
            if label is not None:
                found.setdefault((event.sequence_nr, event.thread), label)
    return found


def label_of(event, forward: dict[tuple[int, int], str]) -> str | None:
    """The nearest label around an op, or for a backward op its forward op's label."""
    while event is not None:
        if event.name in LABELS:
            return event.name
        key = backward_key(event)
        if key is not None and key in forward:
            return forward[key]
        event = event.cpu_parent
    return None


# ---- the WKV-7 micro-benchmark -------------------------------------------------------------------


def wkv7_inputs(batch: int, seq_len: int, heads: int, head_size: int, device: torch.device,
                dtype: torch.dtype, seed: int) -> tuple[Tensor, ...]:
    """r, w, k, v, a, b [B, T, H, N] as a time mixer makes them (requiring gradients): w in
    (-e^{-1/2}, 0), a = -kk and b = kk * iclr with kk of unit norm per head, iclr in (0, 1)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, seq_len, heads, head_size)

    def randn() -> Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    r, k, v = randn(), randn(), randn()
    w = -MAX_LOG_DECAY * torch.sigmoid(randn())
    removal = nn.functional.normalize(randn(), dim=-1)
    iclr = torch.sigmoid(randn())
    return tuple(x.to(dtype).requires_grad_(True) for x in (r, w, k, v, -removal, removal * iclr))


def time_wkv7(call: Callable[..., tuple[Tensor, Tensor | None]], inputs: tuple[Tensor, ...],
              args: argparse.Namespace, device: torch.device) -> float:
    """Median ms of forward + backward of `call(*inputs)` after --warmup untimed calls."""
    grad = torch.randn_like(inputs[3])  # d loss / d output, [B, T, H, N]

    def once() -> None:
        output, _ = call(*inputs)
        output.backward(grad)
        for x in inputs:
            x.grad = None

    for _ in range(max(args.warmup, 1)):  # at least once: the first call autotunes
        once()
    times = []
    for _ in range(args.steps):
        synchronize(device)
        started = time.perf_counter()
        once()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


@dataclass(frozen=True)
class Wkv7Variant:
    name: str
    call: Callable[..., tuple[Tensor, Tensor | None]]  # (r, w, k, v, a, b) -> (output, state)
    layers_per_call: int = 1  # > 1: that many layers' heads stacked in one call
    calls_fla: bool = False  # calls fla directly (not through the dispatcher): CUDA only


def wkv7_variants(layers: int) -> list[Wkv7Variant]:
    floor = -MAX_LOG_DECAY  # RWKV-7's bound on the log decay: the dispatcher passes RWKV7_CHUNK_OPTIONS
    # The dispatcher has fla keep the forward's intermediates for the backward (disable_recompute); the
    # last variant recomputes them, as fla does by default.
    return [
        Wkv7Variant("fla defaults (decay_floor=None)", lambda *x: wkv7(*x, scale=1.0)),
        Wkv7Variant("decay_floor=-exp(-0.5): RWKV7_CHUNK_OPTIONS",
                    lambda *x: wkv7(*x, scale=1.0, decay_floor=floor)),
        Wkv7Variant(f"the same, {layers} layers' heads in one call (stage 1)",
                    lambda *x: wkv7(*x, scale=1.0, decay_floor=floor), layers_per_call=layers),
        Wkv7Variant("RWKV7_CHUNK_OPTIONS, recomputing in the backward (wkv7_fla_chunk)",
                    lambda *x: wkv7_fla_chunk(*x, scale=1.0, **RWKV7_CHUNK_OPTIONS, disable_recompute=False),
                    calls_fla=True),
    ]


def wkv7_benchmark(geometry: AttentionGeometry, args: argparse.Namespace, world: World) -> dict[str, Any]:
    """Forward + backward of the state update at the stage shape (B = --batch-size, T = --seq-len, the
    student's heads), per layer-equivalent. On the CPU `wkv7` takes the PyTorch chunked form; the
    variant that calls fla directly needs CUDA."""
    heads, head_size, layers = geometry.num_heads, geometry.head_dim, geometry.num_layers
    results: dict[str, Any] = {}
    for index, variant in enumerate(wkv7_variants(layers)):
        if variant.calls_fla and not world.cuda:
            logger.info("wkv7 %s: skipped (no CUDA)", variant.name)
            results[variant.name] = {"skipped": "skipped (no CUDA)"}
            continue
        free_memory(world.device)
        per_call = variant.layers_per_call
        inputs = wkv7_inputs(args.batch_size, args.seq_len, heads * per_call, head_size, world.device,
                             world.dtype, args.seed + index)
        try:
            ms = time_wkv7(variant.call, inputs, args, world.device)
        except torch.cuda.OutOfMemoryError:
            results[variant.name] = {"skipped": "out of memory"}
            continue
        finally:
            del inputs
        results[variant.name] = {"heads_per_call": heads * per_call, "layers_per_call": per_call,
                                 "ms_per_call": ms, "ms_per_layer": ms / per_call,
                                 "ms_all_layers": ms / per_call * layers,
                                 "implementation": "fla" if world.cuda else "PyTorch chunked form (CPU)"}
        logger.info("wkv7 %s: %.3f ms per layer", variant.name, ms / per_call)
    free_memory(world.device)
    baseline = next(iter(results.values())).get("ms_per_layer")
    for result in results.values():
        if "ms_per_layer" in result and baseline:
            result["x_fla_defaults"] = result["ms_per_layer"] / baseline
    return {"batch": args.batch_size, "seq_len": args.seq_len, "heads": heads, "head_size": head_size,
            "layers": layers, "dtype": str(world.dtype).removeprefix("torch."), "variants": results}


# ---- cold start ----------------------------------------------------------------------------------


def cold_start(model: str, args: argparse.Namespace, tuned_record: bool = True) -> dict[str, Any]:
    """Stage 1's first step in a fresh process whose Triton cache is a new empty folder: every kernel
    compiles again, as on a new machine, and autotunes unless the shipped record names its choice
    (`tuned_record=False` hides the record: every kernel autotunes)."""
    with tempfile.TemporaryDirectory(prefix="bench_stages_triton_") as cache, \
            tempfile.TemporaryDirectory(prefix="bench_stages_cold_") as scratch:
        result_path = Path(scratch) / "cold_start.json"
        # --dry-run picks its own tiny model and sizes
        sizes = ["--dry-run"] if args.dry_run else [
            "--models", model, "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
            "--seq-len", str(args.seq_len)]
        command = [sys.executable, str(Path(__file__).resolve()), *sizes, "--teacher", args.teacher,
                   "--seed", str(args.seed), "--lead", args.lead, "--out", scratch,
                   "--cold-start-child", str(result_path),
                   *([] if tuned_record else ["--without-tuned-record"])]
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        logger.info("cold start: %s (TRITON_CACHE_DIR=%s)", " ".join(command), cache)
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True)
        result = json.loads(result_path.read_text())
    result["process_s"] = time.perf_counter() - started
    return result


def cold_start_child(args: argparse.Namespace) -> None:
    """In the fresh process: load the teacher, then build stage 1 and run its first step."""
    if args.without_tuned_record:
        tuned.TUNED_DIR = Path(tempfile.mkdtemp(prefix="bench_stages_no_record_"))
    world = make_world(args)
    started = time.perf_counter()
    teacher, _ = build_teacher(args.models[0], args, world)
    synchronize(world.device)
    loaded = time.perf_counter()
    step = build_stage1(teacher, args, world)
    step()
    synchronize(world.device)
    done = time.perf_counter()
    Path(args.cold_start_child).write_text(json.dumps(
        {"teacher_load_s": loaded - started, "teacher_loaded_to_first_step_s": done - loaded,
         "tuned_record": not args.without_tuned_record,
         "seeded_entries": tuned.seed_fla_kernels() if world.cuda and fla_available() else 0}))


# ---- one model -----------------------------------------------------------------------------------


def run_model(model: str, args: argparse.Namespace, world: World, report: dict[str, Any],
              save: Callable[[], None]) -> None:
    """Every measurement of one teacher shape, into `report`; `save()` after each one, so that a run
    cut short keeps what it measured. The stages run first, the teacher's fine-tuning last: it trains
    (and then casts) the teacher itself, as a user's fine-tuning would, so that its peak memory holds
    no second copy."""
    teacher, source = build_teacher(model, args, world)
    geometry = AttentionGeometry.of(teacher.config)
    report.update(model=model, teacher=source, measurements={}, wkv7=None, cold_start=None,
                  cold_start_untuned=None, shape={
        "model_type": teacher.config.model_type, "hidden_size": geometry.hidden_size,
        "layers": geometry.num_layers, "heads": geometry.num_heads, "kv_heads": geometry.num_kv_heads,
        "head_size": geometry.head_dim, "intermediate_size": teacher.config.intermediate_size,
        "vocab_size": teacher.config.vocab_size, "parameters": sum(p.numel() for p in teacher.parameters()),
        "attn_implementation": teacher.config._attn_implementation})
    plan: list[tuple[str, Callable[[], Step]]] = [
        ("stage1", lambda: build_stage1(teacher, args, world)),
        ("stage1_compiled", lambda: build_stage1(teacher, args, world, "compiled")),
        ("stage1_graphed", lambda: build_stage1(teacher, args, world, "graphed")),
        ("stage2_all", lambda: build_stage2(teacher, "all", args, world)),
        ("stage2_all_compiled", lambda: build_stage2(teacher, "all", args, world, "compiled")),
        ("stage2_all_graphed", lambda: build_stage2(teacher, "all", args, world, "graphed")),
        ("stage2_mixers", lambda: build_stage2(teacher, "mixers", args, world)),
        ("stage2_mixers_compiled", lambda: build_stage2(teacher, "mixers", args, world, "compiled")),
        ("stage2_mixers_graphed", lambda: build_stage2(teacher, "mixers", args, world, "graphed")),
        ("teacher", lambda: build_teacher_finetune(teacher, args, world)),
        ("teacher_autocast", lambda: build_teacher_autocast(teacher, args, world)),
    ]
    for key, build in plan:
        if "steps" in args.skip or (args.deepspeed and not key.startswith("stage2")):
            continue  # DeepSpeed: the stage-2 steps only
        wanted = {"eager": True, "compiled": args.compile, "graphed": args.cuda_graph}[variant_of(key)]
        if not wanted or (args.rows and key not in args.rows):
            continue
        report["measurements"][key] = measure(key, build, args, world)
        save()
    del teacher, plan
    free_memory(world.device)
    if not args.deepspeed and "wkv7" not in args.skip:
        report["wkv7"] = wkv7_benchmark(geometry, args, world)
        save()
    if args.cold_start and not args.deepspeed:
        report["cold_start"] = cold_start(model, args)
        save()
        if args.cold_start_untuned:
            report["cold_start_untuned"] = cold_start(model, args, tuned_record=False)
            save()


def add_ratios(measurements: dict[str, Any]) -> dict[str, Any]:
    """The measurements in table order, each with its speed as a multiple of the teacher's fine-tuning
    step (speed_vs_teacher: its tokens/s over the teacher's, the issue's targets' sense; every row
    trains the same tokens per step)."""
    ordered = {key: measurements[key] for key in MEASUREMENTS if key in measurements}
    baseline = ordered.get("teacher", {}).get("median_ms")
    for result in ordered.values():
        result["speed_vs_teacher"] = baseline / result["median_ms"] if baseline and "median_ms" in result else None
    return ordered


# ---- output --------------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "flash-linear-attention", "fla-core", "triton", "deepspeed"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def result_name(model: str, args: argparse.Namespace, world: World) -> str:
    suffix = f"-deepspeed-{world.size}gpu" if args.deepspeed else ""
    lead = f"-lead-{args.lead}" if args.lead != "none" else ""
    return f"bench_stages-{model}{lead}{suffix}"


def compare_losses(report: dict[str, Any], out: Path, model: str, world: World) -> dict[str, Any]:
    """DeepSpeed: the per-step losses beside those of the 1-process DeepSpeed run and of the plain
    engine's run (where their results are in --out), and the speed-up over the 1-process run."""
    references = {"plain engine, 1 process": out / f"bench_stages-{model}.json",
                  "DeepSpeed, 1 process": out / f"bench_stages-{model}-deepspeed-1gpu.json"}
    comparison: dict[str, Any] = {}
    for key, result in report["measurements"].items():
        entry: dict[str, Any] = {"losses": {f"DeepSpeed, {world.size} process(es)": result.get("losses")}}
        for name, path in references.items():
            if not path.is_file() or (world.size == 1 and name.startswith("DeepSpeed")):
                continue
            other = json.loads(path.read_text())["measurements"].get(key, {})
            if "losses" not in other or "losses" not in result:
                continue
            entry["losses"][name] = other["losses"]
            pairs = list(zip(result["losses"], other["losses"]))
            worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)
            entry[f"max_relative_difference vs {name}"] = worst
            entry[f"match vs {name}"] = worst <= LOSS_TOLERANCE
            if name.startswith("DeepSpeed") and "tokens_per_s" in other:
                entry["speed_up_vs_1_process"] = result["tokens_per_s"] / other["tokens_per_s"]
                result["speed_up_vs_1_process"] = entry["speed_up_vs_1_process"]
        comparison[key] = entry
    return comparison


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def steps_table(report: dict[str, Any], settings: dict[str, Any]) -> str:
    shape, deepspeed = report["shape"], settings["deepspeed"]
    processes = f" per process, {report['world_size']} process(es)" if deepspeed else ""
    window = settings["tokens_per_step"] // settings["teacher_micro_batch"]
    teacher = "" if deepspeed else f"; teacher {settings['teacher_micro_batch']} x {window}"
    lead = {"none": "", "extra": f", a lead token before each {window}",
            "within": f", a lead token and {window} of text"}[settings.get("lead", "none")]
    engine = "DeepSpeed ZeRO-2" if deepspeed else "plain"
    clock = "device" if settings["device_type"] == "cuda" else "CPU"
    header = (f"Training steps, {settings['dtype']}, on {report['device']}: {report['model']} (teacher "
              f"`{report['teacher']}`, {shape['layers']} layers, width {shape['hidden_size']}, "
              f"{shape['heads']} heads of {shape['head_size']}), {settings['tokens_per_step']} tokens per "
              f"optimizer step (student {settings['micro_batch_per_process']} x {settings['seq_len']}{lead} "
              f"per micro-batch{processes}, grad_accum {settings['grad_accum']}{teacher}), "
              f"engine {engine}. Median of {settings['steps']} steps after {settings['warmup']} warm-up "
              f"steps. Profiler columns: {clock} ms of one profiled step under each label, backward "
              f"included; rest = the step's total minus the labels.")
    columns = ["step", "tokens/s"] + (["tokens/s per GPU", "speed-up vs 1 GPU"] if deepspeed else [])
    columns += ["ms/step", "x teacher's tokens/s", "peak GB", *LABELS, "rest", "profiled total"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
    for result in report["measurements"].values():
        if "error" in result:
            lines.append(f"| {result['label']} | {result['error']} |" + " |" * (len(columns) - 2))
            continue
        profile_ms = result["profile"]["by_label_ms"]
        cells = [result["label"], f"{result['tokens_per_s']:,.0f}"]
        if deepspeed:
            cells += [f"{result['tokens_per_s_per_gpu']:,.0f}",
                      _cell(result.get("speed_up_vs_1_process"), ".2f")]
        cells += [f"{result['median_ms']:.1f}", _cell(result.get("speed_vs_teacher"), ".2f"),
                  _cell(result["peak_gb"], ".2f")]
        cells += [f"{profile_ms[label]:.1f}" for label in (*LABELS, "rest")]
        cells.append(f"{result['profile']['total_ms']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def wkv7_table(wkv: dict[str, Any]) -> str:
    lines = [f"WKV-7 forward + backward, {wkv['dtype']}, B={wkv['batch']}, T={wkv['seq_len']}, "
             f"{wkv['heads']} heads of {wkv['head_size']} per layer, {wkv['layers']} layers:", "",
             "| variant | heads per call | ms per call | ms per layer | ms for all layers | x fla defaults |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in wkv["variants"].items():
        if "skipped" in r:
            lines.append(f"| {name} | {r['skipped']} | | | | |")
        else:
            lines.append(f"| {name} | {r['heads_per_call']} | {r['ms_per_call']:.3f} | "
                         f"{r['ms_per_layer']:.3f} | {r['ms_all_layers']:.2f} | "
                         f"{_cell(r.get('x_fla_defaults'), '.2f')} |")
    return "\n".join(lines) + "\n"


def losses_table(comparison: dict[str, Any]) -> str:
    lines = []
    for key, entry in comparison.items():
        runs = entry["losses"]
        names = [name for name, losses in runs.items() if losses]
        if not names:
            continue
        verdicts = [f"{k.removeprefix('max_relative_difference vs ')}: {v:.1e} "
                    f"({'match' if v <= LOSS_TOLERANCE else 'DIFFER'})" for k, v in entry.items()
                    if k.startswith("max_relative_difference")]
        lines += [f"Per-step losses, {MEASUREMENTS[key]} (warm-up, timed, profiled steps; max relative "
                  f"difference {', '.join(verdicts) or 'n/a: no other run in --out yet'}; tolerance "
                  f"{LOSS_TOLERANCE:g}):", "",
                  "| step | " + " | ".join(names) + " |", "|---:" + "|---:" * len(names) + "|"]
        for step in range(max(len(runs[name]) for name in names)):
            cells = [_cell(runs[name][step] if step < len(runs[name]) else None, ".6g") for name in names]
            lines.append(f"| {step + 1} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """The markdown of one model: the loss comparison, the WKV-7 table, the cold start, then the steps."""
    parts = []
    if report.get("loss_comparison"):
        parts.append(losses_table(report["loss_comparison"]))
    if report.get("wkv7"):
        parts.append(wkv7_table(report["wkv7"]))
    for key, how in (("cold_start", "fla's kernel choices seeded from the shipped record"),
                     ("cold_start_untuned", "no record: every kernel autotunes")):
        cold = report.get(key)
        if cold:
            parts.append(f"Cold start (fresh process, empty Triton cache; {how}, {cold.get('seeded_entries', 0)} "
                         f"entries seeded): stage 1's first step complete "
                         f"{cold['teacher_loaded_to_first_step_s']:.2f} s after the teacher was loaded (loading "
                         f"took {cold['teacher_load_s']:.2f} s; the whole process {cold['process_s']:.1f} s).\n")
    if report["measurements"]:
        parts.append(steps_table(report, report["settings"]))
    return "\n".join(parts)


def main() -> None:
    args = parse_args()
    rank = launched_world()[0]
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.cold_start_child:
        cold_start_child(args)
        return
    if args.deepspeed and "WORLD_SIZE" not in os.environ:
        launch_alone()
    world = make_world(args)
    out = Path(args.out)
    if world.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    tables = []
    try:
        for model in args.models:
            device = torch.cuda.get_device_name(world.device) if world.cuda else "CPU"
            report = {"benchmark": "bench_stages", "device": device, "world_size": world.size,
                      "versions": versions(), "git_commit": git_commit(),
                      "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
            internal = ("out", "models", "cold_start_child", "local_rank")
            report["settings"] = {
                **{k: v for k, v in vars(args).items() if k not in internal},
                "device_type": world.device.type, "dtype": str(world.dtype).removeprefix("torch."),
                "micro_batch_per_process": args.batch_size // world.size,
                "teacher_micro_batch": args.batch_size * args.grad_accum,
                "tokens_per_step": args.batch_size * args.grad_accum * window_len(args),
                "engine": "deepspeed, ZeRO-2" if args.deepspeed else "plain"}
            name = result_name(model, args, world)

            def save() -> str | None:
                """Write the report so far (the main process only); returns its markdown."""
                if world.rank != 0:
                    return None
                report["measurements"] = add_ratios(report["measurements"])
                if args.deepspeed:
                    report["loss_comparison"] = compare_losses(report, out, model, world)
                markdown = render(report)
                (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=str))
                (out / f"{name}.md").write_text(markdown)
                if args.record_fla_configs and world.cuda and fla_available():
                    tuned.write_record(args.record_fla_configs)
                return markdown

            run_model(model, args, world, report, save)
            tables.append(save())
    finally:
        if args.deepspeed:
            leave_process_group()
    if world.rank == 0:
        print("\n".join(tables))


if __name__ == "__main__":
    main()
