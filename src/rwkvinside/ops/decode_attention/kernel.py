"""`masked_decode_attention` as one Triton kernel (the math: `__init__.py`).

One program per (row, key/value head): it holds the G query heads that read that key/value head as
the rows of a [G, D] block (padded to 16 rows, the least `tl.dot` takes) and walks the cache in
blocks of BLOCK slots with the running-maximum softmax of flash attention. A slot the mask hides is
never loaded (the loads are predicated on the mask), so a row's traffic is its visible slots. The
cache length is a compile-time constant: a sampler keeps one cache for all its batches.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 64  # cache slots per iteration
MIN_ROWS = 16  # tl.dot's least M


@triton.jit
def _masked_decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_mb, stride_ml, stride_ob, stride_oh,
    LENGTH: tl.constexpr, GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr, DIM: tl.constexpr,
    BLOCK: tl.constexpr, IEEE: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    members = tl.arange(0, GROUP_ROWS)
    real = members < GROUP  # the padding rows compute on zeros and are not stored
    heads = kv_head * GROUP + members
    dims = tl.arange(0, DIM)
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=real[:, None],
                other=0.0)
    keys = k_ptr + row * stride_kb + kv_head * stride_kh
    values = v_ptr + row * stride_vb + kv_head * stride_vh
    best = tl.full([GROUP_ROWS], float("-inf"), tl.float32)  # running maximum score
    total = tl.zeros([GROUP_ROWS], tl.float32)  # running sum of exp(score - best)
    acc = tl.zeros([GROUP_ROWS, DIM], tl.float32)  # running sum of exp(score - best) v
    for first in range(0, LENGTH, BLOCK):
        slots = first + tl.arange(0, BLOCK)
        seen = tl.load(mask_ptr + row * stride_mb + slots * stride_ml, mask=slots < LENGTH, other=0)
        seen = seen != 0
        k = tl.load(keys + slots[:, None] * stride_kl + dims[None, :], mask=seen[:, None], other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(seen[None, :], scores * scale, float("-inf"))  # [GROUP_ROWS, BLOCK]
        new_best = tl.maximum(best, tl.max(scores, 1))
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # no slot seen yet: keep exp finite
        weights = tl.exp(scores - shift[:, None])  # 0 where unseen
        rescale = tl.exp(best - shift)
        v = tl.load(values + slots[:, None] * stride_vl + dims[None, :], mask=seen[:, None], other=0.0)
        if IEEE:
            update = tl.dot(weights.to(v.dtype), v, input_precision="ieee")
        else:
            update = tl.dot(weights.to(v.dtype), v)
        acc = acc * rescale[:, None] + update
        total = total * rescale + tl.sum(weights, 1)
        best = new_best
    out = acc / total[:, None]
    tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=real[:, None])


def masked_decode_attention_triton(query: Tensor, key: Tensor, value: Tensor, mask: Tensor,
                                   scale: float) -> Tensor:
    """query [B, H, D], key and value [B, H/G, L, D] (each with unit stride along D), mask [B, L] bool
    -> [B, H, D]."""
    batch, heads, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    query, key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, key, value))
    group = heads // kv_heads
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    seen = mask.view(torch.uint8)
    _masked_decode_attention_kernel[(batch, kv_heads)](
        query, key, value, seen, out, scale,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), seen.stride(0), seen.stride(1),
        out.stride(0), out.stride(1),
        LENGTH=length, GROUP=group, GROUP_ROWS=max(MIN_ROWS, triton.next_power_of_2(group)), DIM=dim,
        BLOCK=BLOCK, IEEE=query.dtype == torch.float32,
    )
    return out
