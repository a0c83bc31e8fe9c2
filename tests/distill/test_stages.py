"""The stages' steps: each returns sums over the tokens it trains (the loop divides by the step's tokens)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwkvinside.config import StageConfig, TrainConfig
from rwkvinside.data import IGNORE_INDEX, target_tokens
from rwkvinside.distill import stages
from rwkvinside.distill.stages import STAGES, alignment_step, distillation_step, real_tokens, sft_step

B, T, C, V = 2, 12, 16, 24


def make_case(seed=0):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(B, T, C, generator=generator, requires_grad=True)
    teacher_hidden = torch.randn(B, T, C, generator=generator)
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[0, 9:] = IGNORE_INDEX  # right padding
    labels[1, 2] = IGNORE_INDEX  # a position without a target inside the sequence (SFT prompt)
    labels[1, 5:7] = IGNORE_INDEX
    student_head = nn.Linear(C, V, bias=False)
    teacher_head = nn.Linear(C, V, bias=False)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(V, C, generator=generator) * 0.5)
        teacher_head.weight.copy_(torch.randn(V, C, generator=generator) * 0.5)
    return student_hidden, teacher_hidden, labels, student_head, teacher_head


def reference_terms(student_hidden, teacher_hidden, labels, student_head, teacher_head, temperature):
    """(kl * tau^2, student CE, teacher CE, agreement, tokens), each summed over target tokens, in float64,
    with full-vocabulary logits for the whole batch. labels[:, t] is the target of position t."""
    mask = labels != IGNORE_INDEX  # [B, T]
    student_logits = F.linear(student_hidden.double(), student_head.weight.double())[mask]  # [N, V]
    teacher_logits = F.linear(teacher_hidden.double(), teacher_head.weight.double())[mask]
    targets = labels[mask]
    student_ce = F.cross_entropy(student_logits, targets, reduction="sum")
    teacher_ce = F.cross_entropy(teacher_logits, targets, reduction="sum")
    p = F.softmax(teacher_logits / temperature, dim=-1)
    kl = (p * (p.log() - F.log_softmax(student_logits / temperature, dim=-1))).sum() * temperature**2
    agreement = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum().double()
    return kl, student_ce, teacher_ce, agreement, int(mask.sum())


class StubModel(nn.Module):
    """What the stage steps use of a student / HF teacher: hidden states, the base model and the LM head."""

    def __init__(self, hidden: torch.Tensor, head: nn.Linear):
        super().__init__()
        self.hidden, self.head = hidden, head
        self.masks = []  # the attention masks it was given

    def hidden_states(self, input_ids, attention_mask):
        self.masks.append(attention_mask)
        return self.hidden

    @property
    def lm_head(self):
        return self.head

    def base_model(self, input_ids, attention_mask, use_cache):
        self.masks.append(attention_mask)
        return type("Output", (), {"last_hidden_state": self.hidden})()

    def get_input_embeddings(self):
        return self.head

    def get_output_embeddings(self):
        return self.head


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "packed"])
def test_stage_steps_sum_their_terms_over_the_target_tokens(with_mask):
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case(seed=5)
    batch = {"input_ids": torch.zeros(B, T, dtype=torch.long), "labels": labels}
    if with_mask:
        batch["attention_mask"] = torch.ones(B, T, dtype=torch.long)
    stage = StageConfig(max_steps=1, kl_weight=0.25, ce_weight=2.0, temperature=1.5)
    student, teacher = StubModel(student_hidden, student_head), StubModel(teacher_hidden, teacher_head)
    out = distillation_step(student, teacher, batch, stage, TrainConfig(loss_chunk=5))
    kl, student_ce, teacher_ce, agreement, tokens = reference_terms(student_hidden, teacher_hidden, labels,
                                                                    student_head, teacher_head, 1.5)
    assert int(target_tokens(batch)) == tokens == B * T - 6
    assert all((mask is None) != with_mask for mask in student.masks + teacher.masks)
    torch.testing.assert_close(out.loss.double(), 0.25 * kl + 2.0 * student_ce, rtol=1e-5, atol=1e-5)
    for name, value in (("kl", kl), ("student_ce", student_ce), ("teacher_ce", teacher_ce),
                        ("agreement", agreement)):
        torch.testing.assert_close(out.metrics[name].double(), value, rtol=1e-5, atol=1e-5, msg=name)
        assert not out.metrics[name].requires_grad, name
    assert out.loss.requires_grad

    stage3 = StageConfig(max_steps=1, kl_weight=0.0, ce_weight=1.0)
    sft = sft_step(StubModel(student_hidden, student_head), None, batch, stage3, TrainConfig(loss_chunk=5))
    torch.testing.assert_close(sft.loss.double(), student_ce, rtol=1e-5, atol=1e-5)
    assert set(sft.metrics) == {"student_ce"}
    # stage 3 trains on the CE whatever the stage's kl/ce weights say
    other = sft_step(StubModel(student_hidden, student_head), None, batch, stage, TrainConfig(loss_chunk=5))
    torch.testing.assert_close(other.loss, sft.loss)


def test_real_tokens_counts_the_mask_or_every_position():
    """Stage 1 aligns every real position: the mask's ones, or, where the loop dropped an all-ones mask
    (packed text), every position of input_ids."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ids = torch.zeros(2, 4, dtype=torch.long)
    assert int(real_tokens({"input_ids": ids, "attention_mask": mask})) == 5
    packed = real_tokens({"input_ids": ids})
    assert isinstance(packed, torch.Tensor) and int(packed) == 8
    assert STAGES[1].count_tokens is real_tokens
    assert STAGES[2].count_tokens is target_tokens and STAGES[3].count_tokens is target_tokens


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "packed"])
def test_the_alignment_step_is_the_mean_over_layers_times_the_tokens(monkeypatch, with_mask):
    per_layer = {0: torch.tensor(1.0, requires_grad=True), 2: torch.tensor(2.0), 3: torch.tensor(6.0)}
    given = []

    def fake_alignment_losses(model, input_ids, attention_mask=None, **options):
        given.append(attention_mask)
        return per_layer

    monkeypatch.setattr(stages, "alignment_losses", fake_alignment_losses)
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long)}
    if with_mask:
        batch["attention_mask"] = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    tokens = 5 if with_mask else 8
    out = alignment_step(None, None, batch, StageConfig(max_steps=1), TrainConfig(loss_chunk=4))
    assert (given[0] is None) != with_mask
    assert float(out.loss.detach()) == pytest.approx(3.0 * tokens) and out.loss.requires_grad
    assert float(out.metrics["align"]) == pytest.approx(3.0 * tokens)
    assert {k: float(v) for k, v in out.metrics.items() if k.startswith("align/")} == {
        "align/layer_00": 1.0 * tokens, "align/layer_02": 2.0 * tokens, "align/layer_03": 6.0 * tokens}
