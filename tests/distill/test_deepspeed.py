"""Two DeepSpeed processes on the CPU (gloo), batch 1 each, give the per-step losses of one plain
process with batch 2: the same global batch, so the same training. All three stages run: stage 2
trains the time mixers beside a frozen LM head, stage 3 every weight, the head (tied to the
embeddings) included."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkvinside import cli
from rwkvinside.distill.metrics import read_log
from rwkvinside.modeling.student_folder import load_student

from .conftest import SEQ_LEN, distill_args

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                   reason="DeepSpeed is not installed")]

STEPS = 4

def with_chat(inputs) -> str:
    return f"data.chat=['{inputs['chat']}']"

# `rwkvinside` under torchrun (or alone). With a step number first, the processes die (os._exit) just before
# that step, as a killed job would, once the checkpoint before it is complete; with a step number
# second, that step's loss is NaN on every process.
RUNNER = """
import dataclasses, os, sys
from rwkvinside import cli
from rwkvinside.distill import loop

crash_before, nan_at = int(sys.argv[1]), int(sys.argv[2])
step = loop.Trainer.step

def nan_loss(stage_step):
    def step_with_nan(*args):
        out = stage_step(*args)
        return dataclasses.replace(out, loss=out.loss * float("nan"))
    return step_with_nan

def patched_step(self, progress):
    if progress.step + 1 == crash_before:
        os._exit(3)
    if progress.step + 1 == nan_at:
        original = self.stage
        self.stage = dataclasses.replace(original, step=nan_loss(original.step))
        try:
            return step(self, progress)
        finally:
            self.stage = original
    return step(self, progress)

loop.Trainer.step = patched_step
sys.exit(cli.main(sys.argv[3:]))
"""


def launch(tmp_path: Path, crash_before: int, args: list[str], nan_at: int = 0,
           processes: int = 2) -> subprocess.CompletedProcess:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER, encoding="utf-8")
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [sys.executable, *(launcher if processes > 1 else []), str(runner), str(crash_before), str(nan_at),
               "-q", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def deepspeed_launcher(args: list[str]) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus 2 --module rwkvinside.cli ...`, as users launch it: the launcher adds
    --local_rank=N before the command."""
    command = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--module", "rwkvinside.cli",
               "-q", *args]
    environment = os.environ | {"OMP_NUM_THREADS": "1"}  # torchrun sets it; this launcher does not
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)


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
    result = launch(tmp_path, 0, distill_args(inputs, output, "--batch-size", "1", "--save-every", "2",
                                                with_chat(inputs), "engine.kind=deepspeed",
                                                f"engine.zero_stage={zero_stage}", steps=STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_steps(per_step(output, 1), per_step(plain, 1), rel=1e-5)
    # stage 2 starts from a stage 1 student that differs from the plain one in the last bits
    assert_same_steps(per_step(output, 2), per_step(plain, 2), rel=1e-4)
    assert_same_steps(per_step(output, 3), per_step(plain, 3), rel=1e-4)
    assert per_step(output, 1)[-1][2] == 2 * (SEQ_LEN - 1) * STEPS  # windows of SEQ_LEN - 1 after the lead
    assert (output / "stage1/checkpoints/step_000004/deepspeed").is_dir()
    report = json.loads((output / "report.json").read_text())
    assert report["stages"]["3"]["step"] == STEPS and report["stages"]["3"]["ended_by"] == "max_steps"
    for number in (1, 2, 3):  # written by the main process alone, with the run's provenance
        provenance = json.loads((output / f"stage{number}/student/rwkvinside.json").read_text())
        assert provenance["format"] == 3 and Path(provenance["run"]) == output.resolve()
        assert [h["stage"] for h in provenance["history"]] == list(range(1, number + 1))


def test_zero0_resumes_after_both_processes_die(tmp_path, inputs, plain):
    """Killed under torchrun, resumed under the `deepspeed` launcher."""
    output = tmp_path / "ds"
    args = distill_args(inputs, output, "--stage", "1", "--batch-size", "1", "--save-every", "2",
                        "engine.kind=deepspeed", "engine.zero_stage=0", steps=STEPS)
    crashed = launch(tmp_path, 4, args)
    assert crashed.returncode != 0
    assert [s for s, _, _ in per_step(output, 1)] == [1, 2, 3]  # step 3 logged, its checkpoint never written
    assert (output / "stage1/checkpoints/step_000002").is_dir()

    resumed = deepspeed_launcher(["distill", "--output", str(output), "--resume"])
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
    crashed = launch(tmp_path, 4, args)
    assert crashed.returncode != 0
    assert (output / "stage1/checkpoints/step_000002/deepspeed").is_dir()

    resumed = launch(tmp_path, 0, ["distill", "--output", str(output), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_steps(per_step(output, 1), per_step(plain, 1), rel=1e-5)
    assert_same_steps(per_step(output, 2), per_step(plain, 2), rel=1e-4)
    assert_same_steps(per_step(output, 3), per_step(plain, 3), rel=1e-4)
    student, _, _ = load_student(output)  # a run folder: its last stage's student, gathered whole from ZeRO-3
    reference, _, _ = load_student(plain / "stage3/student")
    assert student.config.trained_context == SEQ_LEN
    got, expected_weights = student.state_dict(), reference.state_dict()
    assert list(got) == list(expected_weights) and "lm_head.weight" in got
    for name, weight in got.items():
        expected = expected_weights[name]
        assert weight.shape == expected.shape, name
        assert torch.allclose(weight, expected, rtol=1e-3, atol=1e-5), name


def test_a_nan_loss_skips_the_step_on_every_process(tmp_path, inputs):
    """Every process sees the NaN and skips the step: its weights do not move (the next step's loss
    equals the single process's, which skips it too), and the run goes on."""
    results = {}
    for name, processes, batch in (("plain", 1, "2"), ("ds", 2, "1")):
        output = tmp_path / name
        extra = ["engine.kind=deepspeed", "engine.zero_stage=2"] if processes > 1 else []
        args = distill_args(inputs, output, "--stage", "1", "--batch-size", batch, *extra, steps=3)
        result = launch(tmp_path, 0, args, nan_at=2, processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "step 2: loss or gradient not finite" in result.stderr
        results[name] = per_step(output, 1)
    (_, nan_loss, _), = [r for r in results["ds"] if r[0] == 2]
    assert math.isnan(nan_loss)
    assert_same_steps([r for r in results["ds"] if r[0] != 2], [r for r in results["plain"] if r[0] != 2], rel=1e-5)
