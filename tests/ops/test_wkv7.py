"""WKV-7: the step-by-step reference against hand computations, every fast path against the reference.

The reference `wkv7_naive` runs in float64 on the float32 inputs the fast path sees; each output,
final state and gradient (from random upstream gradients) is compared as ||x - ref|| / ||ref||.
The fla tests run only where CUDA and flash-linear-attention are both present.
"""

import importlib
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from rwkvinside.errors import UserError
from rwkvinside.ops.wkv7 import NAIVE_MAX_LEN, wkv7, wkv7_chunk, wkv7_naive
from rwkvinside.ops.wkv7.fla import (
    RWKV7_CHUNK_OPTIONS,
    fla_available,
    wkv7_fla_chunk,
    wkv7_fla_fused_recurrent,
)

# `import rwkvinside.ops.wkv7 as m` would give the function: rwkvinside.ops re-exports it by that name.
wkv7_module = importlib.import_module("rwkvinside.ops.wkv7")
fla_adapters = importlib.import_module("rwkvinside.ops.wkv7.fla")
INPUT_NAMES = ("r", "w", "k", "v", "a", "b")
CPU_TOLERANCE = 1e-5
# fla's chunk kernel warns on every float32 call; the tests below say how well it does.
pytestmark = pytest.mark.filterwarnings("ignore:ChunkDeltaRuleFunction does not support float32")


def make_inputs(
    batch: int,
    seq_len: int,
    heads: int,
    key_dim: int,
    value_dim: int | None = None,
    *,
    harsh: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """r, w, k, v, a, b [B, T, H, N] and initial_state [B, H, K, V].

    RWKV-7-shaped: a = -kappa with kappa unit-norm per head, b = kappa * iclr, iclr in (0, 1),
    w in [-0.6065, 0]. Harsh: w in [-5, 0] and b along a second unit vector, independent of a.
    """
    value_dim = value_dim or key_dim
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, seq_len, heads, key_dim)

    def unit(*size: int) -> torch.Tensor:
        x = torch.randn(size, generator=gen, dtype=torch.float64)
        return x / x.norm(dim=-1, keepdim=True)

    kappa = unit(*shape)
    iclr = torch.rand(shape, generator=gen, dtype=torch.float64)
    inputs = {
        "r": torch.randn(shape, generator=gen, dtype=torch.float64),
        "w": -(5.0 if harsh else 0.6065) * torch.rand(shape, generator=gen, dtype=torch.float64),
        "k": torch.randn(shape, generator=gen, dtype=torch.float64),
        "v": torch.randn(batch, seq_len, heads, value_dim, generator=gen, dtype=torch.float64),
        "a": -kappa,
        "b": (unit(*shape) if harsh else kappa) * iclr,
        "initial_state": torch.randn(batch, heads, key_dim, value_dim, generator=gen, dtype=torch.float64),
    }
    return {name: x.to(device=device, dtype=dtype) for name, x in inputs.items()}


def run_with_grads(
    op, inputs: dict[str, torch.Tensor], grad_dtype: torch.dtype | None = None, **kwargs
) -> dict[str, torch.Tensor]:
    """o, final_state and the gradients of all inputs, from fixed random upstream gradients
    (the one for o rounded to grad_dtype, by default o's dtype)."""
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    o, state = op(
        *(leaves[name] for name in INPUT_NAMES),
        initial_state=leaves.get("initial_state"),
        output_final_state=True,
        **kwargs,
    )
    gen = torch.Generator().manual_seed(1)
    grad_o = torch.randn(o.shape, generator=gen).to(grad_dtype or o.dtype).to(o)
    grad_state = torch.randn(state.shape, generator=gen).to(state)
    torch.autograd.backward((o, state), (grad_o, grad_state))
    return {"o": o, "final_state": state} | {f"d{name}": x.grad for name, x in leaves.items()}


