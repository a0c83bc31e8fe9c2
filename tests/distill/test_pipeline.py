"""`rwkvinside distill` end to end on a tiny Llama teacher: run folder, logs, stages, errors."""

import dataclasses
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
from rwkvinside.distill import pipeline
from rwkvinside.distill.metrics import read_log
from rwkvinside.distill.pipeline import loader_for
from rwkvinside.distill.stages import STAGES
from rwkvinside.modeling.student import RWKVInsideForCausalLM, with_lead
from rwkvinside.modeling.student_folder import load_student

from .conftest import BATCH, SEQ_LEN, STEPS, TEACHER_LAYERS, distill_args, error_line

# An all-RWKV student reads its lead (convert.lead) as the first of its SEQ_LEN tokens: the windows
# hold SEQ_LEN - 1 tokens of text, each a target.
WINDOW = SEQ_LEN - 1
TOKENS = STEPS * BATCH * WINDOW

@pytest.fixture(scope="module")
def run12(tmp_path_factory, inputs) -> Path:
    """One uninterrupted run of stages 1 and 2 (the default plan without chat data)."""
    output = tmp_path_factory.mktemp("runs") / "run12"
    assert cli.main(distill_args(inputs, output)) == 0
    return output


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def metadata(folder: Path) -> dict:
    return json.loads((folder / "rwkvinside.json").read_text(encoding="utf-8"))


def with_chat(inputs) -> str:
    return f"data.chat=['{inputs['chat']}']"


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
    assert config.convert.lead and config.data.eos_first is False  # an all-RWKV student reads its lead
    assert json.loads((run12 / "report.json").read_text())["windows_cut_mid_text"] is False


@pytest.mark.parametrize("number", [1, 2])
def test_a_stage_writes_a_format_3_student_with_its_provenance(run12, inputs, number):
    """config.json is the student's own configuration (the teacher's inside it, the trained context
    beside it); rwkvinside.json names the teacher, the stages so far and the run (absolute)."""
    folder = run12 / f"stage{number}/student"
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "rwkvinside" and config["text_config"]["model_type"] == "llama"
    assert config["rwkv_layers"] == list(range(TEACHER_LAYERS))
    assert config["trained_context"] == SEQ_LEN
    provenance = metadata(folder)
    assert provenance["format"] == 3 and provenance["stage"] == number
    assert provenance["teacher"] == str(inputs["teacher"])
    assert Path(provenance["run"]).is_absolute() and Path(provenance["run"]) == run12.resolve()
    assert (provenance["steps"], provenance["tokens"]) == (STEPS, TOKENS)
    assert provenance["history"] == [{"stage": n, "tokens": TOKENS, "steps": STEPS} for n in range(1, number + 1)]
    student, tokenizer, loaded = load_student(folder)
    assert isinstance(student, RWKVInsideForCausalLM) and tokenizer is not None and loaded == provenance
    assert student.rwkv_layers == tuple(range(TEACHER_LAYERS)) and student.config.trained_context == SEQ_LEN


def test_a_run_folder_loads_as_its_last_stage_student(run12):
    _, _, loaded = load_student(run12)
    assert loaded == metadata(run12 / "stage2/student")


