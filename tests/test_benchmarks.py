"""The GPU benchmarks' CPU dry runs: every code path of a benchmark runs here, so that the GPU run,
which costs device time, does not stop at a typo."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rwkvinside.modeling.loading import EMBEDDED_PACKAGE

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("teacher", "teacher_autocast", "stage1", "stage2_all", "stage2_mixers")
LABELS = ("teacher forward", "wkv7", "loss", "optimizer", "rest")


@pytest.mark.slow  # two Python processes that import torch and transformers: ~20 s on 2 cores
def test_bench_stages_dry_run(tmp_path):
    script = ROOT / "benchmarks" / "bench_stages.py"
    subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(tmp_path)], check=True, cwd=ROOT,
                   timeout=300)
    report = json.loads((tmp_path / "bench_stages-tiny.json").read_text())
    assert list(report["measurements"]) == list(STEPS)
    for key, result in report["measurements"].items():
        assert result["tokens_per_s"] > 0, key
        assert result["tokens_per_step"] == 2 * 32
        assert len(result["losses"]) == 1 + 2 + 1  # warm-up, timed, profiled
        assert set(result["profile"]["by_label_ms"]) == set(LABELS)
    profile = report["measurements"]["stage2_all"]["profile"]["by_label_ms"]
    assert all(profile[label] > 0 for label in LABELS)
    assert report["measurements"]["teacher"]["speed_vs_teacher"] == 1.0
    stage1 = report["measurements"]["stage1"]
    assert stage1["speed_vs_teacher"] == pytest.approx(stage1["tokens_per_s"] / report["measurements"]["teacher"]["tokens_per_s"])
    variants = report["wkv7"]["variants"]
    ran = [v for v in variants.values() if "skipped" not in v]
    assert len(ran) == 3 and all(v["ms_per_layer"] > 0 for v in ran)
    assert any("no CUDA" in v.get("skipped", "") for v in variants.values())
    for key, record_used in (("cold_start", True), ("cold_start_untuned", False)):
        assert report[key]["teacher_loaded_to_first_step_s"] > 0
        assert report[key]["tuned_record"] is record_used
    assert (tmp_path / "bench_stages-tiny.md").is_file()


@pytest.mark.slow  # compiles the tiny student's mixers on the CPU: ~40 s on 2 cores
def test_bench_stages_compiled_rows_follow_their_eager_rows(tmp_path):
    script = ROOT / "benchmarks" / "bench_stages.py"
    subprocess.run([sys.executable, str(script), "--dry-run", "--compile", "--rows", "stage1", "stage1_compiled",
                    "stage2_all", "stage2_all_compiled", "--skip", "wkv7", "--out", str(tmp_path)],
                   check=True, cwd=ROOT, timeout=600)
    measured = json.loads((tmp_path / "bench_stages-tiny.json").read_text())["measurements"]
    assert list(measured) == ["stage1", "stage1_compiled", "stage2_all", "stage2_all_compiled"]
    for eager in ("stage1", "stage2_all"):
        compiled = measured[f"{eager}_compiled"]
        assert len(compiled["warmup_s"]) == 1 and compiled["tokens_per_s"] > 0
        # the same steps on the same data: compiling changes no loss beyond float32 rounding
        assert compiled["losses"] == pytest.approx(measured[eager]["losses"], rel=1e-5)


@pytest.mark.slow  # two Python processes that import torch and transformers: ~20 s on 2 cores
@pytest.mark.parametrize("lead, window", [("extra", 32), ("within", 31)])
def test_bench_stages_lead_counts_the_targets_of_the_windows_it_trains_on(tmp_path, lead, window):
    script = ROOT / "benchmarks" / "bench_stages.py"
    subprocess.run([sys.executable, str(script), "--dry-run", "--lead", lead, "--rows", "stage1", "stage2_all",
                    "--skip", "wkv7", "--out", str(tmp_path)], check=True, cwd=ROOT, timeout=300)
    report = json.loads((tmp_path / f"bench_stages-tiny-lead-{lead}.json").read_text())
    assert report["settings"]["lead"] == lead
    for key, result in report["measurements"].items():
        assert result["tokens_per_step"] == 2 * window, key
        assert result["tokens_per_s"] > 0 and all(loss == loss for loss in result["losses"]), key


@pytest.mark.slow  # one Python process that imports torch and transformers: ~15 s on 2 cores
def test_probe_host_dry_run():
    script = ROOT / "benchmarks" / "probe_host.py"
    done = subprocess.run([sys.executable, str(script), "--dry-run", "--stage", "1"], check=True, cwd=ROOT,
                          timeout=300, capture_output=True, text=True)
    assert "garbage collector on:" in done.stdout and "garbage collector off:" in done.stdout
    assert "optimizer" in done.stdout  # the host profile names the step's labelled parts


@pytest.mark.slow  # one Python process that imports torch and transformers and decodes: ~15 s on 2 cores
def test_bench_decode_dry_run(tmp_path):
    script = ROOT / "benchmarks" / "bench_decode.py"
    subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(tmp_path)], check=True, cwd=ROOT,
                   timeout=300)
    rows = json.loads((tmp_path / "bench_decode.json").read_text())["rows"]
    assert rows
    for row in rows:
        # The student's state does not grow with the context; the teacher's KV cache does.
        assert row["student"]["ms_per_token"] is not None and row["student"]["cache_mb"] > 0
    states = {row["student"]["cache_mb"] for row in rows if row["batch"] == rows[0]["batch"]}
    assert len(states) == 1
    caches = [row["teacher"]["cache_mb"] for row in rows if row["batch"] == rows[0]["batch"]]
    assert caches == sorted(caches) and caches[0] < caches[-1]


@pytest.mark.slow  # one distillation of a tiny teacher in a Python process: ~30 s on 2 cores
def test_probe_gradients_names_the_parameters_and_tokens_of_each_step(tmp_path, tiny_tokenizer):
    from conftest import TRAINING_TEXT, build_tiny_teacher

    teacher = tmp_path / "teacher"
    build_tiny_teacher("llama", num_layers=2).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TRAINING_TEXT * 3), encoding="utf-8")
    script = ROOT / "benchmarks" / "probe_gradients.py"
    out = subprocess.run([sys.executable, str(script), "--top", "2", "distill", "--teacher", str(teacher),
                          "--data", str(corpus), "--output", str(tmp_path / "run"), "--stage", "all",
                          "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "data.eval_tokens=0",
                          "log.progress=false"],
                         check=True, cwd=ROOT, timeout=600, capture_output=True, text=True).stdout
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    parameters = [line for line in steps if " parameters: total " in line]
    assert len(parameters) == 2 + 2  # stage 1, then stage 2
    assert all(line.count("model.layers.") == 2 for line in parameters)  # --top 2
    # Stage 1's first converted layer passes the teacher's output on: no gradient reaches it there.
    tokens = [line for line in steps if " tokens at layer 0's output: median " in line]
    assert len(tokens) == 2 and all(line.count("(") == 3 for line in tokens)  # "(row, position)" + 2


@pytest.mark.slow  # one Python process that imports torch and transformers: ~15 s on 2 cores
@pytest.mark.skipif(importlib.util.find_spec(EMBEDDED_PACKAGE) is None,
                    reason=f"the dry run borrows the embedded teacher's tokenizer ({EMBEDDED_PACKAGE})")
def test_bench_synth_dry_run_times_each_attention(tmp_path):
    script = ROOT / "benchmarks" / "bench_synth.py"
    subprocess.run([sys.executable, str(script), "--dry-run", "--attention", "torch", "kernel", "--seq-len", "96",
                    "--out", str(tmp_path)], check=True, cwd=ROOT, timeout=300)
    report = json.loads((tmp_path / "bench_synth.json").read_text())
    rows = [(row["batch"], row["attention"]) for row in report["sampling"]]
    assert rows == [(2, "torch"), (2, "kernel"), (4, "torch"), (4, "kernel")]
    assert all(row["cache_slots"] == 96 for row in report["sampling"])  # as synth --seq-len 96 samples
    assert all(row["sampled_tokens_per_s"] > 0 and row["slots_per_s"] >= row["sampled_tokens_per_s"]
               for row in report["sampling"])
    assert report["forward"]["tokens_per_s"] > 0
