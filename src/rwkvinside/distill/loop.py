"""One training loop for every stage (the seed's flowchart, top to bottom).

    until the budget is spent:
        set learning rate and weight decay from the schedule
        for each micro-batch: forward, loss (the Stage's), backward
        optimizer step at the accumulation boundary
        log; save a checkpoint when due

The loop is engine-agnostic and stage-agnostic: the Stage computes the loss, the Engine owns the
optimizer and the process group. Where it can, the loop replays each step from a CUDA graph
(cuda_graph.py): the same work, without the host's Python in between.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rwkvinside.config import Config, StageConfig
from rwkvinside.distill.checkpoint import save_checkpoint
from rwkvinside.distill.cuda_graph import CapturedStep
from rwkvinside.distill.engine import Engine
from rwkvinside.distill.metrics import RunLog
from rwkvinside.distill.stages import Stage
from rwkvinside.errors import UserError
from rwkvinside.modeling.teachers import compile_pointwise_blocks, family_of

logger = logging.getLogger(__name__)


# Python's cyclic garbage collector, left to itself, runs full collections in the middle of steps: on
# an H200 they cost stage 1 of SmolLM2 35 of its 228 ms a step (BENCHMARKS.md). During a stage the
# loop collects the young generations itself, every this many steps, between two steps.
COLLECT_GARBAGE_EVERY = 50


@contextmanager
def garbage_collected_between_steps() -> Iterator[None]:
    """Automatic garbage collection off for the block (Trainer.step collects), as it was after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class Progress:
    """Counters that a checkpoint restores. `elapsed` is training time, summed over resumptions."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    bad_steps: int = 0  # non-finite losses or gradients in a row


def budget_fraction(progress: Progress, stage: StageConfig) -> float:
    """How much of the budget is spent, in [0, 1]: the furthest of the step/token/time budgets."""
    fractions = []
    if stage.max_steps:
        fractions.append(progress.step / stage.max_steps)
    if stage.max_tokens:
        fractions.append(progress.tokens / stage.max_tokens)
    if stage.max_time:
        fractions.append(progress.elapsed / stage.max_time)
    return min(1.0, max(fractions))


def ended_by(progress: Progress, stage: StageConfig) -> str:
    """The budget that ended a stage: the one furthest spent (each set budget's fraction)."""
    spent = {"max_steps": progress.step / stage.max_steps if stage.max_steps else 0.0,
             "max_tokens": progress.tokens / stage.max_tokens if stage.max_tokens else 0.0,
             "max_time": progress.elapsed / stage.max_time if stage.max_time else 0.0}
    return max(spent, key=spent.get)


def schedule(progress: Progress, stage: StageConfig) -> tuple[float, float]:
    """(learning rate, weight decay): linear warm-up, then cosine decay to lr_final over the budget;
    weight decay moves linearly from its start to its final value."""
    spent = budget_fraction(progress, stage)
    if progress.step < stage.warmup_steps:
        lr = stage.lr * (progress.step + 1) / stage.warmup_steps
    else:
        lr = stage.lr_final + 0.5 * (stage.lr - stage.lr_final) * (1 + math.cos(math.pi * spent))
    weight_decay = stage.weight_decay + (stage.weight_decay_final - stage.weight_decay) * spent
    return lr, weight_decay


def captures_steps(config: Config, engine: Engine, teacher: nn.Module | None) -> bool:
    """Whether the steps replay from a CUDA graph: train.cuda_graph, an engine whose step can be
    captured (one process on a GPU), and stage 2's teacher on that GPU too (work on the CPU would
    run once, at capture, and never again)."""
    teacher_device = None if teacher is None else teacher.get_input_embeddings().weight.device
    return (config.train.cuda_graph and engine.capturable
            and (teacher_device is None or teacher_device.type == engine.device.type))


class Trainer:
    """Runs one stage's optimisation until its budget is spent.

    loader: an endless iterator of batches; its `state_dict()`, where it has one, is the data cursor
    a checkpoint saves.
    """

    def __init__(self, stage: Stage, config: Config, model: nn.Module, teacher: nn.Module | None,
                 loader: Iterator[dict[str, Tensor]], engine: Engine, folder: Path, log: RunLog):
        self.stage = stage
        self.stage_config = config.stage(stage.number)
        self.train = config.train
        self.checkpointing = config.checkpoint
        self.model = model
        self.teacher = teacher
        self.loader = loader
        self.engine = engine
        self.folder = folder
        self.log = log
        self.captured = (CapturedStep(self.step_on_device, engine.discard_step)
                         if captures_steps(config, engine, teacher) else None)
        if self.train.compile:
            model.compile_layers()
            if teacher is not None:  # stage 2's frozen teacher: its norms and MLPs as the student's
                compile_pointwise_blocks(teacher, family_of(teacher))
            if config.engine.kind == "deepspeed":
                logger.warning("train.compile made DeepSpeed's stage-2 steps slower, not faster, on an H200 "
                               "(BENCHMARKS.md); consider train.compile=false")

    def _micro_batch(self) -> dict[str, Tensor]:
        """The next batch on the device. A padding mask that masks nothing (packed text) stays behind,
        read here on the host: every converted layer would otherwise multiply it into its input."""
        batch = next(self.loader)
        if "attention_mask" in batch and bool(batch["attention_mask"].all()):
            batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        return {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}

    def step(self, progress: Progress) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns the logged record."""
        if progress.step % COLLECT_GARBAGE_EVERY == 0:
            gc.collect(1)
        lr, weight_decay = schedule(progress, self.stage_config)
        self.engine.set_schedule(lr, weight_decay)
        batches = [self._micro_batch() for _ in range(self.train.grad_accum)]
        packed = not any("attention_mask" in batch for batch in batches)  # what a captured step is made of
        on_device = (self.captured if self.captured and packed else self.step_on_device)(batches)
        record = dict(zip(on_device, torch.stack([x.double() for x in on_device.values()]).tolist()))
        record.update(step=progress.step + 1, lr=lr, weight_decay=weight_decay,
                      tokens_in_step=int(record["tokens_in_step"]), applied=bool(record["applied"]))
        return record

    def step_on_device(self, batches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The step's work on the device, the record as 0-dim device tensors: what a CUDA graph captures.

        The loss is the mean over the step's trained tokens, on every process and in every
        micro-batch together: micro-batches (or processes) with more targets weigh more, as they
        would in one big batch. The engines average gradients over micro-batches and processes;
        `weight` turns that average into the mean over the step's tokens.
        """
        tokens = self.engine.all_reduce_sum(sum(self.stage.count_tokens(batch) for batch in batches))
        divisor = tokens.clamp(min=1).float()  # a step without targets trains nothing, divides by 1
        weight = self.train.grad_accum * self.engine.world_size / divisor
        sums: dict[str, Tensor] = {}
        for batch in batches:
            out = self.stage.step(self.model, self.teacher, batch, self.stage_config, self.train)
            self.engine.backward(out.loss * weight)
            for key, value in {"loss": out.loss.detach(), **out.metrics}.items():
                sums[key] = sums.get(key, 0) + value.float()
        grad_norm, applied = self.engine.finish_step()
        keys = sorted(sums)
        totals = self.engine.all_reduce_sum(torch.stack([sums[key] for key in keys])) / divisor
        return dict(zip(keys, totals.unbind())) | {"grad_norm": grad_norm, "applied": applied,
                                                  "tokens_in_step": tokens}

    def run(self, progress: Progress) -> Progress:
        with garbage_collected_between_steps():
            try:
                return self._run(progress)
            finally:
                if self.captured:  # what follows the stage (evaluation, saving) needs the memory
                    self.captured.release()

    def _run(self, progress: Progress) -> Progress:
        self.model.train()
        last_save = progress.step
        if self.engine.device.type == "cuda":
            compiling = "; torch.compile compiles the layers too" if self.train.compile else ""
            self.log.waiting("the first step compiles the GPU kernels for these shapes (seconds where "
                             "rwkvinside ships fla's kernel choices for this GPU, minutes of autotuning elsewhere"
                             f"{compiling})")
        while budget_fraction(progress, self.stage_config) < 1.0:
            started = time.monotonic()
            record = self.step(progress)
            if not record.pop("applied"):
                progress.bad_steps += 1
                logger.warning("step %d: loss or gradient not finite (%d in a row); step skipped",
                               record["step"], progress.bad_steps)
                if progress.bad_steps >= self.train.max_bad_steps:
                    raise UserError(
                        f"the loss was NaN/inf for {progress.bad_steps} steps in a row (stage {self.stage.number}, "
                        f"step {record['step']}); lower the learning rate or check the data; the last "
                        "checkpoint is intact")
            else:
                progress.bad_steps = 0
            progress.step = record["step"]
            progress.tokens += record["tokens_in_step"]
            seconds = time.monotonic() - started
            progress.elapsed += seconds
            record.update(tokens=progress.tokens, tokens_per_s=record["tokens_in_step"] / max(seconds, 1e-9),
                          elapsed_s=progress.elapsed)
            spent = budget_fraction(progress, self.stage_config)
            remaining = progress.elapsed * (1 - spent) / spent if spent > 0 else None
            self.log.write(record, remaining)
            every = self.checkpointing.save_every
            if every and progress.step - last_save >= every:
                self.save(progress)
                last_save = progress.step
        return progress

    def save(self, progress: Progress) -> Path:
        state_dict = getattr(self.loader, "state_dict", None)
        client_state = {"progress": asdict(progress), "data": state_dict() if state_dict else None}
        return save_checkpoint(self.folder, progress.step, self.engine, client_state, self.checkpointing.keep_last)
