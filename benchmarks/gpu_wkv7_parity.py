"""WKV-7 on a GPU: flash-linear-attention through rwkvinside's adapters against the float64 reference.

    pip install -e '.[cuda]'                            # torch with CUDA, fla 0.6.0, triton
    python benchmarks/gpu_wkv7_parity.py                # writes to --out, else $OUT, else ./gpu_out
    python benchmarks/gpu_wkv7_parity.py --dry-run      # tiny sizes on the CPU, wkv7_chunk standing in

1. Parity. RWKV-7-shaped random inputs (a = -kappa, kappa unit-norm; b = kappa * iclr; w in
   [-0.6065, 0]) with an initial state, B = 2, N = 64, float32 and bf16, T = 100, 300, 2048 at
   H = 9 (then H = 32 while the time budget lasts). Each path against `wkv7_naive` run in float64
   on the GPU on the same (rounded) inputs: ||x - ref|| / ||ref|| for the output, the final state
   and, for the differentiable paths, the gradients of r, w, k, v, a, b and the initial state
   from random upstream gradients. Paths: fla `chunk_rwkv7` with its default options and with the
   options fla's RWKV-7 layer passes (safe_gate, lower_bound, chunk_size), `fused_recurrent_rwkv7`
   (forward only: fla has no backward for it), and rwkvinside's chunked PyTorch form.
2. Speed at B = 8, T = 2048, H = 9, N = 64, bf16: forward and forward+backward of each path
   (CUDA events, warm-up, median).
3. One decoding step (T = 1, no autograd) at B = 1 and B = 16: fused_recurrent, the chunk kernel,
   and the `wkv7` dispatcher.

Writes results.json and results.md to the output folder and prints the Markdown last.
Meant to take under 4 minutes on one H100 (most of it Triton compiling and autotuning).
"""

import argparse
import datetime
import inspect
import json
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from rwkvinside.ops.wkv7 import wkv7, wkv7_chunk, wkv7_naive
from rwkvinside.ops.wkv7.fla import RWKV7_CHUNK_OPTIONS, wkv7_fla_chunk, wkv7_fla_fused_recurrent

GRAD_NAMES = ("dr", "dw", "dk", "dv", "da", "db", "dS0")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Impl:
    """One implementation of wkv7(r, w, k, v, a, b, scale, initial_state, output_final_state)."""

    name: str
    op: Callable
    differentiable: bool


@dataclass
class Sizes:
    batch: int
    seq_lens: tuple[int, ...]
    heads: tuple[int, ...]
    head_dim: int
    timing: tuple[int, int, int, int]  # B, T, H, N
    decode_batches: tuple[int, ...]
    repeats: int


GPU_SIZES = Sizes(2, (100, 300, 2048), (9, 32), 64, (8, 2048, 9, 64), (1, 16), repeats=10)
DRY_RUN_SIZES = Sizes(2, (5, 37), (2, 3), 16, (2, 64, 2, 16), (1, 4), repeats=3)


PATHS = ("chunk", "chunk-rwkv7-options", "fused-recurrent", "torch-chunk")


def implementations(dry_run: bool, paths: tuple[str, ...] = PATHS) -> list[Impl]:
    """The implementations to check (keys of PATHS); in a dry run wkv7_chunk stands in for fla."""
    if dry_run:
        found = {
            "chunk": Impl("fla chunk (defaults) [stand-in]", wkv7_chunk, True),
            "chunk-rwkv7-options": Impl("fla chunk (RWKV-7 options) [stand-in]", wkv7_chunk, True),
            "fused-recurrent": Impl("fla fused_recurrent [stand-in]", wkv7_chunk, False),
        }
    else:
        from fla.ops.rwkv7 import chunk_rwkv7

        found = {"chunk": Impl("fla chunk (defaults)", wkv7_fla_chunk, True)}
        if {"safe_gate", "lower_bound", "chunk_size"} <= set(inspect.signature(chunk_rwkv7).parameters):
            found["chunk-rwkv7-options"] = Impl("fla chunk (RWKV-7 options)",
                                                partial(wkv7_fla_chunk, **RWKV7_CHUNK_OPTIONS), True)
        found["fused-recurrent"] = Impl("fla fused_recurrent", wkv7_fla_fused_recurrent, False)
    found["torch-chunk"] = Impl("torch chunk", wkv7_chunk, True)
    return [found[path] for path in paths if path in found]


