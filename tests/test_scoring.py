"""`rwkvinside.scoring.score`: both paths (plain and fused) equal a float64 reference written out token by
token, in value, in every metric and in the gradients of the hidden states and of the head's weight."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwkvinside import scoring
from rwkvinside.data import IGNORE_INDEX
from rwkvinside.scoring import final_hidden_states, fusable, score

B, L, C, V = 2, 11, 8, 37  # V is no other dimension, so a saved [*, V] tensor is recognised by its shape
CHUNK = 4  # L is not a multiple of it
PATHS = {"plain": False, "fused": True}
F64 = dict(rtol=1e-10, atol=1e-12)


# ---- the reference: one token at a time, in float64, no chunks -------------------------------------

def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log softmax of one position's logits [V], written out."""
    shifted = logits - logits.max()
    return shifted - shifted.exp().sum().log()


def reference(student_hidden, student_weight, labels, teacher_hidden=None, teacher_weight=None, *,
              temperature=1.0, kl_weight=1.0, ce_weight=0.0, student_bias=None) -> dict[str, torch.Tensor]:
    """Sums over the target tokens: the student's CE, KL(teacher || student) at `temperature` times T^2,
    the teacher's CE, the positions where the argmaxes agree, the tokens, and the weighted loss
    (kl_weight * kl + ce_weight * student_ce; without a teacher ce_weight * student_ce)."""
    zero = student_hidden.new_zeros(())
    sums = {"student_ce": zero, "kl": zero, "teacher_ce": zero, "agreement": zero, "tokens": zero}
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            target = int(labels[b, t])
            if target == IGNORE_INDEX:
                continue
            student = student_hidden[b, t] @ student_weight.T  # [V]
            if student_bias is not None:
                student = student + student_bias
            sums["student_ce"] = sums["student_ce"] - log_softmax(student)[target]
            sums["tokens"] = sums["tokens"] + 1
            if teacher_hidden is None:
                continue
            with torch.no_grad():
                teacher = teacher_hidden[b, t] @ teacher_weight.T
                sums["teacher_ce"] = sums["teacher_ce"] - log_softmax(teacher)[target]
                sums["agreement"] = sums["agreement"] + float(int(teacher.argmax()) == int(student.argmax()))
                teacher_logp = log_softmax(teacher / temperature)
            student_logp = log_softmax(student / temperature)
            kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum()
            sums["kl"] = sums["kl"] + kl * temperature**2
    sums["loss"] = ce_weight * sums["student_ce"]
    if teacher_hidden is not None:
        sums["loss"] = sums["loss"] + kl_weight * sums["kl"]
    return sums


def make_case(seed=0, dtype=torch.float64, length=L):
    """Student and teacher hidden states and heads, and labels with right padding (row 0) and
    positions without a target inside a sequence (row 1, as SFT prompts have)."""
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(B, length, C, generator=generator, dtype=torch.float64).to(dtype)
    teacher_hidden = torch.randn(B, length, C, generator=generator, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (B, length), generator=generator)
    labels[0, length - 3:] = IGNORE_INDEX  # right padding
    labels[1, 2] = IGNORE_INDEX
    labels[1, 5:7] = IGNORE_INDEX
    student_head = nn.Linear(C, V, bias=False, dtype=dtype)
    teacher_head = nn.Linear(C, V, bias=False, dtype=dtype)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(V, C, generator=generator, dtype=torch.float64))
        teacher_head.weight.copy_(torch.randn(V, C, generator=generator, dtype=torch.float64))
    return student_hidden.requires_grad_(True), teacher_hidden, labels, student_head, teacher_head


def reference_with_grads(student_hidden, student_head, labels, teacher_hidden, teacher_head, **weights):
    """The reference in float64 and its gradients with respect to the student's hidden states and weight."""
    hidden = student_hidden.detach().double().requires_grad_(True)
    weight = student_head.weight.detach().double().requires_grad_(True)
    teacher = None if teacher_hidden is None else teacher_hidden.detach().double()
    teacher_weight = None if teacher_head is None else teacher_head.weight.detach().double()
    sums = reference(hidden, weight, labels, teacher, teacher_weight, **weights)
    grad_hidden, grad_weight = torch.autograd.grad(sums["loss"], (hidden, weight))
    return sums, grad_hidden, grad_weight


