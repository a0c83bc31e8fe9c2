"""The three stages as data: what each needs, which data it reads, and its loss.

The training loop knows nothing stage-specific; it asks the Stage. The `record_function` ranges
name the parts of a step in a torch.profiler trace (benchmarks/bench_stages.py); without a
profiler they cost nothing measurable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from rwkvinside.config import StageConfig, TrainConfig
from rwkvinside.data import target_tokens
from rwkvinside.modeling.alignment import alignment_losses
from rwkvinside.modeling.student import RWKVInsideForCausalLM
from rwkvinside.scoring import final_hidden_states, score


@dataclass
class StepLoss:
    """One micro-batch's loss and log terms, each summed over its trained tokens: the loop divides
    by the trained tokens of the whole optimizer step (every micro-batch, every process), so that
    the step minimises the mean over its tokens however they are split."""

    loss: Tensor  # what backward runs on, once divided
    metrics: dict[str, Tensor]  # detached, for the log


def real_tokens(batch: dict[str, Tensor]) -> Tensor:
    """Stage 1 aligns every real (non-padding) position."""
    mask = batch.get("attention_mask")
    ids = batch["input_ids"]
    return ids.new_full((), ids.numel()) if mask is None else mask.sum()  # a fill, no copy from the host


def alignment_step(model: RWKVInsideForCausalLM, teacher: nn.Module | None, batch: dict[str, Tensor],
                   stage: StageConfig, train: TrainConfig) -> StepLoss:
    """The mean of the per-layer alignment losses (each a mean over real tokens), times the tokens."""
    per_layer = alignment_losses(model, batch["input_ids"], batch.get("attention_mask"),
                                 relative=stage.alignment_loss == "relative")
    tokens = real_tokens(batch)
    loss = torch.stack(list(per_layer.values())).mean() * tokens
    metrics = {"align": loss.detach()} | {f"align/layer_{i:02d}": v.detach() * tokens for i, v in per_layer.items()}
    return StepLoss(loss, metrics)


def distillation_step(model: RWKVInsideForCausalLM, teacher: nn.Module, batch: dict[str, Tensor],
                      stage: StageConfig, train: TrainConfig) -> StepLoss:
    teacher_device = teacher.get_input_embeddings().weight.device
    with torch.no_grad(), record_function("teacher forward"):
        mask = batch.get("attention_mask")
        teacher_hidden = final_hidden_states(teacher, batch["input_ids"].to(teacher_device),
                                             None if mask is None else mask.to(teacher_device))
    student_hidden = model.hidden_states(batch["input_ids"], batch.get("attention_mask"))
    with record_function("loss"):
        scores = score(student_hidden, model.lm_head, batch["labels"], teacher_hidden.to(student_hidden.device),
                       _OnDevice(teacher), temperature=stage.temperature, kl_weight=stage.kl_weight,
                       ce_weight=stage.ce_weight, chunk=train.loss_chunk, compiled=train.compile)
    metrics = {"kl": scores.kl, "student_ce": scores.student_ce, "teacher_ce": scores.teacher_ce,
               "agreement": scores.agreement}
    return StepLoss(scores.loss, metrics)


def sft_step(model: RWKVInsideForCausalLM, teacher: nn.Module | None, batch: dict[str, Tensor],
             stage: StageConfig, train: TrainConfig) -> StepLoss:
    student_hidden = model.hidden_states(batch["input_ids"], batch.get("attention_mask"))
    with record_function("loss"):
        scores = score(student_hidden, model.lm_head, batch["labels"], ce_weight=1.0, chunk=train.loss_chunk,
                       compiled=train.compile)
    return StepLoss(scores.loss, {"student_ce": scores.student_ce})


class _OnDevice(nn.Module):
    """The teacher's LM head applied where the teacher lives (it may be offloaded to the CPU)."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.__dict__["teacher"] = teacher

    def forward(self, hidden: Tensor) -> Tensor:
        head = self.teacher.get_output_embeddings()
        return head(hidden.to(head.weight.device)).to(hidden.device)


@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    data: str  # "text" (packed corpora) or "chat" (SFT conversations)
    aligns: bool  # the teacher attentions stay beside the students
    needs_teacher: bool  # a separate frozen copy of the whole teacher gives logits
    step: Callable[..., StepLoss]
    count_tokens: Callable[[dict[str, Tensor]], Tensor]  # the tokens a batch trains


STAGES: dict[int, Stage] = {
    1: Stage(1, "attention alignment", "text", aligns=True, needs_teacher=False, step=alignment_step,
             count_tokens=real_tokens),
    2: Stage(2, "knowledge distillation", "text", aligns=False, needs_teacher=True, step=distillation_step,
             count_tokens=target_tokens),
    3: Stage(3, "supervised fine-tuning", "chat", aligns=False, needs_teacher=False, step=sft_step,
             count_tokens=target_tokens),
}
