"""`rwkvinside distill` end to end on a tiny Llama teacher: run folder, logs, stages, errors."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rwkvinside import cli
from rwkvinside.config import load_config
from rwkvinside.distill.metrics import read_log
from rwkvinside.distill.pipeline import loader_for
from rwkvinside.distill.stages import STAGES

from .conftest import BATCH, SEQ_LEN, STEPS, TEACHER_LAYERS, distill_args, error_line

@pytest.fixture(scope="module")
def run12(tmp_path_factory, inputs) -> Path:
    """One uninterrupted run of stages 1 and 2 (the default plan without chat data)."""
    output = tmp_path_factory.mktemp("runs") / "run12"
    assert cli.main(distill_args(inputs, output)) == 0
    return output


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# ---- the run folder -------------------------------------------------------------------------------

def test_the_run_folder_holds_config_plan_logs_students_and_report(run12, inputs):
    for name in ("config.yaml", "run.json", "report.json", "report.md", "stage1/log.jsonl", "stage1/alignment.png",
                 "stage1/student/model.safetensors", "stage1/student/tokenizer.json",
                 "stage2/log.jsonl", "stage2/student/model.safetensors"):
        assert (run12 / name).is_file(), name
    assert json.loads((run12 / "run.json").read_text()) == {"stages": [1, 2], "init_from": None}
    config = load_config(run12 / "config.yaml")
    assert config.teacher.source == str(inputs["teacher"])
    assert config.data.train == [str(inputs["corpus"])]
    assert (config.data.seq_len, config.train.batch_size, config.stage2.max_steps) == (SEQ_LEN, BATCH, STEPS)
    assert config.stage1.warmup_steps == 1 and config.stage1.max_tokens == 0


@pytest.mark.parametrize("number, terms", [
    (1, [f"align/layer_{i:02d}" for i in range(TEACHER_LAYERS)]),
    (2, ["kl", "student_ce", "teacher_ce"]),
])
def test_one_log_record_per_optimizer_step(run12, number, terms):
    records = read_log(run12 / f"stage{number}/log.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in records] == [BATCH * SEQ_LEN * (i + 1) for i in range(STEPS)]
    for record in records:
        for key in ["loss", "lr", "tokens", *terms]:
            assert math.isfinite(record[key]), (key, record)
    if number == 2:
        record = records[0]
        assert record["loss"] == pytest.approx(record["kl"])  # kl_weight 1, ce_weight 0
        assert record["student_ce"] > 0 and record["teacher_ce"] > 0


def test_the_report(run12):
    report = json.loads((run12 / "report.json").read_text())
    assert set(report["stages"]) == {"1", "2"}
    for stage in report["stages"].values():
        assert stage["step"] == STEPS and stage["tokens"] == STEPS * BATCH * SEQ_LEN
        assert math.isfinite(stage["student_ppl"]) and math.isfinite(stage["final"]["loss"])
    assert set(report["stages"]["1"]["final_alignment_by_layer"]) == {"align/layer_00", "align/layer_01"}
    assert report["baseline"]["teacher_ppl"] > 1
    markdown = (run12 / "report.md").read_text()
    assert "| 1 (attention alignment) | 3 | 192 |" in markdown
    assert "| 2 (knowledge distillation) | 3 | 192 |" in markdown


def split(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(time-mixer / attention weights, everything else)"""
    mixers = {k: v for k, v in state.items() if ".self_attn." in k}
    return mixers, {k: v for k, v in state.items() if k not in mixers}


@pytest.mark.parametrize("number", [1, 2])
def test_stages_1_and_2_train_only_the_time_mixers(run12, inputs, number):
    _, teacher_rest = split(weights(inputs["teacher"]))
    mixers, rest = split(weights(run12 / f"stage{number}/student"))
    assert len([k for k in teacher_rest if ".mlp." in k]) == 3 * TEACHER_LAYERS
    assert "model.embed_tokens.weight" in teacher_rest
    for key, value in teacher_rest.items():
        assert torch.equal(rest[key], value), key
    assert {k for k in mixers if ".mixer." in k} == set(mixers)
    if number == 2:
        before, _ = split(weights(run12 / "stage1/student"))
        assert any(not torch.equal(before[k], mixers[k]) for k in mixers)  # stage 2 trained them further


# ---- stage plans ----------------------------------------------------------------------------------

def test_eval_tokens_0_skips_every_perplexity(tmp_path, inputs):
    output = tmp_path / "run"
    assert cli.main(distill_args(inputs, output, "--stage", "1", "data.eval_tokens=0", steps=1)) == 0
    report = json.loads((output / "report.json").read_text())
    assert "baseline" not in report and "student_ppl" not in report["stages"]["1"]


def test_stage_2_needs_init_from(tmp_path, inputs, capsys):
    assert cli.main(distill_args(inputs, tmp_path / "out", "--stage", "2")) == 2
    assert "give --init-from" in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_stage_2_from_a_stage_1_student(tmp_path, inputs, run12):
    output = tmp_path / "stage2"
    assert cli.main(distill_args(inputs, output, "--stage", "2", "--init-from", str(run12 / "stage1/student"))) == 0
    assert json.loads((output / "run.json").read_text())["stages"] == [2]
    assert not (output / "stage1").exists()
    records = read_log(output / "stage2/log.jsonl")
    assert len(records) == STEPS and all(math.isfinite(r["kl"]) for r in records)
    history = json.loads((output / "stage2/student/rwkvinside.json").read_text())["history"]
    assert [h["stage"] for h in history] == [1, 2]