def check_scores(scores, expected, with_teacher, **tolerance):
    torch.testing.assert_close(scores.loss.double(), expected["loss"], **tolerance)
    torch.testing.assert_close(scores.student_ce.double(), expected["student_ce"], **tolerance)
    assert int(scores.tokens) == int(expected["tokens"])
    if with_teacher:
        for name in ("kl", "teacher_ce", "agreement"):
            torch.testing.assert_close(getattr(scores, name).double(), expected[name], **tolerance, msg=name)
    else:
        assert scores.kl is None and scores.teacher_ce is None and scores.agreement is None


# ---- both paths against the reference --------------------------------------------------------------

WEIGHTS = [(1.0, 0.0), (0.5, 0.3), (0.0, 1.0)]
CASES = ([(True, kl, ce) for kl, ce in WEIGHTS]
         # without a teacher (stage 3) the loss is ce_weight * CE, whatever kl_weight says
         + [(False, 0.5, 0.3), (False, 0.0, 1.0), (False, 1.0, 1.0)])


@pytest.mark.parametrize("trainable_head", [True, False], ids=["head_trained", "head_frozen"])
@pytest.mark.parametrize("with_teacher, kl_weight, ce_weight", CASES,
                         ids=[f"{'teacher' if t else 'no_teacher'}-kl{k}-ce{c}" for t, k, c in CASES])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_both_paths_equal_the_float64_reference(path, temperature, with_teacher, kl_weight, ce_weight,
                                                trainable_head):
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case()
    student_head.weight.requires_grad_(trainable_head)
    if not with_teacher:
        teacher_hidden = teacher_head = None
    weights = dict(temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight)
    scores = score(student_hidden, student_head, labels, teacher_hidden, teacher_head, chunk=CHUNK,
                   fused=PATHS[path], **weights)
    expected, grad_hidden, grad_weight = reference_with_grads(student_hidden, student_head, labels, teacher_hidden,
                                                              teacher_head, **weights)
    assert int(expected["tokens"]) == B * L - 6
    check_scores(scores, expected, with_teacher, **F64)
    assert scores.loss.requires_grad
    assert not any(v is not None and v.requires_grad
                   for v in (scores.student_ce, scores.kl, scores.teacher_ce, scores.agreement))

    (scores.loss * 0.37).backward()  # the loop scales the loss before backward
    torch.testing.assert_close(student_hidden.grad, 0.37 * grad_hidden, **F64)
    assert student_hidden.grad[0, L - 3:].abs().max() == 0  # padding gets no gradient
    assert student_hidden.grad[1, 5:7].abs().max() == 0
    if trainable_head:
        torch.testing.assert_close(student_head.weight.grad, 0.37 * grad_weight, **F64)
    else:
        assert student_head.weight.grad is None


def check_against_reference(scores, student_hidden, student_head, labels, teacher_hidden, teacher_head, weights):
    """The scores, and the gradients their loss gives the hidden states and the head, as the float64 reference's."""
    expected, grad_hidden, grad_weight = reference_with_grads(student_hidden, student_head, labels, teacher_hidden,
                                                              teacher_head, **weights)
    check_scores(scores, expected, teacher_hidden is not None, **F64)
    scores.loss.backward()
    torch.testing.assert_close(student_hidden.grad, grad_hidden, **F64)
    torch.testing.assert_close(student_head.weight.grad, grad_weight, **F64)


@pytest.mark.parametrize("with_teacher, kl_weight, ce_weight", [(True, 0.5, 0.3), (False, 0.0, 1.0)],
                         ids=["teacher", "no_teacher"])
def test_the_compiled_fused_path_equals_the_float64_reference(with_teacher, kl_weight, ce_weight):
    """score(compiled=True) (train.compile): each chunk's softmaxes, sums and gradient compiled."""
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case(seed=2)
    if not with_teacher:
        teacher_hidden = teacher_head = None
    weights = dict(temperature=2.0, kl_weight=kl_weight, ce_weight=ce_weight)
    scores = score(student_hidden, student_head, labels, teacher_hidden, teacher_head, chunk=CHUNK,
                   compiled=True, **weights)
    check_against_reference(scores, student_hidden, student_head, labels, teacher_hidden, teacher_head, weights)