def rwkv7_inputs(batch: int, seq_len: int, heads: int, head_dim: int, dtype, device, seed: int = 0) -> list:
    """r, w, k, v, a, b [B, T, H, N] and an initial state [B, H, N, N] (float32), RWKV-7-shaped."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, seq_len, heads, head_dim)
    r, k, v, kappa = (torch.randn(shape, generator=gen) for _ in range(4))
    w = -0.6065 * torch.rand(shape, generator=gen)
    kappa = kappa / kappa.norm(dim=-1, keepdim=True)
    iclr = torch.rand(shape, generator=gen)
    state = torch.randn(batch, heads, head_dim, head_dim, generator=gen)
    inputs = [x.to(device=device, dtype=dtype) for x in (r, w, k, v, -kappa, kappa * iclr)]
    return inputs + [state.to(device)]


def run(op: Callable, inputs: list, grads: tuple | None) -> list:
    """[o, final_state] and, when grads (upstream for o and the state) are given, the input gradients."""
    leaves = [x.detach().clone().requires_grad_(grads is not None) for x in inputs]
    o, state = op(*leaves[:6], scale=1.0, initial_state=leaves[6], output_final_state=True)
    if grads is None:
        return [o, state]
    return [o, state, *torch.autograd.grad((o, state), leaves, grads)]


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def parity(
    impls: list[Impl], sizes: Sizes, device: str, deadline: float, save: Callable[[list, list], None]
) -> tuple[list[dict], list[str]]:
    """The parity rows and the cases skipped for time; save(rows, skipped) runs after each case."""
    rows, skipped = [], []
    for heads in sizes.heads:
        for seq_len in sizes.seq_lens:
            for dtype_name, dtype in DTYPES.items():
                case = f"{dtype_name} T={seq_len} H={heads}"
                if time.monotonic() > deadline:
                    skipped.append(case)
                    continue
                inputs = rwkv7_inputs(sizes.batch, seq_len, heads, sizes.head_dim, dtype, device)
                gen = torch.Generator().manual_seed(1)
                grad_o = torch.randn(inputs[3].shape, generator=gen).to(device=device, dtype=dtype)
                grad_state = torch.randn(inputs[6].shape, generator=gen).to(device)  # float32, as the state
                ref = run(wkv7_naive, [x.double() for x in inputs], (grad_o.double(), grad_state.double()))
                for impl in impls:
                    grads = (grad_o, grad_state) if impl.differentiable else None
                    with torch.set_grad_enabled(impl.differentiable):
                        results = run(impl.op, inputs, grads)
                    names = ("o", "S_T") + (GRAD_NAMES if impl.differentiable else ())
                    errors = {name: relative_error(x, y) for name, x, y in zip(names, results, ref)}
                    rows.append(dict(path=impl.name, dtype=dtype_name, T=seq_len, H=heads, errors=errors))
                    print(f"parity {case} {impl.name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()),
                          flush=True)
                save(rows, skipped)  # a call cut short keeps the cases it finished
    return rows, skipped


def timer(device: str) -> Callable[[Callable, int], float]:
    """time_ms(fn, repeats): median ms of fn() after 3 warm-up calls (CUDA events on a GPU)."""

    def time_ms(fn: Callable, repeats: int) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start_s = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - start_s))
        return statistics.median(times)

    return time_ms


def speed(impls: list[Impl], sizes: Sizes, device: str) -> list[dict]:
    time_ms = timer(device)
    batch, seq_len, heads, head_dim = sizes.timing
    inputs = rwkv7_inputs(batch, seq_len, heads, head_dim, torch.bfloat16, device)
    leaves = [x.requires_grad_() for x in inputs]
    grads = (torch.randn_like(inputs[3]), torch.randn_like(inputs[6]))

    def forward(op: Callable) -> tuple:
        return op(*leaves[:6], scale=1.0, initial_state=leaves[6], output_final_state=True)

    rows = []
    for impl in impls:
        with torch.set_grad_enabled(impl.differentiable):
            forward_ms = time_ms(lambda: forward(impl.op), sizes.repeats)
        both_ms = None
        if impl.differentiable:
            both_ms = time_ms(lambda: torch.autograd.grad(forward(impl.op), leaves, grads), sizes.repeats)
        rows.append(dict(path=impl.name, B=batch, T=seq_len, H=heads, N=head_dim, dtype="bf16",
                         forward_ms=forward_ms, fwd_bwd_ms=both_ms))
        print(f"speed {impl.name}: forward {forward_ms:.2f} ms, fwd+bwd {both_ms} ms", flush=True)
    return rows


def decoding(impls: list[Impl], sizes: Sizes, device: str) -> list[dict]:
    """One step without autograd, per call; each timed call runs 20 steps to amortise the events."""
    time_ms = timer(device)
    _, _, heads, head_dim = sizes.timing
    steppers = {"wkv7 (dispatcher)": wkv7} | {
        impl.name: impl.op for impl in impls if impl.name.startswith("fla") and "RWKV-7" not in impl.name
    }
    rows = []
    with torch.no_grad():
        for batch in sizes.decode_batches:
            inputs = rwkv7_inputs(batch, 1, heads, head_dim, torch.bfloat16, device)

            def twenty_steps(op: Callable) -> None:
                state = inputs[6]
                for _ in range(20):
                    _, state = op(*inputs[:6], scale=1.0, initial_state=state, output_final_state=True)

            for name, op in steppers.items():
                step_us = 1e3 * time_ms(partial(twenty_steps, op), sizes.repeats) / 20
                rows.append(dict(path=name, B=batch, H=heads, N=head_dim, dtype="bf16", step_us=step_us))
    return rows


def environment(device: str, dry_run: bool) -> dict:
    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        dry_run=dry_run,
        torch=torch.__version__,
        python=platform.python_version(),
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
    )
    try:
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = None
    if not dry_run:
        import fla
        import triton

        env |= dict(fla=fla.__version__, triton=triton.__version__, cuda=torch.version.cuda)
    return env


def markdown(results: dict) -> str:
    def number(x: float | None, digits: str = ".1e") -> str:
        return "—" if x is None else format(x, digits)

    env = results["environment"]
    lines = ["## WKV-7 on the GPU: fla against the float64 reference", ""]
    lines += [", ".join(f"{key}: {value}" for key, value in env.items()), ""]
    lines += ["### Parity: ||x - ref|| / ||ref||", ""]
    columns = ("o", "S_T") + GRAD_NAMES
    lines += ["| path | dtype | T | H | " + " | ".join(columns) + " |"]
    lines += ["| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    for row in results["parity"]:
        cells = " | ".join(number(row["errors"].get(name)) for name in columns)
        lines.append(f"| {row['path']} | {row['dtype']} | {row['T']} | {row['H']} | {cells} |")
    if results["skipped"]:
        lines += ["", "Skipped for the time budget: " + "; ".join(results["skipped"])]
    timing = results["speed"][0]
    lines += ["", f"### Speed: B={timing['B']}, T={timing['T']}, H={timing['H']}, N={timing['N']}, bf16", ""]
    lines += ["| path | forward (ms) | fwd+bwd (ms) |", "| --- | ---: | ---: |"]
    for row in results["speed"]:
        lines.append(f"| {row['path']} | {row['forward_ms']:.2f} | {number(row['fwd_bwd_ms'], '.2f')} |")
    lines += ["", "### One decoding step (T = 1, no autograd, bf16)", ""]
    lines += ["| path | B | step (µs) |", "| --- | ---: | ---: |"]
    for row in results["decoding"]:
        lines.append(f"| {row['path']} | {row['B']} | {row['step_us']:.1f} |")
    lines += ["", f"Total time: {results['seconds']:.0f} s"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_out")))
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, wkv7_chunk for fla")
    parser.add_argument(
        "--paths", default=",".join(PATHS),
        help="comma-separated, of " + ", ".join(PATHS) + " (fla autotunes each chunk variant for minutes)",
    )
    parser.add_argument(
        "--parity-budget-s", type=float, default=120.0,
        help="parity cases starting later than this are skipped (H = 32 comes last)",
    )
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device; use --dry-run to check the script on the CPU")

    started = time.monotonic()
    device = "cpu" if args.dry_run else "cuda"
    sizes = DRY_RUN_SIZES if args.dry_run else GPU_SIZES
    # fla's chunk kernel warns on every float32 call that float32 is unsupported "on some
    # platforms"; the parity table is what says how well it does here.
    warnings.filterwarnings("ignore", message="ChunkDeltaRuleFunction does not support float32")
    paths = tuple(args.paths.split(","))
    if unknown := set(paths) - set(PATHS):
        parser.error(f"unknown --paths {sorted(unknown)}; choose from {', '.join(PATHS)}")
    impls = implementations(args.dry_run, paths)
    args.out.mkdir(parents=True, exist_ok=True)
    results = dict(environment=environment(device, args.dry_run))

    def save(rows: list, skipped: list) -> None:
        (args.out / "results.json").write_text(json.dumps(results | dict(parity=rows, skipped=skipped), indent=2))

    rows, skipped = parity(impls, sizes, device, started + args.parity_budget_s, save)
    results |= dict(parity=rows, skipped=skipped)
    results |= dict(speed=speed(impls, sizes, device), decoding=decoding(impls, sizes, device))
    results["seconds"] = time.monotonic() - started
    save(rows, skipped)
    table = markdown(results)
    (args.out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