def reference(inputs: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """wkv7_naive in float64 on the same inputs and the same (rounded) upstream gradients."""
    inputs64 = {name: x.double() for name, x in inputs.items()}
    return run_with_grads(wkv7_naive, inputs64, grad_dtype=inputs["r"].dtype, scale=scale)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, or ||x|| where ref is exactly zero (e.g. dw after one step from zero)."""
    ref_norm = ref.double().norm().item()
    return (x.double() - ref.double()).norm().item() / (ref_norm if ref_norm > 0 else 1.0)


def assert_close(results: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tolerance: float) -> None:
    errors = {name: relative_error(results[name], ref[name]) for name in ref}
    assert all(error <= tolerance for error in errors.values()), f"relative errors {errors}"


# The reference against computations that do not go through it.


def test_reference_matches_a_hand_computation():
    """One head, N = 2, two steps, worked out on paper (see the comments)."""
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    w = torch.tensor([[0.5, 1.0], [1.0, 0.25]]).log()
    k = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    v = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [-0.5, 0.0]])
    state = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # Step 1: u = a^T S0 = [1, 0]; S1 = diag(.5, 1) S0 + b u^T + k v^T = [[1.5, -1], [2, 1]]; o1 = 2 S1^T r.
    # Step 2: u = a^T S1 = [2, 1]; S2 = diag(1, .25) S1 + b u^T + k v^T = [[.5, -1.5], [2.5, 2.25]].
    expected_o = torch.tensor([[3.0, -2.0], [6.0, 1.5]])
    expected_state = torch.tensor([[0.5, -1.5], [2.5, 2.25]])
    as_batch = [x[None, :, None].double() for x in (r, w, k, v, a, b)]  # [1, T, 1, 2]
    o, final_state = wkv7_naive(
        *as_batch, scale=2.0, initial_state=state[None, None].double(), output_final_state=True
    )
    torch.testing.assert_close(o[0, :, 0], expected_o.double())
    torch.testing.assert_close(final_state[0, 0], expected_state.double())


def test_reference_matches_rwkv_lm_numpy_step():
    """RWKV-LM's numpy step (rwkv_v7_numpy.py) on its own parameters and its transposed state:
    S = S * w^T - S kk (kk * a)^T + v k^T; y = S r, with kk the removal key and a = iclr."""
    inputs = make_inputs(1, 6, 2, 4, 3, seed=3, dtype=torch.float64)
    kk = torch.nn.functional.normalize(torch.randn(1, 6, 2, 4, dtype=torch.float64), dim=-1)
    iclr = torch.rand(1, 6, 2, 4, dtype=torch.float64)
    r, w, k, v, state = (inputs[name] for name in ("r", "w", "k", "v", "initial_state"))
    o, final_state = wkv7_naive(r, w, k, v, -kk, kk * iclr, 1.0, state, True)
    for head in range(2):
        S = state[0, head].numpy().T  # [V, K]
        for t in range(6):
            r_t, w_t, k_t, v_t, kk_t, a_t = (
                x[0, t, head].numpy()[:, None] for x in (r, w.exp(), k, v, kk, iclr)
            )
            S = S * w_t.T - S @ kk_t * (kk_t * a_t).T + v_t * k_t.T
            np.testing.assert_allclose(o[0, t, head].numpy(), (S @ r_t)[:, 0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(final_state[0, head].numpy(), S.T, rtol=1e-12, atol=1e-12)


# The chunked form against the reference.

CHUNK_CASES = [
    # (B, T, H, K, V, chunk size, harsh)
    (2, 1, 2, 16, 16, 16, False),
    (2, 37, 3, 32, 32, 16, False),
    (2, 37, 2, 32, 48, 32, True),
    (1, 64, 2, 64, 64, 32, False),
    (1, 100, 2, 64, 64, 16, True),
    (1, 100, 2, 64, 64, 32, True),
    (1, 100, 2, 64, 64, 64, False),
]


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("batch,seq_len,heads,key_dim,value_dim,chunk_size,harsh", CHUNK_CASES)
def test_chunk_matches_reference(batch, seq_len, heads, key_dim, value_dim, chunk_size, harsh, with_state):
    inputs = make_inputs(batch, seq_len, heads, key_dim, value_dim, harsh=harsh)
    if not with_state:
        del inputs["initial_state"]
    ref = reference(inputs, scale=0.5)
    results = run_with_grads(wkv7_chunk, inputs, scale=0.5, chunk_size=chunk_size)
    assert results["o"].dtype == torch.float32 and results["final_state"].dtype == torch.float32
    assert_close(results, ref, CPU_TOLERANCE)


@pytest.mark.parametrize("log_decay,chunk_size", [(-5.0, 32), (-10.0, 16), (-2.5, 64)])
def test_chunk_at_the_edge_of_its_decay_range(log_decay, chunk_size):
    """The steepest decay each chunk size is documented to handle, on every step and channel."""
    inputs = make_inputs(1, 80, 2, 32, harsh=True, seed=5)
    inputs["w"] = torch.full_like(inputs["w"], log_decay)
    assert_close(run_with_grads(wkv7_chunk, inputs, chunk_size=chunk_size), reference(inputs), CPU_TOLERANCE)


@pytest.mark.parametrize("op", [wkv7, wkv7_chunk], ids=["wkv7", "wkv7_chunk"])
def test_state_carries_across_calls(op):
    """Two calls, the second starting from the first one's final state, equal one call. Through
    `wkv7` the short second piece takes the step loop and the first the chunked form."""
    inputs = make_inputs(2, 50, 2, 32, harsh=True, seed=7)
    split = 50 - NAIVE_MAX_LEN
    r, w, k, v, a, b = (inputs[name] for name in INPUT_NAMES)
    whole_o, whole_state = op(r, w, k, v, a, b, 1.0, inputs["initial_state"], True)
    first_o, state = op(*(x[:, :split] for x in (r, w, k, v, a, b)), 1.0, inputs["initial_state"], True)
    second_o, state = op(*(x[:, split:] for x in (r, w, k, v, a, b)), 1.0, state, True)
    assert relative_error(torch.cat([first_o, second_o], dim=1), whole_o) <= CPU_TOLERANCE
    assert relative_error(state, whole_state) <= CPU_TOLERANCE


# The dispatcher on the CPU.


@pytest.mark.parametrize("seq_len", [NAIVE_MAX_LEN, NAIVE_MAX_LEN + 1, 40])
@pytest.mark.parametrize(
    "dtype,tolerance",
    [(torch.float32, CPU_TOLERANCE), (torch.bfloat16, 1e-2), (torch.float64, 1e-12)],
    ids=["float32", "bfloat16", "float64"],
)
def test_wkv7_on_cpu(dtype, tolerance, seq_len):
    inputs = make_inputs(2, seq_len, 2, 16, dtype=dtype)
    results = run_with_grads(wkv7, inputs, scale=1.0)
    assert results["o"].dtype == dtype
    assert results["final_state"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(results, reference(inputs), tolerance)


def test_wkv7_returns_no_state_unless_asked():
    inputs = make_inputs(1, 20, 1, 8)
    o, state = wkv7(*(inputs[name] for name in INPUT_NAMES), scale=1.0)
    assert o.shape == (1, 20, 1, 8) and state is None


def test_empty_sequence_keeps_the_state():
    inputs = make_inputs(2, 0, 3, 8, 4)
    o, state = wkv7_chunk(*(inputs[name] for name in INPUT_NAMES), 1.0, inputs["initial_state"], True)
    assert o.shape == (2, 0, 3, 4)
    torch.testing.assert_close(state, inputs["initial_state"])


@pytest.mark.parametrize(
    "name,bad,message",
    [
        ("k", lambda x: x[..., :-1], "k has shape"),
        ("v", lambda x: x[:, :-1], "v has shape"),
        ("a", lambda x: x.double(), "a is torch.float64"),
        ("w", lambda x: torch.empty_like(x, device="meta"), "w is torch.float32 on meta"),
        ("initial_state", lambda x: x[:, :1], "initial_state has shape"),
        ("initial_state", lambda x: torch.empty_like(x, device="meta"), "initial_state is on meta"),
    ],
)
def test_wkv7_names_the_mismatched_tensor(name, bad, message):
    inputs = make_inputs(2, 5, 2, 8)
    inputs[name] = bad(inputs[name])
    with pytest.raises(ValueError, match=message):
        wkv7(*(inputs[n] for n in INPUT_NAMES), scale=1.0, initial_state=inputs["initial_state"])


def test_fla_adapters_pass_scale_and_output_final_state(monkeypatch):
    """fla's two functions default scale (1.0 vs 1/sqrt(K)) and output_final_state (False vs True)
    differently, so the adapters always pass both. Checked against a stand-in fla module."""
    calls = {}
    fake = types.ModuleType("fla.ops.rwkv7")
    fake.chunk_rwkv7 = lambda *args, **kwargs: calls.setdefault("chunk", kwargs)
    fake.fused_recurrent_rwkv7 = lambda *args, **kwargs: calls.setdefault("fused_recurrent", kwargs)
    for name, module in (("fla", types.ModuleType("fla")), ("fla.ops", types.ModuleType("fla.ops"))):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "fla.ops.rwkv7", fake)
    # The shipped kernel choices are seeded before each launch (tested in test_tuned.py).
    seeded = []
    monkeypatch.setattr(fla_adapters, "seed_fla_kernels", lambda: seeded.append(True))
    inputs = make_inputs(1, 3, 1, 4)
    wkv7_fla_chunk(*(inputs[name] for name in INPUT_NAMES), **RWKV7_CHUNK_OPTIONS)
    wkv7_fla_fused_recurrent(*(inputs[name] for name in INPUT_NAMES))
    defaults = {"scale": 1.0, "initial_state": None, "output_final_state": False}
    assert calls["chunk"] == defaults | RWKV7_CHUNK_OPTIONS | {"disable_recompute": False}
    assert calls["fused_recurrent"] == defaults
    assert seeded == [True, True]


def test_importing_the_ops_does_not_import_fla():
    code = "import sys, rwkvinside.ops; assert 'fla' not in sys.modules, 'fla imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# flash-linear-attention on CUDA. Tolerances from the GPU check in docs/rwkv7.md (H200, fla 0.6.0):
# fused_recurrent 1e-7 in float32, chunk 7.5e-4 (its matrix products run in tf32), 3e-3 to 4e-3
# in bf16; gradients are given the same room with a margin.
FLA_TOLERANCES = {
    ("fused_recurrent", torch.float32): 1e-5,
    ("fused_recurrent", torch.bfloat16): 1e-2,
    ("chunk", torch.float32): 5e-3,
    ("chunk", torch.bfloat16): 2e-2,
}
needs_fla = pytest.mark.skipif(
    not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and flash-linear-attention"
)
fla_dtypes = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])


@needs_fla
@fla_dtypes
@pytest.mark.parametrize("options", [{}, RWKV7_CHUNK_OPTIONS], ids=["fla-defaults", "rwkv7-options"])
@pytest.mark.parametrize("seq_len", [100, 300])
def test_fla_chunk_matches_reference(dtype, options, seq_len):
    inputs = make_inputs(2, seq_len, 3, 64, dtype=dtype, device="cuda")
    results = run_with_grads(wkv7_fla_chunk, inputs, scale=1.0, **options)
    assert results["o"].dtype == dtype and results["final_state"].dtype == torch.float32
    assert_close(results, reference(inputs), FLA_TOLERANCES["chunk", dtype])


@needs_fla
@fla_dtypes
@pytest.mark.parametrize("seq_len", [1, 100])
def test_fla_fused_recurrent_matches_reference(dtype, seq_len):
    inputs = make_inputs(2, seq_len, 3, 64, dtype=dtype, device="cuda")
    with torch.no_grad():
        o, state = wkv7_fla_fused_recurrent(
            *(inputs[name] for name in INPUT_NAMES), scale=1.0,
            initial_state=inputs["initial_state"], output_final_state=True,
        )
        ref_o, ref_state = wkv7_naive(
            *(inputs[name].double() for name in INPUT_NAMES), scale=1.0,
            initial_state=inputs["initial_state"].double(), output_final_state=True,
        )
    assert o.dtype == dtype and state.dtype == torch.float32
    tolerance = FLA_TOLERANCES["fused_recurrent", dtype]
    assert relative_error(o, ref_o) <= tolerance and relative_error(state, ref_state) <= tolerance


@needs_fla
@pytest.mark.parametrize("seq_len", [1, 40])
def test_wkv7_on_cuda_is_differentiable(seq_len):
    """With gradients wanted even one step takes the chunk kernel (fused_recurrent has no backward)."""
    inputs = make_inputs(2, seq_len, 2, 64, device="cuda")
    results = run_with_grads(wkv7, inputs, scale=1.0)
    assert_close(results, reference(inputs), FLA_TOLERANCES["chunk", torch.float32])


@needs_fla
def test_wkv7_decoding_step_on_cuda_uses_fused_recurrent(monkeypatch):
    calls = []
    monkeypatch.setattr(wkv7_module, "wkv7_fla_fused_recurrent", lambda *args: calls.append(args) or args[:2])
    inputs = make_inputs(2, 1, 2, 64, device="cuda")
    with torch.no_grad():
        wkv7(*(inputs[name] for name in INPUT_NAMES), scale=1.0)
    assert len(calls) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_wkv7_on_cuda_without_fla_says_what_to_install(monkeypatch):
    monkeypatch.setattr(wkv7_module, "fla_available", lambda: False)
    inputs = make_inputs(1, 8, 1, 16, device="cuda")
    with pytest.raises(UserError, match=r"pip install 'rwkvinside\[cuda\]'"):
        wkv7(*(inputs[name] for name in INPUT_NAMES), scale=1.0)
