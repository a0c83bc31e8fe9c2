"""The chunked stage 2/3 losses equal a plain float64 computation over the whole sequence."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwkvinside.config import StageConfig
from rwkvinside.distill.losses import IGNORE_INDEX, distill_terms, mean_alignment_loss
from rwkvinside.distill.stages import distillation_step, sft_step, target_tokens

B, T, C, V = 2, 12, 16, 24


def reference_terms(student_hidden, teacher_hidden, labels, student_head, teacher_head, temperature):
    """(kl * tau^2, student CE, teacher CE, tokens), each summed over target tokens, in float64,
    with full-vocabulary logits for the whole batch. labels[:, t] is the target of position t."""
    mask = labels != IGNORE_INDEX  # [B, T]
    student_logits = F.linear(student_hidden.double(), student_head.weight.double())  # [B, T, V]
    teacher_logits = F.linear(teacher_hidden.double(), teacher_head.weight.double())
    targets = labels[mask]
    student_ce = F.cross_entropy(student_logits[mask], targets, reduction="sum")
    teacher_ce = F.cross_entropy(teacher_logits[mask], targets, reduction="sum")
    p = F.softmax(teacher_logits[mask] / temperature, dim=-1)  # [N, V]
    kl = (p * (p.log() - F.log_softmax(student_logits[mask] / temperature, dim=-1))).sum() * temperature**2
    return kl, student_ce, teacher_ce, int(mask.sum())


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


@pytest.mark.parametrize("chunk", [T, 4, 5, 1, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_terms_equal_the_float64_reference(chunk, temperature):
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case()
    terms = distill_terms(student_hidden, labels, student_head, teacher_hidden, teacher_head,
                          temperature=temperature, chunk=chunk)
    kl, student_ce, teacher_ce, tokens = reference_terms(student_hidden, teacher_hidden, labels, student_head,
                                                         teacher_head, temperature)
    assert int(terms.tokens) == tokens == B * T - 6
    torch.testing.assert_close(terms.kl.double(), kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.student_ce.double(), student_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.teacher_ce.double(), teacher_ce, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [T, 5], ids=lambda c: f"chunk{c}")
def test_chunked_gradients_equal_the_float64_reference(chunk):
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case(seed=1)
    terms = distill_terms(student_hidden, labels, student_head, teacher_hidden, teacher_head,
                          temperature=2.0, chunk=chunk)
    (0.7 * terms.kl + 0.3 * terms.student_ce).backward()
    got = (student_hidden.grad.clone(), student_head.weight.grad.clone())

    hidden64 = student_hidden.detach().double().requires_grad_()
    head64 = nn.Linear(C, V, bias=False).double()
    head64.weight.data.copy_(student_head.weight.detach().double())
    kl, student_ce, _, _ = reference_terms(hidden64, teacher_hidden, labels, head64, teacher_head, 2.0)
    (0.7 * kl + 0.3 * student_ce).backward()
    torch.testing.assert_close(got[0].double(), hidden64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].double(), head64.weight.grad, rtol=1e-5, atol=1e-6)
    assert student_hidden.grad[0, 9:].abs().max() == 0  # padding gets no gradient


def test_temperature_scales_the_kl_by_tau_squared():
    """Logits multiplied by tau and then softened by tau are the original distributions, so the
    reported KL is tau^2 times the unsoftened one."""
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case(seed=2)
    base = distill_terms(student_hidden, labels, student_head, teacher_hidden, teacher_head, temperature=1.0)
    tau = 3.0
    scaled_student, scaled_teacher = nn.Linear(C, V, bias=False), nn.Linear(C, V, bias=False)
    with torch.no_grad():
        scaled_student.weight.copy_(student_head.weight * tau)
        scaled_teacher.weight.copy_(teacher_head.weight * tau)
    scaled = distill_terms(student_hidden, labels, scaled_student, teacher_hidden, scaled_teacher, temperature=tau)
    torch.testing.assert_close(scaled.kl, base.kl * tau**2, rtol=1e-5, atol=1e-6)


def test_labels_are_not_shifted_again():
    """A student that puts all its mass on labels[:, t] at position t has CE ~0; one that predicts the
    label one step ahead (what a second shift would reward) has a large CE."""
    labels = torch.tensor([[3, 7, 1, 5, 2, IGNORE_INDEX], [6, 0, 4, 4, 7, 2]])
    head = nn.Linear(V, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(V))
    aligned = 30.0 * F.one_hot(labels.clamp(min=0), V).float()  # position t predicts labels[:, t]
    ahead = torch.roll(aligned, shifts=-1, dims=1)  # position t predicts labels[:, t+1]
    with torch.no_grad():
        good = distill_terms(aligned, labels, head, chunk=4)
        bad = distill_terms(ahead, labels, head, chunk=4)
    assert float(good.student_ce / good.tokens) < 1e-6
    assert float(bad.student_ce / bad.tokens) > 10


def test_kl_is_taken_only_where_there_is_a_target():
    """Student and teacher agree except at the one position without a target (and at padding):
    the KL is exactly zero, which a shifted or missing mask would not give."""
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 3, IGNORE_INDEX]])
    head = nn.Linear(C, V, bias=False)
    torch.manual_seed(0)
    teacher_hidden = torch.randn(1, 5, C)
    student_hidden = teacher_hidden.clone()
    student_hidden[0, 2] += 5.0
    student_hidden[0, 4] += 5.0
    with torch.no_grad():
        assert float(distill_terms(student_hidden, labels, head, teacher_hidden, head, chunk=2).kl) == 0.0
        student_hidden[0, 3] += 5.0
        assert float(distill_terms(student_hidden, labels, head, teacher_hidden, head, chunk=2).kl) > 0.1


def test_the_teacher_term_carries_no_gradient():
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case(seed=3)
    teacher_hidden.requires_grad_(True)
    terms = distill_terms(student_hidden, labels, student_head, teacher_hidden, teacher_head, chunk=5)
    assert not terms.teacher_ce.requires_grad
    (terms.kl + terms.student_ce).backward()
    assert teacher_hidden.grad is None
    assert teacher_head.weight.grad is None
    assert student_head.weight.grad is not None


def test_without_a_teacher_only_the_student_ce():
    student_hidden, _, labels, student_head, _ = make_case(seed=4)
    terms = distill_terms(student_hidden, labels, student_head, chunk=5)
    assert float(terms.kl.detach()) == 0.0 and float(terms.teacher_ce) == 0.0
    mask = labels != IGNORE_INDEX
    expected = F.cross_entropy(student_head(student_hidden)[mask], labels[mask], reduction="sum")
    torch.testing.assert_close(terms.student_ce, expected)


def test_mean_alignment_loss():
    per_layer = {0: torch.tensor(1.0), 2: torch.tensor(2.0), 3: torch.tensor(6.0)}
    assert float(mean_alignment_loss(per_layer)) == 3.0


class StubModel(nn.Module):
    """What the stage steps use of a HybridModel / HF teacher: hidden states and the LM head."""

    def __init__(self, hidden: torch.Tensor, head: nn.Linear):
        super().__init__()
        self.hidden, self.head = hidden, head

    def hidden_states(self, input_ids, attention_mask):
        return self.hidden

    @property
    def lm_head(self):
        return self.head

    def base_model(self, input_ids, attention_mask, use_cache):
        return type("Output", (), {"last_hidden_state": self.hidden})()

    def get_input_embeddings(self):
        return self.head

    def get_output_embeddings(self):
        return self.head


def test_stage_steps_sum_their_terms_over_the_target_tokens():
    """The loop divides by the optimizer step's target tokens; a stage step returns sums."""
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case(seed=5)
    batch = {"input_ids": torch.zeros(B, T, dtype=torch.long), "labels": labels,
             "attention_mask": torch.ones(B, T, dtype=torch.long)}
    stage = StageConfig(max_steps=1, kl_weight=0.25, ce_weight=2.0, temperature=1.5)
    out = distillation_step(StubModel(student_hidden, student_head), StubModel(teacher_hidden, teacher_head),
                            batch, stage, loss_chunk=5)
    kl, student_ce, teacher_ce, tokens = reference_terms(student_hidden, teacher_hidden, labels, student_head,
                                                         teacher_head, 1.5)
    assert int(target_tokens(batch)) == tokens
    torch.testing.assert_close(out.loss.double(), 0.25 * kl + 2.0 * student_ce, rtol=1e-5, atol=1e-5)
    for name, value in (("kl", kl), ("student_ce", student_ce), ("teacher_ce", teacher_ce)):
        torch.testing.assert_close(out.metrics[name].double(), value, rtol=1e-5, atol=1e-5)
    sft = sft_step(StubModel(student_hidden, student_head), None, batch, stage, loss_chunk=5)
    torch.testing.assert_close(sft.loss.double(), student_ce, rtol=1e-5, atol=1e-5)
