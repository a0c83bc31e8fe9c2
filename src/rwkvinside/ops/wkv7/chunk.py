r"""WKV-7 a chunk of steps at a time, in plain PyTorch: the fast path on the CPU.

The recurrence of `naive.py`, per head, with the state S in R^{K x V}:

    S_t = diag(e^{w_t}) S_{t-1} + b_t u_t^T + k_t v_t^T,   u_t = S_{t-1}^T a_t
    o_t = scale * S_t^T r_t

is a generalised delta rule with a diagonal-plus-low-rank transition (fla's "DPLR"). Split the
sequence into chunks of L steps. Inside one chunk number the steps t = 1..L, let S_0 be the
state entering it, and write the decays as cumulative log decays (vectors over the K channels)

    G_t = w_1 + ... + w_t   (inclusive, G_0 = 0),      so  prod_{s<i<=t} e^{w_i} = e^{G_t - G_s}.

Unrolling the recurrence from S_0 (e^{.} scales the rows, i.e. the key channels):

    S_t = e^{G_t} S_0 + sum_{s<=t} e^{G_t - G_s} (b_s u_s^T + k_s v_s^T)                       (1)

1. The removed vectors. Put (1) at t-1 into u_t = S_{t-1}^T a_t:

       u_t = S_0^T (a_t e^{G_{t-1}}) + sum_{s<t} A^ab_{ts} u_s + sum_{s<t} A^ak_{ts} v_s
       A^ab_{ts} = sum_i a_{ti} e^{G_{t-1,i} - G_{si}} b_{si},  A^ak the same with k for b   (s < t)

   A^ab is strictly lower triangular, so stacking the L steps as rows gives a unit-lower-
   triangular system (a * e^{G_prev} is the [L, K] matrix of rows a_t e^{G_{t-1}})

       (I - A^ab) u = (a * e^{G_prev}) S_0 + A^ak v    ->    u = W S_0 + U,                     (2)
       W = (I - A^ab)^{-1} (a * e^{G_prev}) [L, K],    U = (I - A^ab)^{-1} A^ak v [L, V],

   solved by forward substitution (`solve_triangular`); W and U do not depend on S_0 (fla's
   "WY representation").
2. The outputs. Put (1) at t into o_t:

       o_t = scale [ (r_t e^{G_t})^T S_0 + sum_{s<=t} A^rb_{ts} u_s + A^rk_{ts} v_s ]            (3)

   with A^rb, A^rk defined like A^ab, A^ak but with r_t e^{G_t} in place of a_t e^{G_{t-1}} and
   the diagonal s = t included.
3. The chunk's final state, (1) at t = L:

       S_L = e^{G_L} S_0 + (b * e^{G_L - G})^T u + (k * e^{G_L - G})^T v                        (4)

Only the S_0-terms of (2)-(4) run step after step over chunks, as two [L, K] x [K, V]-sized
products per chunk; everything else is batched over all chunks at once.

Range. Every decay that multiplies a vector directly (e^{G_t}, e^{G_{t-1}}, e^{G_L - G_s}) has an
exponent <= 0. The pairwise decays e^{G_{t-1} - G_s} inside A^ab etc. are factored around a
reference m in the middle of the chunk, (a_t e^{G_{t-1} - G_m}) . (b_s e^{G_m - G_s}), which makes
the matrices plain matrix products. Each factor spans at most L/2 steps of decay, so
e^{(L/2) max|w|} must stay inside float32 (e^88): chunk 16 is exact for any w >= -10, chunk 32 for
w >= -5 and chunk 64 for w >= -2.5; RWKV-7 itself has w >= -e^{-1/2} = -0.61. The products above
the diagonal may overflow to inf; `tril` replaces them with zeros before anything reads them.

Gradients. dL/dw is a sum over the pairs (t, s) that a decay lies between. Autograd through a
cumulative sum instead adds and subtracts, for every pair, terms as large as the pair itself, and
the pairs without decay (s = t - 1 in A^ab, s = t in A^rb) are of order one: with steep decay that
cancellation would swamp the small true dL/dw. So those pairs are computed as plain dot products
without any decay, G_{t-1} and G_L - G_t are sums of their own terms rather than differences, and
the reference (which cancels out of every pair) carries no gradient. dw then agrees with the
float64 reference to about 1e-6 (relative) across the whole range above.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

# Fastest of 16/32/64 for B=4, T=512, H=9, N=64 on 2 CPU cores (benchmarks/bench_wkv7_cpu.py).
CHUNK_SIZE = 32


def wkv7_chunk(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """Chunked WKV-7, the same function as `wkv7_naive`, differentiable by plain autograd.

    Args:
        r, w, k, a, b: [B, T, H, K]; w is the log decay (<= 0, see the module docstring for range).
        v: [B, T, H, V].
        scale: multiplies the outputs (RWKV-7 uses 1.0).
        initial_state: [B, H, K, V] or None (zeros).
        output_final_state: return the state after the last step.
        chunk_size: steps per chunk, L.

    Returns:
        o: [B, T, H, V] in r's dtype, and the final state [B, H, K, V] (float32, or float64 for
        float64 inputs) or None.
    """
    batch, seq_len, heads, key_dim = r.shape
    value_dim = v.shape[-1]
    input_dtype = r.dtype
    compute_dtype = torch.float64 if input_dtype == torch.float64 else torch.float32
    if initial_state is None:
        state = r.new_zeros(batch * heads, key_dim, value_dim, dtype=compute_dtype)
    else:
        state = initial_state.to(compute_dtype).reshape(batch * heads, key_dim, value_dim)
    if seq_len == 0:
        final_state = state.view(batch, heads, key_dim, value_dim) if output_final_state else None
        return r.new_zeros(batch, 0, heads, value_dim), final_state

    chunk_size = min(chunk_size, seq_len)  # a short sequence is one chunk, without padding
    r, w, k, v, a, b = (_to_chunks(x, chunk_size, compute_dtype) for x in (r, w, k, v, a, b))
    r = r * scale
    W, U, A_rb, o_local, r_decayed, b_to_end, kv_state, chunk_decay = _within_chunks(r, w, k, v, a, b)

    # The only sequential part: carry the state from chunk to chunk with (2) and (4).
    states, removed = [], []
    for W_c, U_c, b_c, kv_c, decay_c in zip(W, U, b_to_end, kv_state, chunk_decay):
        states.append(state)
        u = torch.baddbmm(U_c, W_c, state)  # (2): [BH, L, V]
        removed.append(u)
        state = torch.baddbmm(torch.addcmul(kv_c, decay_c, state), b_c.mT, u)  # (4): [BH, K, V]

    # (3) for all chunks at once, now that the state entering each chunk is known.
    o = r_decayed @ torch.stack(states) + A_rb @ torch.stack(removed) + o_local  # [C, BH, L, V]
    num_chunks = o.shape[0]
    o = o.view(num_chunks, batch, heads, chunk_size, value_dim)
    o = o.permute(1, 0, 3, 2, 4).reshape(batch, num_chunks * chunk_size, heads, value_dim)
    final_state = state.view(batch, heads, key_dim, value_dim) if output_final_state else None
    return o[:, :seq_len].to(input_dtype), final_state


def _to_chunks(x: Tensor, chunk_size: int, dtype: torch.dtype) -> Tensor:
    """[B, T, H, N] -> [C, B*H, L, N], zero-padded to C*L steps.

    A zero step is the identity on the state (w = 0 keeps it, k = v = a = b = 0 add nothing), so the
    padding leaves the final state unchanged and only adds outputs that are cut off.
    """
    batch, seq_len, heads, dim = x.shape
    num_chunks = -(-seq_len // chunk_size)
    x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, num_chunks * chunk_size - seq_len))
    x = x.view(batch, num_chunks, chunk_size, heads, dim).permute(1, 0, 3, 2, 4)  # [C, B, H, L, N]
    return x.reshape(num_chunks, batch * heads, chunk_size, dim)


def _within_chunks(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor
) -> tuple[Tensor, ...]:
    """Everything in (2)-(4) that does not depend on the state entering the chunk.

    Inputs [C, BH, L, N] (r already scaled). Returns, batched over chunks:
    W [L, K] and U [L, V] of (2); A^rb [L, L], A^rk v [L, V] and r * e^{G} [L, K] of (3);
    b * e^{G_L - G} [L, K], (k * e^{G_L - G})^T v [K, V] and e^{G_L} [K, 1] of (4).
    """
    chunk_size = w.shape[-2]
    log_decay = w.cumsum(-2)  # G_t: [C, BH, L, K]
    # G_{t-1} and G_L - G_t as sums of their own terms rather than differences of cumulative sums:
    # the gradient of a difference cancels terms of order one and loses the small dL/dw of steep decay.
    log_decay_prev = F.pad(log_decay[..., :-1, :], (0, 0, 1, 0))  # G_{t-1}
    log_decay_to_end = F.pad(w[..., 1:, :].flip(-2).cumsum(-2).flip(-2), (0, 0, 0, 1))  # G_L - G_t
    # The reference only rescales the two factors of each pair, which cancel: it has no gradient.
    reference = log_decay_prev[..., chunk_size // 2, None, :].detach()  # G_m: [C, BH, 1, K]

    # The pairs with decay: factors of e^{G_{t-1} - G_s} and e^{G_t - G_s}, each within e^{(L/2)|w|}.
    # The pairs without decay (s = t - 1 in A^ab, A^ak; s = t in A^rb, A^rk) are plain dot products,
    # for the same reason as above.
    a_in = a * (log_decay_prev - reference).exp()
    r_in = r * (log_decay - reference).exp()
    to_reference = (reference - log_decay).exp()
    b_out, k_out = b * to_reference, k * to_reference
    A_ab = (a_in @ b_out.mT).tril(-2) + _pairs_without_decay(a[..., 1:, :], b[..., :-1, :], offset=-1)
    A_ak = (a_in @ k_out.mT).tril(-2) + _pairs_without_decay(a[..., 1:, :], k[..., :-1, :], offset=-1)
    A_rb = (r_in @ b_out.mT).tril(-1) + _pairs_without_decay(r, b, offset=0)
    A_rk = (r_in @ k_out.mT).tril(-1) + _pairs_without_decay(r, k, offset=0)

    # (2): the diagonal of I - A^ab is implied by unitriangular=True, so pass -A^ab as it is.
    key_dim = a.shape[-1]
    rhs = torch.cat([a * log_decay_prev.exp(), A_ak @ v], dim=-1)  # [L, K + V]
    W, U = torch.linalg.solve_triangular(-A_ab, rhs, upper=False, unitriangular=True).split(
        [key_dim, v.shape[-1]], dim=-1
    )

    to_end = log_decay_to_end.exp()  # e^{G_L - G_s}
    kv_state = (k * to_end).mT @ v  # [K, V]
    chunk_decay = log_decay[..., -1:, :].mT.exp()  # e^{G_L}: [C, BH, K, 1]
    return W, U, A_rb, A_rk @ v, r * log_decay.exp(), b * to_end, kv_state, chunk_decay


def _pairs_without_decay(x: Tensor, y: Tensor, offset: int) -> Tensor:
    """The [L, L] matrix with x_t . y_t on diagonal `offset` and zeros elsewhere. x, y: [.., L', K]."""
    return torch.diag_embed((x * y).sum(-1), offset=offset)
