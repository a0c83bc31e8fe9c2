"""What a person sees during training: a progress bar, a JSONL log and TensorBoard scalars.

Only the main process writes; the others get a RunLog that does nothing.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from rwkvinside.files import write_atomically

logger = logging.getLogger(__name__)


class RunLog:
    """One record per optimizer step to `log.jsonl` (and TensorBoard), and a progress bar.

    `initial_step` is the step training (re)starts from: records of later steps, written before an
    interruption by steps that the restored checkpoint does not hold, are dropped, so the log holds
    each step once, as the resumed run computed it.
    """

    def __init__(self, folder: Path | None, tag: str, total: int | None, progress: bool, tensorboard: bool,
                 initial_step: int = 0):
        self.folder = folder
        self.tag = tag
        self.file = None
        self.writer = None
        self.bar = None
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        truncate_log(folder / "log.jsonl", initial_step)
        self.file = (folder / "log.jsonl").open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=initial_step + 1)
            except ImportError:
                logger.warning("tensorboard is not installed; scalars go to log.jsonl only")
        if progress and logger.isEnabledFor(logging.INFO):  # -q: no bar
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial_step, desc=tag, unit="step", dynamic_ncols=True)

    def waiting(self, what: str) -> None:
        """Say what the run waits for before its next record (the bar's description, and a log line)."""
        logger.info("%s: %s", self.tag, what)
        if self.bar is not None:
            self.bar.set_postfix_str(what)

    def write(self, record: dict[str, Any], remaining_s: float | None) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"stage": self.tag, **record}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.writer.add_scalar(f"{self.tag}/{key}", value, record["step"])
        if self.bar is not None:
            shown = {"loss": f"{record['loss']:.4g}", "lr": f"{record['lr']:.2e}",
                     "tok/s": f"{record['tokens_per_s']:.0f}"}
            if remaining_s is not None:
                shown["left"] = format_seconds(remaining_s)
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(record["step"] - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the records of steps up to `last_step` (an interrupted line is dropped too)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            pass
    write_atomically(path, lambda temporary: temporary.write_text("".join(kept), encoding="utf-8"))


def read_log(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


SPIKE_WINDOW = 50  # steps of running median a gradient norm is compared with
SPIKE_FACTOR = 10.0  # a spike: a norm above this many times that median
SPIKE_HISTORY = 10  # steps a norm needs before it to be judged


def gradient_spikes(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The steps whose gradient norm (before clipping) exceeds SPIKE_FACTOR times the median of the
    SPIKE_WINDOW steps before it: a sign of instability that clipping hides. Steps with fewer than
    SPIKE_HISTORY before them are not judged; a non-finite norm (a skipped step) is not counted here."""
    norms = [(r["step"], r["grad_norm"]) for r in records
             if isinstance(r.get("grad_norm"), (int, float)) and math.isfinite(r["grad_norm"])]
    spikes = []
    for i, (step, norm) in enumerate(norms):
        window = sorted(n for _, n in norms[max(0, i - SPIKE_WINDOW):i])
        if len(window) >= SPIKE_HISTORY:
            median = window[len(window) // 2]
            if norm > SPIKE_FACTOR * median:
                spikes.append({"step": step, "grad_norm": norm, "median": median})
    worst = max(spikes, key=lambda spike: spike["grad_norm"] / spike["median"], default=None)
    return {"steps_judged": max(0, len(norms) - SPIKE_HISTORY), "count": len(spikes), "worst": worst}


def plot_alignment(records: list[dict[str, Any]], path: Path) -> None:
    """After stage 1: each layer's alignment loss at the start and the end of the stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(k for k in records[-1] if k.startswith("align/layer_"))
    if not keys:
        return
    layers = [int(k.rsplit("_", 1)[1]) for k in keys]
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.semilogy(layers, [records[0][k] for k in keys], "o--", label=f"step {records[0]['step']}")
    axis.semilogy(layers, [records[-1][k] for k in keys], "o-", label=f"step {records[-1]['step']}")
    axis.set_xlabel("layer")
    axis.set_ylabel("alignment loss (MSE)")
    axis.set_title("Stage 1: student vs teacher attention output, per layer")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
