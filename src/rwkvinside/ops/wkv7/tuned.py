"""fla's Triton kernel choices, recorded once on a GPU and shipped, so a fresh machine does not autotune.

On first use each of fla's autotuned kernels times every candidate configuration for its key (block
sizes, warps, stages): on an H200 that cost about 4.5 minutes before stage 1's first step, more than
the first stage of a ten-minute recipe. The choice depends on the kernel, its key (head size, chunk
size, dtypes, ...) and the GPU, not on the weights, so it can be recorded on one machine and reused
on another of the same architecture.

A record file (`tuned/sm<major><minor>.json`) holds, per kernel (named by module and function), the
autotune keys it met and the configuration chosen for each. `seed_autotuners` writes those choices
into the kernels' in-memory autotune caches, where Triton looks before it benchmarks; a key that is
not recorded still autotunes as before. An entry is used only where the configuration is one of the
kernel's own candidates and the record was made with the installed fla version, so a record from
another fla release is ignored rather than trusted.

    python benchmarks/bench_stages.py --record-fla-configs src/rwkvinside/ops/wkv7/tuned/sm90.json

records what a benchmark run met (merged into the file if it exists).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from rwkvinside.files import write_atomically

TUNED_DIR = Path(__file__).parent / "tuned"
RECORD_FORMAT = 1


class Autotuner(Protocol):
    """What this module reads of `triton.runtime.autotuner.Autotuner`."""

    configs: list[Any]
    cache: dict[tuple, Any]
    base_fn: Any


def kernel_name(autotuner: Autotuner) -> str:
    return f"{autotuner.base_fn.__module__}.{autotuner.base_fn.__qualname__}"


def describe_config(config: Any) -> dict[str, Any]:
    """A Triton config as plain JSON data: its meta-parameters and launch options."""
    return {
        "kwargs": dict(config.kwargs),
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
        "num_ctas": config.num_ctas,
        "maxnreg": config.maxnreg,
    }


def record(autotuners: Iterable[Autotuner], *, fla_version: str, device: str, arch: str) -> dict[str, Any]:
    """The choices the given autotuners have made so far, as a record file's content."""
    kernels: dict[str, list] = {}
    for autotuner in autotuners:
        entries = [[list(key), describe_config(config)] for key, config in autotuner.cache.items()]
        if entries:
            kernels[kernel_name(autotuner)] = sorted(entries, key=json.dumps)
    return {"format": RECORD_FORMAT, "fla": fla_version, "arch": arch, "device": device, "kernels": kernels}


def merge_records(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new` with the entries of `old` (same fla version) that it does not cover kept."""
    if old.get("fla") != new["fla"] or old.get("arch") != new["arch"]:
        return new
    kernels = {name: {json.dumps(key): [key, config] for key, config in entries}
               for name, entries in old.get("kernels", {}).items()}
    for name, entries in new["kernels"].items():
        kernels.setdefault(name, {}).update({json.dumps(key): [key, config] for key, config in entries})
    merged = {name: sorted(by_key.values(), key=json.dumps) for name, by_key in kernels.items()}
    return {**new, "kernels": merged}


def seed(autotuners: Iterable[Autotuner], record_data: dict[str, Any], *, fla_version: str) -> int:
    """Put the record's choices into the autotuners' caches; returns how many entries were used.

    Nothing is used from a record of another fla version or format. An entry whose configuration is
    not among the kernel's candidates (fla changed them) is skipped; a key already tuned in this
    process is left as it is.
    """
    if record_data.get("format") != RECORD_FORMAT or record_data.get("fla") != fla_version:
        return 0
    recorded = record_data.get("kernels", {})
    used = 0
    for autotuner in autotuners:
        for key, wanted in recorded.get(kernel_name(autotuner), []):
            config = next((c for c in autotuner.configs if describe_config(c) == wanted), None)
            key = tuple(key)
            if config is not None and key not in autotuner.cache:
                autotuner.cache[key] = config
                used += 1
    return used


def fla_autotuners() -> Iterator[Autotuner]:
    """Every autotuned kernel of the fla modules loaded so far (each once)."""
    from triton.runtime.autotuner import Autotuner as TritonAutotuner

    seen: set[int] = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("fla.") or module is None:
            continue
        for value in list(vars(module).values()):
            # @triton.heuristics wraps the autotuner; the autotuner wraps the jitted function.
            while value is not None and not isinstance(value, TritonAutotuner) and hasattr(value, "fn"):
                value = value.fn
            if isinstance(value, TritonAutotuner) and id(value) not in seen:
                seen.add(id(value))
                yield value


def record_path(arch: str) -> Path:
    return TUNED_DIR / f"{arch}.json"


def cuda_arch() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


@functools.cache
def seed_fla_kernels() -> int:
    """Seed fla's RWKV-7 kernels from the record for this GPU, if one ships; returns entries used.

    Runs once a process (the fla adapters call it before every launch); the seeded choices live in
    fla's own autotune caches, which are per process anyway.
    """
    import fla
    import fla.ops.rwkv7  # noqa: F401  (loads every kernel module the RWKV-7 ops use)

    path = record_path(cuda_arch())
    if not path.is_file():
        return 0
    return seed(fla_autotuners(), json.loads(path.read_text()), fla_version=fla.__version__)


def write_record(path: Path) -> dict[str, Any]:
    """Record the choices of every fla kernel tuned in this process into `path` (merged)."""
    import fla
    import torch

    new = record(fla_autotuners(), fla_version=fla.__version__,
                 device=torch.cuda.get_device_name(), arch=cuda_arch())
    old = json.loads(path.read_text()) if path.is_file() else {}
    merged = merge_records(old, new)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(merged, indent=1, sort_keys=True) + "\n"
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return merged
