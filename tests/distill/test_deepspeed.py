"""Two DeepSpeed processes on the CPU (gloo), batch 1 each, give the per-step losses of one plain
process with batch 2: the same global batch, so the same training. All three stages run: stage 2
trains the time mixers beside a frozen LM head, stage 3 every weight, the head (tied to the
embeddings) included."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkvinside import cli
from rwkvinside.distill.metrics import read_log
from rwkvinside.modeling.student import load_student

from .conftest import SEQ_LEN, distill_args

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                   reason="DeepSpeed is not installed")]

STEPS = 4

def with_chat(inputs) -> str:
    return f"data.chat=['{inputs['chat']}']"

# `rwkvinside` under torchrun; with a step number first, both processes die (os._exit) just before
# that step, as a killed job would, once the checkpoint before it is complete.
RUNNER = """
import os, sys
from rwkvinside import cli
from rwkvinside.distill import loop

crash_before = int(sys.argv[1])
step = loop.Trainer.step

def step_or_crash(self, progress):
    if progress.step + 1 == crash_before:
        os._exit(3)
    return step(self, progress)

loop.Trainer.step = step_or_crash
sys.exit(cli.main(sys.argv[2:]))
"""


def torchrun(tmp_path: Path, crash_before: int, args: list[str]) -> subprocess.CompletedProcess:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER, encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(runner), str(crash_before), "-q", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def per_step(output: Path, stage: int) -> list[tuple[int, float, int]]:
    return [(r["step"], r["loss"], r["tokens"]) for r in read_log(output / f"stage{stage}/log.jsonl")]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, inputs) -> Path:
    """The reference: one process, batch 2, stages 1 to 3."""
    output = tmp_path_factory.mktemp("plain") / "run"
    assert cli.main(distill_args(inputs, output, "--batch-size", "2", "--save-every", "2", with_chat(inputs),
                                 steps=STEPS)) == 0
    return output


def assert_same_steps(got, expected, rel):
    assert [s for s, _, _ in got] == [s for s, _, _ in expected]
    assert [t for _, _, t in got] == [t for _, _, t in expected]  # tokens summed over both processes
    for (step, loss, _), (_, reference, _) in zip(got, expected):
        assert loss == pytest.approx(reference, rel=rel), step


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_processes_match_one(tmp_path, inputs, plain, zero_stage):
    """Three stages in one launch: the process group serves them all; checkpoints are written."""
    output = tmp_path / "ds"
    result = torchrun(tmp_path, 0, distill_args(inputs, output, "--batch-size", "1", "--save-every", "2",
                                                with_chat(inputs), "engine.kind=deepspeed",
                                                f"engine.zero_stage={zero_stage}", steps=STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_steps(per_step(output, 1), per_step(plain, 1), rel=1e-5)
    # stage 2 starts from a stage 1 student that differs from the plain one in the last bits
    assert_same_steps(per_step(output, 2), per_step(plain, 2), rel=1e-4)
    assert_same_steps(per_step(output, 3), per_step(plain, 3), rel=1e-4)
    assert per_step(output, 1)[-1][2] == 2 * SEQ_LEN * STEPS
    assert (output / "stage1/checkpoints/step_000004/deepspeed").is_dir()
    report = json.loads((output / "report.json").read_text())
    assert report["stages"]["3"]["step"] == STEPS


def test_zero0_resumes_after_both_processes_die(tmp_path, inputs, plain):
    output = tmp_path / "ds"
    args = distill_args(inputs, output, "--stage", "1", "--batch-size", "1", "--save-every", "2",
                        "engine.kind=deepspeed", "engine.zero_stage=0", steps=STEPS)
    crashed = torchrun(tmp_path, 4, args)
    assert crashed.returncode != 0
    assert [s for s, _, _ in per_step(output, 1)] == [1, 2, 3]  # step 3 logged, its checkpoint never written
    assert (output / "stage1/checkpoints/step_000002").is_dir()

    resumed = torchrun(tmp_path, 0, ["distill", "--output", str(output), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_steps(per_step(output, 1), per_step(plain, 1), rel=1e-5)


def test_zero3_with_offload_resumes_after_both_processes_die(tmp_path, inputs, plain):
    """ZeRO-3 partitions every weight: a stage's student is gathered whole before it is saved (the
    next stage starts from it), the chunked LM-head loss re-gathers the head, frozen in stage 2,
    trained in stage 3, when it recomputes, and the partitioned checkpoint resumes. The optimizer
    steps on the CPU (DeepSpeed's CPU Adam, compiled on the first run on a machine)."""
    output = tmp_path / "ds"
    args = distill_args(inputs, output, "--batch-size", "1", "--save-every", "2", with_chat(inputs),
                        "engine.kind=deepspeed", "engine.zero_stage=3", "engine.offload_optimizer=true",
                        steps=STEPS)
    crashed = torchrun(tmp_path, 4, args)
    assert crashed.returncode != 0
    assert (output / "stage1/checkpoints/step_000002/deepspeed").is_dir()

    resumed = torchrun(tmp_path, 0, ["distill", "--output", str(output), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_steps(per_step(output, 1), per_step(plain, 1), rel=1e-5)
    assert_same_steps(per_step(output, 2), per_step(plain, 2), rel=1e-4)
    assert_same_steps(per_step(output, 3), per_step(plain, 3), rel=1e-4)
    student, _, _ = load_student(output / "stage3/student")
    reference, _, _ = load_student(plain / "stage3/student")
    for (name, weight), expected in zip(student.model.state_dict().items(), reference.model.state_dict().values()):
        assert weight.shape == expected.shape, name
        assert torch.allclose(weight, expected, rtol=1e-3, atol=1e-5), name
