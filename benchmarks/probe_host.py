"""Where a training step's host time goes, on one GPU: the step's wall time with Python's garbage
collector on and off, the calls that synchronise with the device (torch's sync debug mode, with the
code that made them), and a host-side profile by operation.

    python benchmarks/probe_host.py --teacher /tmp/t/smollm2.gguf --stage 1 --compile
    python benchmarks/probe_host.py --dry-run          # tiny, on the CPU (no sync check there)

It builds the step as `bench_stages.py` does (the project's Trainer over synthetic batches) and
prints its findings; BENCHMARKS.md quotes them.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import traceback
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_stages  # noqa: E402  (the benchmark next to this file)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m", help="as bench_stages.py's --teacher")
    p.add_argument("--stage", choices=("1", "2"), default="1", help="stage 1, or stage 2 with trainable=all")
    p.add_argument("--compile", action="store_true", help="with train.compile")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (the median is printed)")
    p.add_argument("--dry-run", action="store_true", help="a tiny teacher on the CPU")
    return p.parse_args()


def median_ms(step, steps: int, device: torch.device) -> float:
    _, seconds = bench_stages.timed_steps(step, steps, device)
    return 1e3 * statistics.median(seconds)


def synchronising_calls(step) -> dict[str, int]:
    """The stacks (innermost 12 frames) of the calls in one step that synchronise with the device."""
    seen: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        stack = "".join(traceback.format_stack(limit=14)[:-2])
        seen[stack] = seen.get(stack, 0) + 1

    shown = warnings.showwarning
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
    finally:
        warnings.showwarning = shown
    return seen


def main() -> None:
    args = parse_args()
    # bench_stages' own settings: 8 x 2048 tokens a step (--dry-run: its tiny shapes)
    dry_run = ["--dry-run"] if args.dry_run else []
    bench_args = bench_stages.parse_args(["--teacher", args.teacher, *dry_run])
    world = bench_stages.make_world(bench_args)
    model = "tiny" if args.dry_run else "smollm2"
    teacher, _ = bench_stages.build_teacher(model, bench_args, world)
    variant = "compiled" if args.compile else "eager"  # not replayed from a graph: the host is what it probes
    if args.stage == "1":
        step = bench_stages.build_stage1(teacher, bench_args, world, variant)
    else:
        step = bench_stages.build_stage2(teacher, "all", bench_args, world, variant)
    for _ in range(3):  # compilation, autotuning
        step()
    print(f"step, garbage collector on: {median_ms(step, args.steps, world.device):.1f} ms")
    gc.disable()
    try:
        print(f"step, garbage collector off: {median_ms(step, args.steps, world.device):.1f} ms")
    finally:
        gc.enable()
    if world.cuda:
        calls = synchronising_calls(step)
        print(f"synchronising calls in one step: {sum(calls.values())}")
        for stack, count in sorted(calls.items(), key=lambda item: -item[1]):
            print(f"---- {count} x\n{stack}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if world.cuda else [])
    with profile(activities=activities) as prof:
        step()
        bench_stages.synchronize(world.device)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