@pytest.mark.parametrize("chunk", [L, CHUNK, 5, 1, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("path", sorted(PATHS))
def test_chunking_does_not_change_the_result(path, chunk):
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case(seed=1)
    weights = dict(temperature=2.0, kl_weight=0.7, ce_weight=0.3)
    scores = score(student_hidden, student_head, labels, teacher_hidden, teacher_head, chunk=chunk,
                   fused=PATHS[path], **weights)
    check_against_reference(scores, student_hidden, student_head, labels, teacher_hidden, teacher_head, weights)


@pytest.mark.parametrize("dtype, tolerance", [
    (torch.float32, dict(rtol=1e-5, atol=1e-5)),
    (torch.bfloat16, dict(rtol=3e-2, atol=3e-2)),
], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_training_dtypes_are_close_to_the_reference(path, dtype, tolerance):
    """The logits are taken in float32 at least; the gradients come back in the parameters' dtype."""
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case(seed=2, dtype=dtype)
    weights = dict(temperature=2.0, kl_weight=0.5, ce_weight=0.3)
    scores = score(student_hidden, student_head, labels, teacher_hidden, teacher_head, chunk=CHUNK,
                   fused=PATHS[path], **weights)
    expected, grad_hidden, grad_weight = reference_with_grads(student_hidden, student_head, labels, teacher_hidden,
                                                              teacher_head, **weights)
    assert scores.loss.dtype == torch.float32
    check_scores(scores, expected, True, rtol=tolerance["rtol"], atol=tolerance["atol"] * B * L)
    scores.loss.backward()
    assert student_hidden.grad.dtype == dtype and student_head.weight.grad.dtype == dtype
    torch.testing.assert_close(student_hidden.grad.double(), grad_hidden, **tolerance)
    torch.testing.assert_close(student_head.weight.grad.double(), grad_weight, **tolerance)


def test_a_head_with_a_bias_is_scored_with_its_bias():
    student_hidden, teacher_hidden, labels, _, teacher_head = make_case(seed=3)
    head = nn.Linear(C, V, bias=True, dtype=torch.float64)
    scores = score(student_hidden, head, labels, teacher_hidden, teacher_head, chunk=CHUNK, kl_weight=0.5,
                   ce_weight=0.3)
    weight, bias = (p.detach().clone().requires_grad_(True) for p in (head.weight, head.bias))
    expected = reference(student_hidden.detach(), weight, labels, teacher_hidden, teacher_head.weight.detach(),
                         kl_weight=0.5, ce_weight=0.3, student_bias=bias)
    check_scores(scores, expected, True, **F64)
    scores.loss.backward()
    grad_weight, grad_bias = torch.autograd.grad(expected["loss"], (weight, bias))
    torch.testing.assert_close(head.weight.grad, grad_weight, **F64)
    torch.testing.assert_close(head.bias.grad, grad_bias, **F64)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_weights_all_zero_train_nothing_on_both_paths(path):
    """kl_weight = ce_weight = 0 passes the config's checks: the loss is 0 and its gradient is 0 on
    both paths (the module promises they compute the same function), rather than a loss that cannot
    be back-propagated."""
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case(seed=4)
    for teacher in (False, True):
        scores = score(student_hidden, student_head, labels, teacher_hidden if teacher else None,
                       teacher_head if teacher else None, chunk=CHUNK, kl_weight=0.0 if teacher else 1.0,
                       ce_weight=0.0, fused=PATHS[path])
        assert float(scores.loss.detach()) == 0.0 and float(scores.student_ce) > 0
        scores.loss.backward()
        assert student_hidden.grad is not None and float(student_hidden.grad.abs().max()) == 0.0
        student_hidden.grad = None


# ---- what the loss means ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(PATHS))
def test_labels_are_not_shifted_again(path):
    """A student that puts all its mass on labels[:, t] at position t has CE ~0; one that predicts the
    label one step ahead (what a second shift would reward) has a large CE."""
    labels = torch.tensor([[3, 7, 1, 5, 2, IGNORE_INDEX], [6, 0, 4, 4, 7, 2]])
    head = nn.Linear(V, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(V))
    aligned = 30.0 * F.one_hot(labels.clamp(min=0), V).float()  # position t predicts labels[:, t]
    ahead = torch.roll(aligned, shifts=-1, dims=1)  # position t predicts labels[:, t+1]
    good = score(aligned.requires_grad_(True), head, labels, ce_weight=1.0, chunk=4, fused=PATHS[path])
    bad = score(ahead.requires_grad_(True), head, labels, ce_weight=1.0, chunk=4, fused=PATHS[path])
    assert int(good.tokens) == int(bad.tokens) == 11
    assert float(good.student_ce / good.tokens) < 1e-6
    assert float(bad.student_ce / bad.tokens) > 10
    assert float(good.loss.detach()) == pytest.approx(float(good.student_ce))


@pytest.mark.parametrize("path", sorted(PATHS))
def test_kl_is_taken_only_where_there_is_a_target(path):
    """Student and teacher agree except at the one position without a target (and at padding):
    the KL is zero, which a shifted or missing mask would not give."""
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 3, IGNORE_INDEX]])
    head = nn.Linear(C, V, bias=False)
    torch.manual_seed(0)
    teacher_hidden = torch.randn(1, 5, C)
    student_hidden = teacher_hidden.clone()
    student_hidden[0, 2] += 5.0
    student_hidden[0, 4] += 5.0
    scores = score(student_hidden.requires_grad_(True), head, labels, teacher_hidden, head, chunk=2,
                   fused=PATHS[path])
    assert float(scores.kl) == pytest.approx(0.0, abs=1e-6)
    assert float(scores.agreement) == 3.0 and int(scores.tokens) == 3
    scores.loss.backward()
    assert float(student_hidden.grad.abs().max()) < 1e-6  # nothing to learn where the two agree
    moved = student_hidden.detach().clone()
    moved[0, 3] += 5.0
    assert float(score(moved, head, labels, teacher_hidden, head, chunk=2, fused=PATHS[path]).kl) > 0.1


