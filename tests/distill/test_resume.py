"""Resume is exact: a run killed with SIGKILL and resumed logs the losses of an uninterrupted run;
a save that fails half-way (full disk) leaves the previous checkpoint intact."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from rwkvinside import cli
from rwkvinside.distill.checkpoint import checkpoints
from rwkvinside.distill.engine import PlainEngine
from rwkvinside.distill.metrics import read_log

from .conftest import distill_args, error_line

STEPS, SAVE_EVERY = 8, 2
STAGE1 = ("--stage", "1", "--save-every", str(SAVE_EVERY))

# The command in a process of its own, on one thread like the tests' reference run, each step held
# back 0.5 s so that the test can kill it between two checkpoints.
SLOW_RUNNER = """
import sys, time
import torch
from rwkvinside import cli
from rwkvinside.distill import loop

torch.set_num_threads(1)
step = loop.Trainer.step
loop.Trainer.step = lambda self, progress: (time.sleep(0.5), step(self, progress))[1]
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, inputs) -> Path:
    output = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(distill_args(inputs, output, *STAGE1, steps=STEPS)) == 0
    return output


def losses(output: Path) -> dict[int, float]:
    records = read_log(output / "stage1/log.jsonl")
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in records}


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def logged_steps(output: Path) -> int:
    path = output / "stage1/log.jsonl"
    return path.read_text(encoding="utf-8").count("\n") if path.is_file() else 0


def test_a_killed_run_resumes_exactly(tmp_path, inputs, uninterrupted):
    output = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", SLOW_RUNNER, *distill_args(inputs, output, *STAGE1,
                                                                                steps=STEPS)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (output / "stage1/checkpoints/step_000004").is_dir() and logged_steps(output) >= 5,
                 process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    restored = int(checkpoints(output / "stage1")[-1].name.split("_")[1])
    before = losses(output)
    assert restored >= 4 and max(before) > restored, "the kill came too late to leave steps to re-run"
    assert not (output / "stage1/student").exists()

    assert cli.main(["distill", "--output", str(output), "--resume"]) == 0
    resumed, reference = losses(output), losses(uninterrupted)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # the steps after the checkpoint were logged again, once
    for step in range(restored + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-9), step
    assert resumed[STEPS] != pytest.approx(resumed[restored + 1], rel=1e-6)  # later steps differ: a real check
    got, expected = load_file(output / "stage1/student/model.safetensors"), \
        load_file(uninterrupted / "stage1/student/model.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7, msg=key)
    summary = json.loads((output / "report.json").read_text())["stages"]["1"]
    reference_summary = json.loads((uninterrupted / "report.json").read_text())["stages"]["1"]
    assert summary["step"] == STEPS and summary["ended_by"] == "max_steps"
    assert summary["tokens"] == reference_summary["tokens"]
    # the resumed student scores the held-out files as the uninterrupted one does
    assert [f["path"] for f in summary["heldout"]] == [f["path"] for f in reference_summary["heldout"]]
    for got_scores, expected_scores in zip(summary["heldout"], reference_summary["heldout"]):
        assert got_scores["tokens"] == expected_scores["tokens"]
        for key in ("student_ppl", "teacher_ppl", "agreement", "kl"):
            assert got_scores[key] == pytest.approx(expected_scores[key], rel=1e-4, abs=1e-6), key


def no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def torch_save_failure():
    """What torch.save into a Python file raises on a full disk: a RuntimeError, the OSError its context."""
    try:
        raise no_space()
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


FAILURES = {
    "oserror": no_space,
    "torch_save": torch_save_failure,
    "safetensors": lambda: SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_full_disk_mid_save_keeps_the_last_checkpoint(tmp_path, inputs, uninterrupted, monkeypatch, capsys,
                                                        failure):
    saves = []
    save = PlainEngine.save

    def fail_on_second_save(self, folder):
        saves.append(folder)
        if len(saves) == 2:  # step 4: part of the files written, then the disk is full
            save(self, folder)
            (folder / "optimizer.pt").write_bytes((folder / "optimizer.pt").read_bytes()[:100])
            if failure == "torch_save":
                torch_save_failure()
            raise FAILURES[failure]()
        save(self, folder)

    monkeypatch.setattr(PlainEngine, "save", fail_on_second_save)
    output = tmp_path / "run"
    assert cli.main(distill_args(inputs, output, *STAGE1, steps=STEPS)) == 2
    line = error_line(capsys)
    assert "No space left on device" in line and "free disk space" in line
    kept = checkpoints(output / "stage1")
    assert [p.name for p in kept] == ["step_000002"]
    assert sorted(p.name for p in (output / "stage1/checkpoints").iterdir()) == ["step_000002"]  # no .tmp left
    assert torch.load(kept[0] / "client_state.pt", weights_only=True)["progress"]["step"] == 2
    load_file(kept[0] / "trainable.safetensors")

    monkeypatch.setattr(PlainEngine, "save", save)
    assert cli.main(["distill", "--output", str(output), "--resume"]) == 0
    resumed, reference = losses(output), losses(uninterrupted)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(3, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-9), step


def test_an_unrelated_error_while_saving_is_not_called_a_full_disk(tmp_path, inputs, monkeypatch):
    def broken(self, folder):
        raise RuntimeError("a bug")

    monkeypatch.setattr(PlainEngine, "save", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(distill_args(inputs, tmp_path / "run", *STAGE1, steps=2))
    assert list((tmp_path / "run/stage1/checkpoints").iterdir()) == []
