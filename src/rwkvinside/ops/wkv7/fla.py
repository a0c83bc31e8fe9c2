"""WKV-7 on CUDA through flash-linear-attention (`fla`, checked against fla 0.6.0).

fla is imported inside the functions, so this module imports (and the package runs on the CPU)
without triton or fla installed. What fla 0.6.0's `fla.ops.rwkv7` functions take and return,
read from its source:

- Layout [B, T, H, K] (the removed `head_first` argument is gone; 0.6.0 no longer takes **kwargs),
  v [B, T, H, V], state [N, H, K, V]; w is the log decay; a, b as in `naive.py`.
- `chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False,
  cu_seqlens=None, cu_seqlens_cpu=None, safe_gate=False, chunk_size=None,
  disable_recompute=False, cp_context=None, lower_bound=None)`: differentiable (also through
  initial_state); returns o in r's dtype and a float32 final state. Warns (RuntimeWarning) on
  every float32 call that float32 "is not supported on some platforms".
- `fused_recurrent_rwkv7(r, w, k, v, a, b, scale=None, initial_state=None,
  output_final_state=True, cu_seqlens=None)`: forward only (its backward raises
  NotImplementedError); scale=None means 1/sqrt(K). Returns o in v's dtype, float32 state.

The two defaults differ (scale 1.0 vs 1/sqrt(K), output_final_state False vs True), so both
adapters always pass both explicitly.
"""

from torch import Tensor

from rwkvinside.ops.wkv7.tuned import seed_fla_kernels

# The options fla's own RWKV-7 layer passes to `chunk_rwkv7`. `lower_bound` promises
# w >= -e^{-1/2} (true of RWKV-7's decay, not of every caller), which licenses fla's faster
# tensor-core scheme for the within-chunk products; with it fla picks chunk 64 by itself.
RWKV7_DECAY_FLOOR = -0.6065306597126334  # -e^{-1/2}
RWKV7_CHUNK_OPTIONS = dict(safe_gate=True, lower_bound=RWKV7_DECAY_FLOOR, chunk_size=64)


def fla_available() -> bool:
    """Whether `fla.ops.rwkv7` imports (it needs triton, hence a GPU build)."""
    try:
        import fla.ops.rwkv7  # noqa: F401
    except ImportError:
        return False
    return True


def wkv7_fla_chunk(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    safe_gate: bool = False,
    lower_bound: float | None = None,
    chunk_size: int | None = None,
    disable_recompute: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """WKV-7 by fla's chunked kernel: training and prefill. Inputs [B, T, H, K], v [B, T, H, V].

    safe_gate, lower_bound, chunk_size and disable_recompute (keep the forward's intermediates for
    the backward instead of recomputing them) go to `chunk_rwkv7` unchanged; the defaults are fla's
    (no bound assumed on w, chunk 16, recompute). Pass **RWKV7_CHUNK_OPTIONS only where w >= -0.6065 holds.
    """
    from fla.ops.rwkv7 import chunk_rwkv7

    seed_fla_kernels()
    return chunk_rwkv7(
        r, w, k, v, a, b,  # fla's own order
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        safe_gate=safe_gate,
        lower_bound=lower_bound,
        chunk_size=chunk_size,
        disable_recompute=disable_recompute,
    )


def wkv7_fla_fused_recurrent(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """WKV-7 by fla's step-by-step kernel: decoding, forward only. Inputs [B, T, H, K]."""
    from fla.ops.rwkv7 import fused_recurrent_rwkv7

    seed_fla_kernels()
    return fused_recurrent_rwkv7(
        r, w, k, v, a, b,  # fla's own order
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
    )
