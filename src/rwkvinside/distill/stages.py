"""The three stages as data: what each needs, which data it reads, and its loss.

The training loop knows nothing stage-specific; it asks the Stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rwkvinside.config import StageConfig
from rwkvinside.distill.losses import distill_terms, mean_alignment_loss
from rwkvinside.modeling.hybrid import HybridModel


@dataclass
class StepLoss:
    loss: Tensor  # what backward runs on
    metrics: dict[str, Tensor]  # detached scalars for the log
    tokens: Tensor  # trained target tokens in this micro-batch


def alignment_step(model: HybridModel, teacher: nn.Module | None, batch: dict[str, Tensor],
                   stage: StageConfig, loss_chunk: int) -> StepLoss:
    per_layer = model.alignment_losses(batch["input_ids"], batch["attention_mask"])
    loss = mean_alignment_loss(per_layer)
    metrics = {"align": loss.detach()} | {f"align/layer_{i:02d}": v.detach() for i, v in per_layer.items()}
    return StepLoss(loss, metrics, batch["attention_mask"].sum())


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
    tokens = terms.tokens.clamp(min=1)
    loss = (stage.kl_weight * terms.kl + stage.ce_weight * terms.student_ce) / tokens
    metrics = {"kl": terms.kl.detach() / tokens, "student_ce": terms.student_ce.detach() / tokens,
               "teacher_ce": terms.teacher_ce / tokens}
    return StepLoss(loss, metrics, terms.tokens)


def sft_step(model: HybridModel, teacher: nn.Module | None, batch: dict[str, Tensor],
             stage: StageConfig, loss_chunk: int) -> StepLoss:
    student_hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
    terms = distill_terms(student_hidden, batch["labels"], model.lm_head, chunk=loss_chunk)
    tokens = terms.tokens.clamp(min=1)
    loss = terms.student_ce / tokens
    return StepLoss(loss, {"student_ce": loss.detach()}, terms.tokens)


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


STAGES: dict[int, Stage] = {
    1: Stage(1, "attention alignment", "text", aligns=True, needs_teacher=False, step=alignment_step),
    2: Stage(2, "knowledge distillation", "text", aligns=False, needs_teacher=True, step=distillation_step),
    3: Stage(3, "supervised fine-tuning", "chat", aligns=False, needs_teacher=False, step=sft_step),
}