@pytest.mark.parametrize("number, terms", [
    (1, [f"align/layer_{i:02d}" for i in range(TEACHER_LAYERS)]),
    (2, ["kl", "student_ce", "teacher_ce"]),
])
def test_one_log_record_per_optimizer_step(run12, number, terms):
    records = read_log(run12 / f"stage{number}/log.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in records] == [BATCH * WINDOW * (i + 1) for i in range(STEPS)]
    for record in records:
        for key in ["loss", "lr", "tokens", *terms]:
            assert math.isfinite(record[key]), (key, record)
    if number == 2:
        record = records[0]
        assert record["loss"] == pytest.approx(record["kl"])  # kl_weight 1, ce_weight 0
        assert record["student_ce"] > 0 and record["teacher_ce"] > 0


FIGURES = {"tokens", "student_ppl", "teacher_ppl", "agreement", "kl"}
PARTS = {"start", "seen", "unseen"}  # the same figures over parts of the targets (evaluation/compare.py)
SCORES = {"path", *FIGURES, *PARTS}


def held_out_files(inputs) -> list[str]:
    return [str(inputs["corpus"]), str(inputs["heldout"])]


def test_the_report_scores_each_held_out_file(run12, inputs):
    """The baseline: the teacher alone and the freshly converted student beside it; each stage: its
    student beside the teacher, file by file, on data.eval_tokens target tokens of each."""
    report = json.loads((run12 / "report.json").read_text())
    files = held_out_files(inputs)
    baseline = report["baseline"]
    assert set(baseline) == {"teacher", "fresh_student"}
    assert [f["path"] for f in baseline["teacher"]] == [f["path"] for f in baseline["fresh_student"]] == files
    for teacher, fresh in zip(baseline["teacher"], baseline["fresh_student"]):
        assert set(teacher) == set(fresh) == SCORES
        assert all(set(teacher[part]) == set(fresh[part]) == FIGURES for part in PARTS)
        assert 64 <= teacher["tokens"] < 64 + BATCH * SEQ_LEN  # eval_tokens per file, whole batches
        assert teacher["student_ppl"] > 1 and math.isfinite(teacher["student_ppl"])
        assert teacher["teacher_ppl"] is None and teacher["agreement"] is None and teacher["kl"] is None
        assert fresh["tokens"] == teacher["tokens"]
        assert fresh["teacher_ppl"] == pytest.approx(teacher["student_ppl"], rel=1e-5)  # the same teacher
        assert fresh["student_ppl"] > 1 and 0 <= fresh["agreement"] <= 1 and fresh["kl"] > 0
    assert baseline["teacher"][0]["student_ppl"] != baseline["teacher"][1]["student_ppl"]  # two files, two scores

    assert set(report["stages"]) == {"1", "2"}
    for stage in report["stages"].values():
        assert stage["step"] == STEPS and stage["tokens"] == TOKENS
        assert stage["ended_by"] == "max_steps"
        assert math.isfinite(stage["final"]["loss"])
        assert [f["path"] for f in stage["heldout"]] == files
        for scores, teacher in zip(stage["heldout"], baseline["teacher"]):
            assert set(scores) == SCORES and scores["tokens"] == teacher["tokens"]
            assert scores["teacher_ppl"] == pytest.approx(teacher["student_ppl"], rel=1e-5)
            assert math.isfinite(scores["student_ppl"]) and 0 <= scores["agreement"] <= 1 and scores["kl"] > 0
    assert set(report["stages"]["1"]["final_alignment_by_layer"]) == {"align/layer_00", "align/layer_01"}
    summary = json.loads((run12 / "stage2/summary.json").read_text())
    assert summary == report["stages"]["2"]


def test_the_markdown_report_has_a_row_per_file_and_model(run12, inputs):
    report = json.loads((run12 / "report.json").read_text())
    lines = (run12 / "report.md").read_text().splitlines()
    assert any(line.startswith(f"| 1 (attention alignment) | 3 | {TOKENS} |") and "| max_steps |" in line
               for line in lines)
    assert any(line.startswith(f"| 2 (knowledge distillation) | 3 | {TOKENS} |") and "| max_steps |" in line
               for line in lines)
    baseline = report["baseline"]
    for i, path in enumerate(held_out_files(inputs)):
        name = Path(path).name
        teacher_ppl = baseline["teacher"][i]["student_ppl"]
        expected = [f"| {name} | teacher | {teacher_ppl:.2f} | 1.000x |  |  |  |  |"]
        students = [("freshly converted student", baseline["fresh_student"][i])] + [
            (f"student after stage {n}", report["stages"][str(n)]["heldout"][i]) for n in (1, 2)]
        for model, scores in students:
            start, seen = (scores[part]["student_ppl"] / scores[part]["teacher_ppl"] for part in ("start", "seen"))
            expected.append(f"| {name} | {model} | {scores['student_ppl']:.2f} | "
                            f"{scores['student_ppl'] / teacher_ppl:.3f}x | {scores['agreement']:.1%} | "
                            f"{scores['kl']:.4f} | {start:.3f}x | {seen:.3f}x |")
        rows = [line for line in lines if line.startswith(f"| {name} |")]
        assert rows == expected  # the teacher, the fresh student, then the stages in order


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


def test_the_teacher_scores_in_eval_mode(tmp_path, inputs, monkeypatch):
    """Dropout must never touch the teacher's logits: stage 2's teacher and the teacher beside every
    held-out score are in eval mode, also after stage 1 trained a student that held the teacher's
    own attentions."""
    in_eval = {"stage 2": [], "held-out": []}
    step, compare_on_file = STAGES[2].step, pipeline.compare_on_file

    def evaluating(model) -> bool:
        return all(not module.training for module in model.modules())

    def stage2_step(model, teacher, *args):
        in_eval["stage 2"].append(evaluating(teacher))
        return step(model, teacher, *args)

    def held_out(path, student, teacher, *args):
        in_eval["held-out"].append(evaluating(teacher) if teacher is not None else evaluating(student))
        return compare_on_file(path, student, teacher, *args)

    monkeypatch.setitem(STAGES, 2, dataclasses.replace(STAGES[2], step=stage2_step))
    monkeypatch.setattr(pipeline, "compare_on_file", held_out)
    assert cli.main(distill_args(inputs, tmp_path / "run", steps=1)) == 0
    assert in_eval == {"stage 2": [True], "held-out": [True] * 8}  # 2 files: baseline x 2, stage 1, stage 2


# ---- stage plans ----------------------------------------------------------------------------------

def test_eval_tokens_0_skips_every_perplexity(tmp_path, inputs):
    output = tmp_path / "run"
    assert cli.main(distill_args(inputs, output, "--stage", "1", "data.eval_tokens=0", steps=1)) == 0
    report = json.loads((output / "report.json").read_text())
    assert "baseline" not in report and "heldout" not in report["stages"]["1"]
    assert "| file | model |" not in (output / "report.md").read_text()


@pytest.mark.parametrize("budget, extra", [
    ("max_time", ["stage1.max_time=0.5", "stage1.max_steps=1000"]),
    ("max_tokens", ["--max-tokens", str(2 * BATCH * WINDOW - 1)]),
])
def test_ended_by_names_the_budget_that_ended_the_stage(tmp_path, inputs, budget, extra):
    output = tmp_path / "run"
    assert cli.main(distill_args(inputs, output, "--stage", "1", "data.eval_tokens=0", *extra, steps=None)) == 0
    summary = json.loads((output / "report.json").read_text())["stages"]["1"]
    assert summary["ended_by"] == budget
    records = read_log(output / "stage1/log.jsonl")
    if budget == "max_time":
        assert summary["elapsed"] >= 0.5 and 1 <= summary["step"] < 1000
    else:
        assert summary["step"] == 2 and summary["tokens"] == 2 * BATCH * WINDOW
    assert len(records) == summary["step"]
    assert any(line.startswith("| 1 (attention alignment) |") and f"| {budget} |" in line
               for line in (output / "report.md").read_text().splitlines())


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
    provenance = metadata(output / "stage2/student")
    assert [h["stage"] for h in provenance["history"]] == [1, 2]
    assert provenance["history"][0] == metadata(run12 / "stage1/student")["history"][0]
    assert Path(provenance["run"]) == output.resolve()  # the run that trained it, not the one it started from
    report = json.loads((output / "report.json").read_text())
    assert "baseline" not in report  # a baseline belongs to a run that converts
    assert [f["path"] for f in report["stages"]["2"]["heldout"]] == held_out_files(inputs)


def test_init_from_a_run_folder_takes_its_last_stage_student(tmp_path, inputs, run12):
    """--init-from RUN starts from the run's last finished stage: stage 2 of a run of stages 1-2,
    stage 1 of a run that has finished only stage 1."""
    output = tmp_path / "from_run"
    assert cli.main(distill_args(inputs, output, "--stage", "3", "--init-from", str(run12), with_chat(inputs),
                                 steps=1)) == 0
    history = metadata(output / "stage3/student")["history"]
    assert history[:-1] == metadata(run12 / "stage2/student")["history"]
    assert [h["stage"] for h in history] == [1, 2, 3]

    only_stage1 = tmp_path / "only_stage1"
    shutil.copytree(run12, only_stage1, ignore=lambda folder, names: ["stage2"] if Path(folder) == run12 else [])
    output = tmp_path / "from_stage1_run"
    assert cli.main(distill_args(inputs, output, "--stage", "2", "--init-from", str(only_stage1), steps=1)) == 0
    history = metadata(output / "stage2/student")["history"]
    assert history[:-1] == metadata(run12 / "stage1/student")["history"]
    assert [h["stage"] for h in history] == [1, 2]


@pytest.mark.parametrize("overrides, window", [
    ([], SEQ_LEN - 1),  # all-RWKV: the student reads its lead, then SEQ_LEN - 1 tokens of text
    (["convert.lead=false"], SEQ_LEN),
    (["convert.keep_attention=1"], SEQ_LEN),  # attention stays: no lead
])
def test_the_student_reads_seq_len_tokens_its_lead_included(inputs, tokenizer, overrides, window):
    config = load_config(overrides=[f"data.train=['{inputs['corpus']}']", f"data.seq_len={SEQ_LEN}",
                                    f"train.batch_size={BATCH}", *overrides])
    batch = next(loader_for(STAGES[2], config, tokenizer, rank=0, world_size=1))
    assert batch["input_ids"].shape == batch["labels"].shape == (BATCH, window)
    read = with_lead(tokenizer.eos_token_id, batch["input_ids"], None)[0] if config.convert.lead \
        else batch["input_ids"]
    assert read.shape == (BATCH, SEQ_LEN)


def test_a_later_stage_keeps_the_lead_of_the_student_it_starts_from(tmp_path, inputs, run12, capsys):
    """run12's student reads a lead (the all-RWKV default): stage 2 told otherwise would cut its windows
    for a student without one."""
    output = tmp_path / "out"
    args = distill_args(inputs, output, "--stage", "2", "--init-from", str(run12), "convert.lead=false")
    assert cli.main(args) == 2
    line = error_line(capsys)
    assert "reads lead token but convert.lead is false" in line and "pass convert.lead=true" in line
    assert not output.exists()


def test_init_from_a_run_without_a_finished_stage(tmp_path, inputs, run12, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("run.json", "config.yaml"):
        shutil.copy(run12 / name, unfinished / name)
    output = tmp_path / "out"
    assert cli.main(distill_args(inputs, output, "--stage", "2", "--init-from", str(unfinished))) == 2
    line = error_line(capsys)
    assert "has no finished stage yet" in line
    assert f"--output {unfinished} --resume" in line  # how to finish it, for this very run
    assert not output.exists()


def test_stage_3_trains_on_assistant_tokens(tmp_path, inputs, run12, tokenizer):
    output = tmp_path / "sft"
    args = distill_args(inputs, output, "--stage", "3", "--init-from", str(run12 / "stage1/student"),
                        with_chat(inputs))
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
    heldout = json.loads((output / "report.json").read_text())["stages"]["3"]["heldout"]
    assert [f["path"] for f in heldout] == held_out_files(inputs)  # scored without a teacher: none was needed
    assert all(math.isfinite(f["student_ppl"]) and f["teacher_ppl"] is None and f["kl"] is None for f in heldout)


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
    monkeypatch.chdir(tmp_path.parent)  # the provenance names the run wherever one stands later
    assert Path(metadata(folder / "stage1/student")["run"]) == folder.resolve()


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
    ("small", "the corpus has 10 tokens but one training sequence needs 32; give a smaller --seq-len"),
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


@pytest.mark.slow  # compiles the tiny student's mixers on the CPU: ~40 s on 2 cores
def test_train_compile_and_keep_attention_run_end_to_end(tmp_path, inputs):
    """The real command with train.compile: stage 1 (compiled mixers), the keep-attention scoring and
    the report's evaluations (other shapes, no gradients), stage 2 from the rebuilt student."""
    output = tmp_path / "run"
    torch._dynamo.reset()  # no compiled code or recompilation count left from other tests
    assert cli.main(distill_args(inputs, output, "train.compile=true", "convert.keep_attention=1")) == 0
    summary = json.loads((output / "stage1" / "summary.json").read_text(encoding="utf-8"))
    assert summary["kept_attention"]["layers"] == [1]  # the only candidate: layer 0 makes v_first
    student, _, _ = load_student(output / "stage2" / "student")
    assert student.rwkv_layers == (0,)
    assert all(math.isfinite(r["loss"]) for r in read_log(output / "stage2" / "log.jsonl"))


def test_score_eos_first_benchmark_scores_both_ways(run12, inputs):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "score_eos_first.py"
    done = subprocess.run([sys.executable, str(script), "--model", str(run12), "--teacher", str(inputs["teacher"]),
                           "--data", str(inputs["heldout"]), "--seq-len", "16", "--batches", "1"],
                          check=True, capture_output=True, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["mid-text", "EOS first"]
    ratios = [float(line.rsplit("ratio ", 1)[1]) for line in lines]
    assert all(math.isfinite(r) and r > 0 for r in ratios) and ratios[0] != ratios[1]