@pytest.mark.parametrize("path", sorted(PATHS))
def test_temperature_scales_the_kl_by_tau_squared(path):
    """Logits multiplied by tau and then softened by tau are the original distributions, so the
    reported KL is tau^2 times the unsoftened one."""
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case(seed=5)
    base = score(student_hidden, student_head, labels, teacher_hidden, teacher_head, temperature=1.0,
                 chunk=CHUNK, fused=PATHS[path])
    tau = 3.0
    scaled_student, scaled_teacher = (nn.Linear(C, V, bias=False, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        scaled_student.weight.copy_(student_head.weight * tau)
        scaled_teacher.weight.copy_(teacher_head.weight * tau)
    scaled = score(student_hidden, scaled_student, labels, teacher_hidden, scaled_teacher, temperature=tau,
                   chunk=CHUNK, fused=PATHS[path])
    torch.testing.assert_close(scaled.kl, base.kl * tau**2, **F64)
    assert float(base.kl) > 0.1


@pytest.mark.parametrize("path", sorted(PATHS))
def test_the_teacher_term_carries_no_gradient(path):
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case(seed=6)
    teacher_hidden.requires_grad_(True)
    scores = score(student_hidden, student_head, labels, teacher_hidden, teacher_head, kl_weight=1.0,
                   ce_weight=0.5, chunk=CHUNK, fused=PATHS[path])
    assert not scores.teacher_ce.requires_grad and not scores.kl.requires_grad
    assert float(scores.teacher_ce) > 0
    scores.loss.backward()
    assert teacher_hidden.grad is None
    assert teacher_head.weight.grad is None
    assert student_head.weight.grad is not None and student_hidden.grad is not None


def test_without_a_teacher_only_the_student_ce():
    student_hidden, _, labels, student_head, _ = make_case(seed=7)
    scores = score(student_hidden, student_head, labels, kl_weight=1.0, ce_weight=1.0, chunk=CHUNK)
    assert scores.kl is None and scores.teacher_ce is None and scores.agreement is None
    mask = labels != IGNORE_INDEX
    expected = F.cross_entropy(student_head(student_hidden)[mask], labels[mask], reduction="sum")
    torch.testing.assert_close(scores.student_ce, expected.detach(), **F64)
    torch.testing.assert_close(scores.loss, expected, **F64)


def test_no_target_at_all_scores_zero():
    student_hidden, teacher_hidden, _, student_head, teacher_head = make_case(seed=8)
    labels = torch.full((B, L), IGNORE_INDEX)
    for fused in (False, True):
        scores = score(student_hidden, student_head, labels, teacher_hidden, teacher_head, ce_weight=1.0,
                       chunk=CHUNK, fused=fused)
        assert int(scores.tokens) == 0
        assert float(scores.loss.detach()) == float(scores.student_ce) == float(scores.kl) == float(scores.agreement) == 0.0


# ---- which path runs ------------------------------------------------------------------------------

@pytest.fixture
def taken(monkeypatch) -> list[str]:
    """The paths `score` takes, in order."""
    paths = []
    fused, plain = scoring._FusedHeadLoss.apply, scoring._plain_chunk

    def spy_fused(*args):
        paths.append("fused")
        return fused(*args)

    def spy_plain(*args):
        paths.append("plain")
        return plain(*args)

    monkeypatch.setattr(scoring._FusedHeadLoss, "apply", spy_fused)
    monkeypatch.setattr(scoring, "_plain_chunk", spy_plain)
    return paths


def test_fused_is_taken_for_a_gradient_through_a_bias_free_linear_head(taken):
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case()
    scores = score(student_hidden, student_head, labels, teacher_hidden, teacher_head, chunk=CHUNK)
    assert taken == ["fused"]
    scores.loss.backward()
    student_head.weight.requires_grad_(False)  # a frozen head (stage 2) still fuses: the hidden states need it
    score(student_hidden, student_head, labels, teacher_hidden, teacher_head, chunk=CHUNK)
    assert taken == ["fused", "fused"]


def test_a_head_with_a_bias_takes_the_plain_path(taken):
    student_hidden, teacher_hidden, labels, _, teacher_head = make_case()
    head = nn.Linear(C, V, bias=True, dtype=torch.float64)
    assert not fusable(head)
    score(student_hidden, head, labels, teacher_hidden, teacher_head, chunk=CHUNK)
    assert taken == ["plain"] * 3  # one per chunk of 4 in 11 positions


def test_a_head_that_is_no_linear_module_or_is_partitioned_takes_the_plain_path(taken):
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case()
    wrapped = nn.Sequential(student_head)
    score(student_hidden, wrapped, labels, teacher_hidden, teacher_head, chunk=L)
    student_head.weight.ds_id = 7  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    try:
        assert not fusable(student_head)
        score(student_hidden, student_head, labels, teacher_hidden, teacher_head, chunk=L)
    finally:
        del student_head.weight.ds_id
    assert taken == ["plain", "plain"]


def test_no_gradient_no_fusion(taken):
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case()
    with torch.no_grad():
        scores = score(student_hidden, student_head, labels, teacher_hidden, teacher_head, chunk=L)
    assert taken == ["plain"] and not scores.loss.requires_grad
    score(student_hidden.detach(), student_head, labels, teacher_hidden, teacher_head, chunk=L)  # evaluation
    assert taken == ["plain", "plain"]


# ---- memory: no logits kept for backward ------------------------------------------------------------

class Saved:
    """What autograd keeps of one saved tensor (through saved_tensors_hooks)."""

    def __init__(self, tensor: torch.Tensor):
        self.shape = tuple(tensor.shape)
        self.tensor = tensor


def kept_for_backward(run) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """The shapes of the tensors the graph built by `run()` still holds once it has returned, and its output."""
    alive: weakref.WeakSet = weakref.WeakSet()

    def pack(tensor):
        saved = Saved(tensor)
        alive.add(saved)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        output = run()
    gc.collect()
    return sorted(saved.shape for saved in alive), output


def test_the_detector_sees_logits_kept_for_backward():
    """A loss over full logits keeps [*, V] tensors: what the next test must not find."""
    student_hidden, _, labels, student_head, _ = make_case()
    shapes, loss = kept_for_backward(lambda: F.cross_entropy(student_head(student_hidden).flatten(0, 1),
                                                             labels.flatten()))
    assert any(shape and shape[-1] == V for shape in shapes)
    loss.backward()


@pytest.mark.parametrize("path", sorted(PATHS))
def test_no_logits_are_kept_for_backward(path):
    student_hidden, teacher_hidden, labels, student_head, teacher_head = make_case()
    shapes, scores = kept_for_backward(lambda: score(student_hidden, student_head, labels, teacher_hidden,
                                                     teacher_head, kl_weight=0.5, ce_weight=0.3, chunk=CHUNK,
                                                     fused=PATHS[path]))
    assert shapes, "nothing saved: the detector saw nothing"
    assert not [shape for shape in shapes if shape and shape[-1] == V], shapes
    if path == "fused":  # the gradients themselves, computed in the forward pass
        assert shapes == sorted([(B, L, C), (V, C)])
    scores.loss.backward()
    expected, grad_hidden, grad_weight = reference_with_grads(student_hidden, student_head, labels, teacher_hidden,
                                                              teacher_head, kl_weight=0.5, ce_weight=0.3)
    torch.testing.assert_close(student_hidden.grad, grad_hidden, **F64)
    torch.testing.assert_close(student_head.weight.grad, grad_weight, **F64)


# ---- final hidden states ---------------------------------------------------------------------------

def test_final_hidden_states_are_what_the_head_reads():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, V, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        hidden = final_hidden_states(model, ids, mask)
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert hidden.shape == (2, 9, 16)
    torch.testing.assert_close(model.get_output_embeddings()(hidden), logits)