def test_stage_3_trains_on_assistant_tokens(tmp_path, inputs, run12, tokenizer):
    output = tmp_path / "sft"
    args = distill_args(inputs, output, "--stage", "3", "--init-from", str(run12 / "stage1/student"),
                        f"data.chat=['{inputs['chat']}']")
    assert cli.main(args) == 0
    records = read_log(output / "stage3/log.jsonl")
    assert len(records) == STEPS and all(math.isfinite(r["student_ce"]) for r in records)
    config = load_config(output / "config.yaml")
    loader = loader_for(STAGES[3], config, tokenizer, rank=0, world_size=1)
    targets = [int((next(loader)["labels"] != -100).sum()) for _ in range(STEPS)]
    assert [r["tokens_in_step"] for r in records] == targets  # assistant tokens only, never padding
    assert all(0 < t < BATCH * SEQ_LEN for t in targets)
    _, before = split(weights(run12 / "stage1/student"))
    _, after = split(weights(output / "stage3/student"))
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])  # all trained


def test_stage_3_without_chat_data_is_an_error(tmp_path, inputs, run12, capsys):
    assert cli.main(distill_args(inputs, tmp_path / "out", "--stage", "3", "--init-from",
                                 str(run12 / "stage1/student"))) == 2
    assert "has no training data" in error_line(capsys)


# ---- the output folder ----------------------------------------------------------------------------

def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path, inputs, run12, capsys):
    output = tmp_path / "copy"
    shutil.copytree(run12, output)
    report = (output / "report.json").read_text()
    assert cli.main(distill_args(inputs, output)) == 2
    assert "already holds files" in error_line(capsys)
    assert cli.main(distill_args(inputs, output, "--overwrite", "train.batchsize=1")) == 2
    assert "did you mean 'train.batch_size'" in error_line(capsys)
    assert (output / "report.json").read_text() == report  # a bad command line deletes nothing

    assert cli.main(["distill", "--output", str(output), "--resume"]) == 0  # all stages finished
    assert json.loads((output / "report.json").read_text())["stages"] == json.loads(report)["stages"]

    assert cli.main(distill_args(inputs, output, "--overwrite", "--stage", "1", steps=1)) == 0
    assert not (output / "stage2").exists()
    assert len(read_log(output / "stage1/log.jsonl")) == 1


def test_without_output_a_new_folder_under_runs(tmp_path, inputs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(distill_args(inputs, None, "--stage", "1", steps=1)) == 0
    (folder,) = (tmp_path / "runs").iterdir()
    assert (folder / "stage1/student").is_dir() and (folder / "report.json").is_file()


def test_resume_needs_a_run(tmp_path, capsys):
    assert cli.main(["distill", "--resume", "--output", str(tmp_path)]) == 2
    assert "holds no run to continue" in error_line(capsys)


# ---- bad inputs: one line, no traceback -------------------------------------------------------------

def bad_data(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.txt"
    if kind == "empty":
        path.write_text("", encoding="utf-8")
    elif kind == "latin1":
        path.write_bytes("Caf\u00e9 au lait, cr\u00e8me br\u00fbl\u00e9e. ".encode("latin-1") * 40)
    elif kind == "small":
        path.write_text("Too short.", encoding="utf-8")
    return path


@pytest.mark.parametrize("case, message", [
    ("missing_teacher", "teacher path .* does not exist"),
    ("missing_data", "data path .* does not exist"),
    ("empty", "holds no documents"),
    ("latin1", "not valid UTF-8"),
    ("small", "one training sequence of --seq-len 32 needs 33"),
    ("unknown_key", "unknown config key 'stage1.learning_rate'"),
    ("bad_stage", "--stage must be 1, 2, 3 or all"),
    ("missing_deepspeed_json", "DeepSpeed config .* does not exist"),
    ("bad_deepspeed_json", "DeepSpeed config .* is not valid JSON"),
])
def test_bad_inputs_are_one_error_line(tmp_path, inputs, capsys, case, message):
    changed = dict(inputs)
    extra = []
    if case == "missing_teacher":
        changed["teacher"] = tmp_path / "no_teacher"
    elif case == "missing_data":
        changed["corpus"] = tmp_path / "no_corpus.txt"
    elif case == "unknown_key":
        extra = ["stage1.learning_rate=1e-3"]
    elif case == "bad_stage":
        extra = ["--stage", "5"]
    elif case.endswith("deepspeed_json"):
        path = tmp_path / "ds.json"
        if case.startswith("bad"):
            path.write_text('{"zero_optimization": {"stage": 3,}}', encoding="utf-8")
        extra = ["engine.kind=deepspeed", f"engine.deepspeed_config={path}"]
    else:
        changed["corpus"] = bad_data(tmp_path, case)
    assert cli.main(distill_args(changed, tmp_path / "out", *extra)) == 2
    line = error_line(capsys)
    assert re.search(message, line), line


@pytest.mark.parametrize("case", ["missing_teacher", "unknown_key"])
def test_the_command_prints_one_line_and_exits_2(tmp_path, inputs, case):
    changed = dict(inputs, teacher=tmp_path / "no_teacher") if case == "missing_teacher" else inputs
    extra = ["trian.seed=1"] if case == "unknown_key" else []
    result = subprocess.run([sys.executable, "-m", "rwkvinside.cli", *distill_args(changed, tmp_path / "out", *extra)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rwkvinside: error: "), result.stderr
    assert not (tmp_path / "out").exists()
