"""Scoring a model's next-token distributions: the stage 2/3 losses and evaluation's figures, in one place.

`score` takes the final hidden states (the LM head is applied here, a chunk of the sequence at a
time, so full-vocabulary logits never exist for a whole batch) and returns sums over the target
tokens: the student's cross-entropy, KL(teacher || student) at a temperature, the teacher's own
cross-entropy, how often the two argmaxes agree, and `loss`, the weighted sum training minimises.

Labels arrive already shifted by the data pipeline (labels[:, t] is the target of position t,
IGNORE_INDEX where there is none), so nothing here shifts them again.

Two paths compute the same function:

- `plain`: autograd through the head, each chunk under activation checkpointing (its logits are
  recomputed in the backward pass instead of being kept). The reference, and what evaluation uses.
- `fused`: the loss is a sum over positions, so its gradient with respect to each chunk's logits,
  kl_weight * T * (softmax(s/T) - softmax(t/T)) + ce_weight * (softmax(s) - onehot(y)) on each target
  position (s, t: the student's and the teacher's logits, y the label, T the temperature), needs only
  that chunk. It is written out (`_chunk_with_gradient`) and taken in the forward pass, chunk by
  chunk, and multiplied straight into the gradients of the hidden states and of the head's weight:
  nothing is recomputed, no logits are kept, and the teacher's head runs once. Used where a gradient
  is needed and the head is a plain linear map with its whole weight in hand. With `compiled`,
  torch.compile fuses a chunk's softmaxes, reductions and gradient into a few passes over its logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rwkvinside.data.batch import IGNORE_INDEX

Head = Callable[[Tensor], Tensor]  # hidden states [..., C] -> logits [..., V]
METRICS = ("student_ce", "kl", "teacher_ce", "agreement")


@dataclass
class Scores:
    """Sums over one batch's target tokens (divide by `tokens` for means). Only `loss` carries a
    gradient; the teacher's figures are None without a teacher."""

    loss: Tensor  # kl_weight * kl + ce_weight * student_ce
    student_ce: Tensor
    kl: Tensor | None
    teacher_ce: Tensor | None
    agreement: Tensor | None  # positions where the argmaxes agree
    tokens: Tensor


def target_mask(labels: Tensor) -> Tensor:
    return labels != IGNORE_INDEX


