"""WKV-7: the state update shared by training and inference (conventions in README.md here).

`wkv7` picks the implementation from the tensors it gets:

- CUDA, float32/bf16/fp16: flash-linear-attention. `chunk_rwkv7` for training and prefill;
  `fused_recurrent_rwkv7` for a single decoding step when no gradient is needed (fla has no
  backward for it).
- Anything else (the CPU, float64 checks on a GPU): `wkv7_chunk`, or the step loop `wkv7_naive`
  for sequences of at most NAIVE_MAX_LEN steps, where it is faster.
"""

import torch
from torch import Tensor
from torch.profiler import record_function

from rwkvinside.errors import UserError
from rwkvinside.ops.wkv7.chunk import wkv7_chunk
from rwkvinside.ops.wkv7.fla import (RWKV7_CHUNK_OPTIONS, RWKV7_DECAY_FLOOR, fla_available, wkv7_fla_chunk,
                                     wkv7_fla_fused_recurrent)
from rwkvinside.ops.wkv7.naive import wkv7_naive

# Up to this many steps the step loop beats the chunked form on the CPU: a decoding step costs it
# a handful of ops against the chunked form's few dozen. Measured (benchmarks/bench_wkv7_cpu.py
# --short, 2 cores, H=9, N=64): one step 0.23 vs 0.67 ms at B=1 and 2.7 vs 3.9 ms at B=16; two
# steps even at B=16; from four steps on the chunked form wins at B=16 (4.7 vs 8.3 ms).
NAIVE_MAX_LEN = 2


@record_function("wkv7")
def wkv7(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    decay_floor: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per head: S_t = diag(e^{w_t}) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T, o_t = scale S_t^T r_t.

    Args:
        r, w, k, a, b: [B, T, H, K], one dtype and device; w is the log decay (<= 0).
        v: [B, T, H, V].
        scale: multiplies the outputs; always pass it (RWKV-7 uses 1.0).
        initial_state: [B, H, K, V] or None (zeros).
        output_final_state: return the state after the last step.
        decay_floor: the caller's promise that w >= decay_floor everywhere (RWKV-7's decay keeps
            w >= -e^{-1/2}). On CUDA a floor of at least RWKV7_DECAY_FLOOR lets fla's chunk kernel use
            its faster tensor-core scheme (`RWKV7_CHUNK_OPTIONS`); elsewhere it changes nothing.

    Returns:
        o: [B, T, H, V] in the input dtype, and the final state [B, H, K, V] (float32, or float64
        for float64 inputs) or None. Differentiable in all six inputs and initial_state.
    """
    _check_inputs(r, w, k, v, a, b, initial_state)
    args = (r, w, k, v, a, b, scale, initial_state, output_final_state)
    if r.is_cuda and r.dtype != torch.float64:
        # No silent fallback: the chunked PyTorch form is written for the CPU; a GPU training run on
        # it would be far slower and hungrier for memory than the user expects, which a log line
        # would not stop (benchmarks/gpu_wkv7_parity.py measures by how much).
        if not fla_available():
            raise UserError(
                "WKV-7 on CUDA needs flash-linear-attention, which is not installed: "
                "pip install 'rwkvinside[cuda]'"
            )
        needs_grad = _needs_grad(r, w, k, v, a, b, initial_state)
        if r.shape[1] == 1 and not needs_grad:
            return wkv7_fla_fused_recurrent(*args)
        bounded = decay_floor is not None and decay_floor >= RWKV7_DECAY_FLOOR
        # Where a backward will follow, fla keeps the forward's intermediates for it instead of
        # recomputing them: the same values (bitwise, H200), stage 1's stacked call 37.2 -> 29.3 ms
        # forward + backward for 2.1 GB more (BENCHMARKS.md).
        return wkv7_fla_chunk(*args, disable_recompute=needs_grad, **(RWKV7_CHUNK_OPTIONS if bounded else {}))
    if r.shape[1] <= NAIVE_MAX_LEN:
        return wkv7_naive(*args)
    return wkv7_chunk(*args)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


def _check_inputs(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, initial_state: Tensor | None
) -> None:
    """Raise ValueError naming the tensor whose shape, dtype or device disagrees with r's."""
    if r.dim() != 4 or not r.is_floating_point():
        raise ValueError(f"wkv7: r must be a floating [B, T, H, K] tensor, got {r.dtype} {tuple(r.shape)}")
    for name, x in (("w", w), ("k", k), ("a", a), ("b", b)):
        if x.shape != r.shape:
            raise ValueError(f"wkv7: {name} has shape {tuple(x.shape)} but r has {tuple(r.shape)}")
    if v.dim() != 4 or v.shape[:3] != r.shape[:3]:
        raise ValueError(f"wkv7: v has shape {tuple(v.shape)}, expected [B, T, H, V] with r's B, T, H")
    for name, x in (("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        if x.dtype != r.dtype or x.device != r.device:
            raise ValueError(f"wkv7: {name} is {x.dtype} on {x.device} but r is {r.dtype} on {r.device}")
    if initial_state is not None:
        batch, _, heads, key_dim = r.shape
        expected = (batch, heads, key_dim, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(
                f"wkv7: initial_state has shape {tuple(initial_state.shape)}, expected {expected}"
            )
        if initial_state.device != r.device:
            raise ValueError(f"wkv7: initial_state is on {initial_state.device} but r is on {r.device}")


__all__ = ["wkv7", "wkv7_chunk", "wkv7_naive"]
