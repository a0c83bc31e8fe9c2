"""The WKV-7 recurrence one step at a time: the specification every fast path is checked against.

Per head, with the state S in R^{N_k x N_v} (key rows, value columns, as flash-linear-attention):

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    o_t = scale * S_t^T r_t

In RWKV-7, a = -kappa_hat and b = kappa_hat * iclr (the in-context learning rate), so the middle
term removes the old value stored under the normalised key before the new one is written.
"""

import torch
from torch import Tensor


def wkv7_naive(
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
    """Step-by-step WKV-7. Inputs [B, T, H, N]; w is the log decay (<= 0); state [B, H, N_k, N_v].

    Computes in float64 when any input is float64, else float32; returns outputs in r's dtype
    and the final state in float32 (float64 for float64 inputs).
    """
    batch, seq_len, heads, key_dim = r.shape
    value_dim = v.shape[-1]
    input_dtype = r.dtype
    compute_dtype = torch.float64 if input_dtype == torch.float64 else torch.float32
    r, w, k, v, a, b = (x.to(compute_dtype) for x in (r, w, k, v, a, b))
    if initial_state is None:
        state = r.new_zeros(batch, heads, key_dim, value_dim)
    else:
        state = initial_state.to(compute_dtype)
    decay = w.exp()
    outputs = []
    for t in range(seq_len):
        removed = torch.einsum("bhk,bhkv->bhv", a[:, t], state)  # a_t^T S: [B, H, N_v]
        state = (
            state * decay[:, t, :, :, None]
            + b[:, t, :, :, None] * removed[:, :, None, :]
            + k[:, t, :, :, None] * v[:, t, :, None, :]
        )
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", r[:, t], state))
    output = torch.stack(outputs, dim=1) if outputs else v.new_zeros(batch, 0, heads, value_dim)
    return output.to(input_dtype), (state if output_final_state else None)