def _float(logits: Tensor) -> Tensor:
    """Logits in float32 at least (float64 stays, for the reference checks)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def score(student_hidden: Tensor, student_head: nn.Module, labels: Tensor, teacher_hidden: Tensor | None = None,
          teacher_head: Head | None = None, *, temperature: float = 1.0, kl_weight: float = 1.0,
          ce_weight: float = 0.0, chunk: int = 256, fused: bool | None = None, compiled: bool = False) -> Scores:
    """Scores of one batch. student_hidden, teacher_hidden: [B, T, C]; labels: [B, T], shifted.

    Without a teacher the KL term is absent (kl_weight is ignored). fused: None picks the fused path
    where it applies (see the module docstring), False forces the plain one; compiled: the fused
    path's per-chunk work runs compiled.
    """
    if fused is None:
        fused = torch.is_grad_enabled() and student_hidden.requires_grad and fusable(student_head)
    weights = (kl_weight if teacher_hidden is not None else 0.0, ce_weight)
    totals: dict[str, Tensor] = {}
    if fused:
        chunk_with_gradient = _compiled_chunk_with_gradient if compiled else _chunk_with_gradient
        totals["loss"] = _FusedHeadLoss.apply(student_hidden, student_head.weight, labels, teacher_hidden,
                                              teacher_head, temperature, weights, chunk, totals, chunk_with_gradient)
    else:
        for start in range(0, labels.shape[1], chunk):
            piece = slice(start, start + chunk)
            teacher_piece = None if teacher_hidden is None else teacher_hidden[:, piece]
            terms = _plain_chunk(student_hidden[:, piece], student_head, labels[:, piece], teacher_piece,
                                 teacher_head, temperature, weights)
            _accumulate(totals, terms)
    zero = student_hidden.new_zeros((), dtype=torch.float32)
    has_teacher = teacher_hidden is not None
    return Scores(loss=totals.get("loss", zero), student_ce=totals.get("student_ce", zero),
                  kl=totals.get("kl", zero) if has_teacher else None,
                  teacher_ce=totals.get("teacher_ce", zero) if has_teacher else None,
                  agreement=totals.get("agreement", zero) if has_teacher else None,
                  tokens=target_mask(labels).sum())


def _accumulate(totals: dict[str, Tensor], terms: dict[str, Tensor]) -> None:
    for key, value in terms.items():
        totals[key] = totals[key] + value if key in totals else value


def fusable(head: nn.Module) -> bool:
    """A bias-free linear head whose weight is whole here (DeepSpeed ZeRO-3 partitions it and gathers
    it only inside the module's own forward: such a head takes the plain path)."""
    return (isinstance(head, nn.Linear) and head.bias is None and not hasattr(head.weight, "ds_id"))


# ---- one chunk of positions -------------------------------------------------------------------------


def _teacher_terms(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor, mask: Tensor,
                   temperature: float) -> tuple[dict[str, Tensor], Tensor]:
    """The teacher's figures for one chunk, and its distribution at the temperature (logits float32 [n, V])."""
    teacher_logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    teacher_ce = F.cross_entropy(teacher_logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    agreement = ((teacher_logits.argmax(-1) == student_logits.argmax(-1)) & mask).sum().float()
    return {"teacher_ce": teacher_ce, "agreement": agreement}, teacher_logp


def _terms(student_logits: Tensor, labels: Tensor, teacher_logits: Tensor | None, temperature: float,
           weights: tuple[float, float]) -> tuple[dict[str, Tensor], Tensor]:
    """Every term of one chunk from its logits (float32 [n, V], labels [n]); returns the terms and the
    weighted loss, differentiable in student_logits."""
    mask = target_mask(labels)
    kl_weight, ce_weight = weights
    student_ce = F.cross_entropy(student_logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    terms = {"student_ce": student_ce.detach()}
    loss = ce_weight * student_ce  # even at weight 0: the loss keeps its graph
    if teacher_logits is not None:
        with torch.no_grad():
            teacher, teacher_logp = _teacher_terms(teacher_logits, student_logits, labels, mask, temperature)
        terms |= teacher
        student_logp = F.log_softmax(student_logits / temperature, dim=-1)
        kl_rows = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # [n]
        kl = (kl_rows * mask).sum() * temperature**2
        terms["kl"] = kl.detach()
        if kl_weight:
            loss = loss + kl_weight * kl
    return terms, loss


def _plain_chunk(student_hidden: Tensor, student_head: nn.Module, labels: Tensor, teacher_hidden: Tensor | None,
                 teacher_head: Head | None, temperature: float, weights: tuple[float, float]) -> dict[str, Tensor]:
    def run(student_hidden: Tensor, teacher_hidden: Tensor | None) -> tuple[Tensor, ...]:
        student_logits = _float(student_head(student_hidden)).flatten(0, 1)
        teacher_logits = None
        if teacher_hidden is not None:
            with torch.no_grad():
                teacher_logits = _float(teacher_head(teacher_hidden)).flatten(0, 1)
        terms, loss = _terms(student_logits, labels.flatten(), teacher_logits, temperature, weights)
        return (loss, *(terms.get(name, loss.new_zeros(())) for name in METRICS))

    if torch.is_grad_enabled() and student_hidden.requires_grad:
        # Under DeepSpeed ZeRO-3 the head weight seen by the recomputation is an empty placeholder
        # (shape [0]) once the head's forward has released it; the head's backward gathers it whole
        # again before the weight is used. torch's metadata check would reject the placeholder.
        values = checkpoint(run, student_hidden, teacher_hidden, use_reentrant=False, determinism_check="none")
    else:
        values = run(student_hidden, teacher_hidden)
    return dict(zip(("loss", *METRICS), values))


def _chunk_with_gradient(student_logits: Tensor, labels: Tensor, teacher_logits: Tensor | None,
                         temperature: float, weights: tuple[float, float]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """One chunk's terms (as `_terms`), its weighted loss and d loss / d student_logits, written out
    (the module docstring). Logits [n, V] in any float dtype, computed in float32 at least; labels [n]."""
    kl_weight, ce_weight = weights
    mask = target_mask(labels)
    index = labels.clamp(min=0)[:, None]  # [n, 1]; ignored positions are masked out below
    s = _float(student_logits)
    log_p = F.log_softmax(s, dim=-1)
    terms = {"student_ce": -(log_p.gather(-1, index)[:, 0] * mask).sum()}
    loss = ce_weight * terms["student_ce"]
    gradient = s.new_zeros(())  # broadcasts to [n, V] once a term adds to it
    if ce_weight:  # softmax(s) - onehot(y)
        gradient = ce_weight * log_p.exp().scatter_add(-1, index, s.new_full(index.shape, -1.0))
    if teacher_logits is not None:
        t = _float(teacher_logits)
        teacher_log_p = F.log_softmax(t, dim=-1)
        teacher_picked = teacher_log_p.gather(-1, index)[:, 0]
        terms["teacher_ce"] = -(teacher_picked * mask).sum()
        terms["agreement"] = ((t.argmax(-1) == s.argmax(-1)) & mask).sum().to(s.dtype)
        student_log_q = F.log_softmax(s / temperature, dim=-1)
        teacher_log_q = F.log_softmax(t / temperature, dim=-1)
        teacher_q = teacher_log_q.exp()
        terms["kl"] = ((teacher_q * (teacher_log_q - student_log_q)).sum(-1) * mask).sum() * temperature**2
        loss = loss + kl_weight * terms["kl"]
        if kl_weight:
            gradient = gradient + kl_weight * temperature * (student_log_q.exp() - teacher_q)
    return terms, loss, gradient * mask[:, None].to(s.dtype)


# Compiled once per chunk shape, temperature and weights; only where asked (`score(compiled=True)`).
_compiled_chunk_with_gradient = torch.compile(_chunk_with_gradient, dynamic=False)


class _FusedHeadLoss(torch.autograd.Function):
    """The weighted loss of `score` with its gradients computed in the forward pass, a chunk at a time:
    for each chunk, d loss / d logits (`_chunk_with_gradient`) goes straight into the gradient of the
    hidden states ([B, T, C]) and of the head's weight (float32 [V, C], summed over the chunks). The
    backward pass only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, teacher_hidden: Tensor | None,
                teacher_head: Head | None, temperature: float, weights: tuple[float, float], chunk: int,
                metrics: dict[str, Tensor], chunk_with_gradient: Callable) -> Tensor:
        grad_hidden = torch.zeros_like(hidden)
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = (torch.zeros(weight.shape, dtype=accumulate, device=weight.device)
                       if ctx.needs_input_grad[1] else None)
        loss = hidden.new_zeros((), dtype=accumulate)
        for start in range(0, labels.shape[1], chunk):
            piece = slice(start, start + chunk)
            flat = hidden[:, piece].flatten(0, 1)  # [n, C]
            teacher_logits = None if teacher_hidden is None else teacher_head(teacher_hidden[:, piece]).flatten(0, 1)
            terms, chunk_loss, grad_logits = chunk_with_gradient(flat @ weight.mT, labels[:, piece].flatten(),
                                                                 teacher_logits, temperature, weights)
            _accumulate(metrics, terms)
            loss += chunk_loss
            if not any(weights):
                continue  # every weight is zero: nothing to learn from
            grad_logits = grad_logits.to(weight.dtype)
            grad_hidden[:, piece] = (grad_logits @ weight).view_as(hidden[:, piece])
            if grad_weight is not None:
                grad_weight += grad_logits.mT @ flat  # in the weight's dtype, summed in float32
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss  # autograd casts it to the weight's dtype
        return (grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight, None, None, None, None, None, None, None,
                None)


def final_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The last hidden states [B, T, C] of a causal LM, before its head. A student (ours or its export)
    gives them through its own `hidden_states`, which reads its lead (convert.lead) as its forward does:
    its body alone would score it on input it was never trained on. A Hugging Face model: its body."""
    own = getattr(model, "hidden_states", None)
    if callable(own):
        return own(input_ids, attention_mask)
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
