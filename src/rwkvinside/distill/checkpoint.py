"""Resumable checkpoints of a stage in progress.

    <stage folder>/checkpoints/step_000120/
        trainable.safetensors + optimizer.pt   (plain engine)  or  deepspeed/ (DeepSpeed engine)
        client_state.pt                         step, tokens, time, data cursor, RNG states

Each checkpoint is written to a `.tmp` folder and renamed into place once complete, so a crash
or a full disk mid-save leaves the previous checkpoints intact; the last `keep_last` are kept.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from rwkvinside.errors import UserError, writing_into

CHECKPOINTS = "checkpoints"
_STEP = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    """torch.save round-trips tuples as tuples, but nested lists may come back; RNG setters want tuples."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def checkpoints(stage_folder: Path) -> list[Path]:
    """Complete checkpoints of a stage, oldest first."""
    root = stage_folder / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_checkpoint(stage_folder: Path, step: int, engine, client_state: dict[str, Any], keep_last: int) -> Path:
    """Write a checkpoint atomically (all ranks call this; rank 0 renames and prunes)."""
    root = stage_folder / CHECKPOINTS
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    with writing_into(tmp, f"the checkpoint {final}",
                      "free disk space and resume with --resume: the previous checkpoints are intact"):
        if engine.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        engine.barrier()
        engine.save(tmp)
        if engine.is_main:
            save_torch({**client_state, "rng": rng_state()}, tmp / "client_state.pt")
        engine.barrier()
        if engine.is_main:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in checkpoints(stage_folder)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        engine.barrier()
    return final


def save_torch(obj: Any, path: Path) -> None:
    """torch.save through a Python file: a failed write (a full disk) then keeps its OSError as the
    context of torch's RuntimeError, which a path given to torch.save loses."""
    with path.open("wb") as handle:
        torch.save(obj, handle)


def load_checkpoint(folder: Path, engine) -> dict[str, Any]:
    """Restore the trained weights, the optimizer and the RNG from `folder`; returns the client state."""
    engine.load(folder)
    try:
        state = torch.load(folder / "client_state.pt", weights_only=True)
    except (OSError, RuntimeError) as error:
        raise UserError(f"checkpoint {folder} is unreadable ({error}); delete it to resume from an earlier one") from None
    set_rng_state(state.pop("rng"))
    return state
