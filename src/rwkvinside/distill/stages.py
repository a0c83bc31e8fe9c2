"""The three stages as data: what each needs, which data it reads, and its loss.

The training loop knows nothing stage-specific; it asks the Stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rwkvinside.config import StageConfig
from rwkvinside.distill.losses import IGNORE_INDEX, distill_terms, mean_alignment_loss
from rwkvinside.modeling.hybrid import HybridModel


@dataclass
class StepLoss:
    """One micro-batch's loss and log terms, each summed over its trained tokens: the loop divides
    by the trained tokens of the whole optimizer step (every micro-batch, every process), so that
    the step minimises the mean over its tokens however they are split."""

    loss: Tensor  # what backward runs on, once divided
    metrics: dict[str, Tensor]  # detached, for the log


def real_tokens(batch: dict[str, Tensor]) -> Tensor:
    """Stage 1 aligns every real (non-padding) position."""
    return batch["attention_mask"].sum()


def target_tokens(batch: dict[str, Tensor]) -> Tensor:
    """Stages 2 and 3 train every position with a target."""
    return (batch["labels"] != IGNORE_INDEX).sum()


def alignment_step(model: HybridModel, teacher: nn.Module | None, batch: dict[str, Tensor],
                   stage: StageConfig, loss_chunk: int) -> StepLoss:
    per_layer = model.alignment_losses(batch["input_ids"], batch["attention_mask"])  # means over real tokens
    tokens = real_tokens(batch)
    loss = mean_alignment_loss(per_layer) * tokens
    metrics = {"align": loss.detach()} | {f"align/layer_{i:02d}": v.detach() * tokens for i, v in per_layer.items()}
    return StepLoss(loss, metrics)


def distillation_step(model: HybridModel, teacher: nn.Module, batch: dict[str, Tensor],
                      stage: StageConfig, loss_chunk: int) -> StepLoss:
    student_hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
    teacher_device = teacher.get_input_embeddings().weight.device
    with torch.no_grad():
        teacher_hidden = teacher.base_model(
            input_ids=batch["input_ids"].to(teacher_device),
            attention_mask=batch["attention_mask"].to(teacher_device),
            use_cache=False,
        ).last_hidden_state
    terms = distill_terms(
        student_hidden, batch["labels"], model.lm_head,
        teacher_hidden=teacher_hidden.to(student_hidden.device), teacher_head=_OnDevice(teacher),
        temperature=stage.temperature, chunk=loss_chunk,
    )
    loss = stage.kl_weight * terms.kl + stage.ce_weight * terms.student_ce
    metrics = {"kl": terms.kl.detach(), "student_ce": terms.student_ce.detach(), "teacher_ce": terms.teacher_ce}
    return StepLoss(loss, metrics)


def sft_step(model: HybridModel, teacher: nn.Module | None, batch: dict[str, Tensor],
             stage: StageConfig, loss_chunk: int) -> StepLoss:
    student_hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
    terms = distill_terms(student_hidden, batch["labels"], model.lm_head, chunk=loss_chunk)
    return StepLoss(terms.student_ce, {"student_ce": terms.student_ce.detach()})


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
