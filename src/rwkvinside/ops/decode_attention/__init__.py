"""Softmax attention of ONE query token per row over a key/value cache, under a boolean mask, with
grouped key/value heads: what sampling the teacher (`generation/sampler.py`) runs at every step.

    o[b, h] = sum over l with mask[b, l] of softmax_l(scale * q[b, h] . k[b, h // G, l]) v[b, h // G, l]

G query heads share a key/value head. At the sampler's batch sizes (1,024 rows over a cache of a
few hundred slots) this is most of a step's cost, and nearly all of it memory traffic: the kernel
below took `rwkvinside synth` from 64k to 112k sampled tokens/s on an H200 (BENCHMARKS.md).

- CUDA, a power-of-two head size from 16 to 256, triton present: `kernel.py`, which reads each row's
  visible slots only (a row's left padding and the slots not yet written cost nothing) and the G
  query heads of a key/value head together.
- Anything else: two matrix products over the whole cache, the G query heads of a key/value head as
  G rows of one product (the cache is read as it is, not copied G times as transformers' sdpa does
  under a mask).
"""

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def masked_decode_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, scale: float) -> Tensor:
    """query [B, H, D], key and value [B, H/G, L, D], mask [B, L] (True: seen; every row sees at least
    one slot) -> [B, H, D] in the query's dtype."""
    batch, heads, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    if heads % kv_heads or key.shape != (batch, kv_heads, length, dim) or value.shape != key.shape:
        raise ValueError(f"masked_decode_attention: query {tuple(query.shape)}, key {tuple(key.shape)} and "
                         f"value {tuple(value.shape)} do not make [B, H, D] over [B, H/G, L, D]")
    if mask.shape != (batch, length) or mask.dtype != torch.bool:
        raise ValueError(f"masked_decode_attention: mask must be a bool [B, L] = [{batch}, {length}] tensor, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if query.is_cuda and _kernel_fits(query) and triton_available():
        from rwkvinside.ops.decode_attention.kernel import masked_decode_attention_triton

        return masked_decode_attention_triton(query, key, value, mask, scale)
    return masked_decode_attention_torch(query, key, value, mask, scale)


def masked_decode_attention_torch(query: Tensor, key: Tensor, value: Tensor, mask: Tensor,
                                  scale: float) -> Tensor:
    """The same in two matrix products over every slot (scores and softmax in float32)."""
    batch, heads, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # head h reads key/value head h // G
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale  # [B, H/G, G, L]
    weights = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
    return torch.matmul(weights.to(value.dtype), value).reshape(batch, heads, dim)


def triton_available() -> bool:
    """Whether triton imports (a GPU build of torch brings it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernel_fits(query: Tensor) -> bool:
    dim = query.shape[-1]
    return 16 <= dim <= 256 and dim & (dim - 1) == 0 and query.dtype in KERNEL_DTYPES


__all__ = ["masked_decode_attention", "masked_decode_attention_torch"]
