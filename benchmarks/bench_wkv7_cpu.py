"""Time WKV-7 on the CPU: the step-by-step reference against the chunked form at several chunk sizes.

    python benchmarks/bench_wkv7_cpu.py                      # B=4, T=512, H=9, N=64, float32
    python benchmarks/bench_wkv7_cpu.py --chunk-sizes 16 32 --repeats 9
    python benchmarks/bench_wkv7_cpu.py --short            # decoding-sized T, no autograd

"forward" is the forward half of a training step (inputs require grad, so autograd records the
graph); "fwd+bwd" adds the backward pass from random upstream gradients for the output and the
final state. Each run gets fresh RWKV-7-shaped inputs; figures are the median (and the minimum)
over --repeats runs after one warm-up run. Prints Markdown tables and the speed-ups over the
reference, with the load average, since on a shared machine other processes move the medians.

--short instead times a few steps without autograd (decoding, short prefill) at B=1 and B=16,
which is where the dispatcher's NAIVE_MAX_LEN comes from.
"""

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from rwkvinside.ops.wkv7 import wkv7_chunk, wkv7_naive
from rwkvinside.ops.wkv7.chunk import CHUNK_SIZE


def rwkv7_inputs(batch: int, seq_len: int, heads: int, head_dim: int, seed: int) -> list[torch.Tensor]:
    """r, w, k, v, a, b [B, T, H, N] and an initial state [B, H, N, N], shaped like RWKV-7's."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, seq_len, heads, head_dim)
    r, k, v, kappa = (torch.randn(shape, generator=gen) for _ in range(4))
    w = -0.6065 * torch.rand(shape, generator=gen)  # RWKV-7's log decay lies in [-e^{-1/2}, 0]
    kappa = kappa / kappa.norm(dim=-1, keepdim=True)
    iclr = torch.rand(shape, generator=gen)
    state = torch.randn(batch, heads, head_dim, head_dim, generator=gen)
    return [r, w, k, v, -kappa, kappa * iclr, state]


def time_ms(
    op: Callable, shape: tuple[int, int, int, int], repeats: int, backward: bool
) -> tuple[float, float]:
    """(median, min) wall time in ms of op(r, w, k, v, a, b, initial_state) over `repeats` runs."""
    batch, seq_len, heads, head_dim = shape
    times = []
    for run in range(repeats + 1):  # run 0 warms up
        inputs = [x.requires_grad_(backward) for x in rwkv7_inputs(*shape, seed=run)]
        grad_o = torch.randn(batch, seq_len, heads, head_dim)
        grad_state = torch.randn(batch, heads, head_dim, head_dim)
        start = time.perf_counter()
        o, state = op(*inputs)
        if backward:
            torch.autograd.backward((o, state), (grad_o, grad_state))
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times[1:]), min(times[1:])


def naive(r, w, k, v, a, b, state):
    return wkv7_naive(r, w, k, v, a, b, scale=1.0, initial_state=state, output_final_state=True)


def chunked(chunk_size: int) -> Callable:
    def op(r, w, k, v, a, b, state):
        return wkv7_chunk(
            r, w, k, v, a, b, scale=1.0, initial_state=state, output_final_state=True, chunk_size=chunk_size
        )

    return op


def conditions(args: argparse.Namespace) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{torch.get_num_threads()} threads, median (min) of {args.repeats} runs, load average {load}"


def training_table(args: argparse.Namespace) -> None:
    """Forward and forward+backward at the training shape, naive against each chunk size."""
    shape = (args.batch, args.seq_len, args.heads, args.head_dim)
    print(f"B={args.batch}, T={args.seq_len}, H={args.heads}, N={args.head_dim}, float32")
    print(f"{conditions(args)}\n")
    paths = {"naive": naive} | {f"chunk {size}": chunked(size) for size in args.chunk_sizes}
    results = {
        name: (time_ms(op, shape, args.repeats, False), time_ms(op, shape, args.repeats, True))
        for name, op in paths.items()
    }
    (naive_fwd, _), (naive_both, _) = results["naive"]
    print("| path | forward (ms) | fwd+bwd (ms) | forward speed-up | fwd+bwd speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, ((fwd, fwd_min), (both, both_min)) in results.items():
        print(
            f"| {name} | {fwd:.1f} ({fwd_min:.1f}) | {both:.1f} ({both_min:.1f}) "
            f"| {naive_fwd / fwd:.1f}x | {naive_both / both:.1f}x |"
        )
    best = min((name for name in results if name != "naive"), key=lambda name: results[name][1][0])
    (best_fwd, _), (best_both, _) = results[best]
    print(
        f"\nFastest chunked path for fwd+bwd: {best}, {naive_fwd / best_fwd:.1f}x the reference forward "
        f"and {naive_both / best_both:.1f}x its forward+backward (medians). Load average after: "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg())
    )


def short_table(args: argparse.Namespace) -> None:
    """Forward without autograd for a few steps: where the step loop stops being the faster one."""
    print(f"H={args.heads}, N={args.head_dim}, float32, no autograd, chunk {CHUNK_SIZE}")
    print(f"{conditions(args)}\n")
    print("| B | T | naive (ms) | chunk (ms) |")
    print("| ---: | ---: | ---: | ---: |")
    with torch.no_grad():
        for batch in (1, 16):
            for seq_len in (1, 2, 4, 8, 16):
                shape = (batch, seq_len, args.heads, args.head_dim)
                naive_ms, naive_min = time_ms(naive, shape, args.repeats, False)
                chunk_ms, chunk_min = time_ms(chunked(CHUNK_SIZE), shape, args.repeats, False)
                print(
                    f"| {batch} | {seq_len} | {naive_ms:.2f} ({naive_min:.2f}) "
                    f"| {chunk_ms:.2f} ({chunk_min:.2f}) |"
                )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    parser.add_argument("--short", action="store_true", help="time decoding-sized T instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.short:
        short_table(args)
    else:
        training_table(args)


if __name__ == "__main__":
    main()
