"""`rwkvinside export`: the folder, its generated code, remote-code loading and loading back.

An exported folder is the student folder (format 3: config.json is an RWKVInsideConfig) plus the
auto_map, the generated code and README.md; it loads through the same `load_student` as a stage's
student folder, and through transformers' remote code where rwkvinside is not installed.
"""

import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers.dynamic_module_utils
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from export.students import CONVERTED, PROVENANCE, make_run, tiny_student
from rwkvinside.cli import main
from rwkvinside.errors import UserError
from rwkvinside.export.card import model_card
from rwkvinside.export.cli import reports_for
from rwkvinside.export.codegen import CONFIGURATION_FILE, MODELING_FILE, generate
from rwkvinside.export.export import export_student
from rwkvinside.modeling.alignment import select_trainable
from rwkvinside.modeling.configuration import RWKVInsideConfig
from rwkvinside.modeling.student import RWKVInsideForCausalLM
from rwkvinside.modeling.student_folder import (METADATA_FILE, load_student, read_metadata,
                                                resolve_student_folder, save_student)

IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 7, 180, 33, 2, 64, 121]])


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_exported_folder_layout(exported_dir):
    config = json.loads((exported_dir / "config.json").read_text())
    assert config["model_type"] == "rwkvinside"
    assert config["auto_map"] == {"AutoConfig": "configuration_rwkvinside.RWKVInsideConfig",
                                  "AutoModelForCausalLM": "modeling_rwkvinside.RWKVInsideForCausalLM"}
    assert config["architectures"] == ["RWKVInsideForCausalLM"]
    assert config["rwkv_layers"] == [0, 1, 3] and config["text_config"]["model_type"] == "llama"
    for name in (CONFIGURATION_FILE, MODELING_FILE, "model.safetensors", "tokenizer.json", METADATA_FILE,
                 "generation_config.json", "README.md"):
        assert (exported_dir / name).is_file(), name
    metadata = json.loads((exported_dir / METADATA_FILE).read_text())
    assert metadata["format"] == 3 and metadata["teacher"] == "tiny-random" and metadata["history"]
    assert metadata["export"]["dtype"] == "fp32"
    assert AutoTokenizer.from_pretrained(exported_dir).chat_template  # the chat template travels
    card = (exported_dir / "README.md").read_text()
    assert "tiny-random" in card and "3,000 tokens in all" in card
    assert "Layer 2 keeps softmax attention" in card
    assert "trust_remote_code=True" in card
    assert "## Measured retention" not in card  # no report was given


def test_the_exported_folder_is_the_student_folder_plus_code_and_card(student_dir, exported_dir):
    """Same files (but the code and the card), same config but for the auto_map, same weights."""
    added = {CONFIGURATION_FILE, MODELING_FILE, "README.md"}
    assert {p.name for p in exported_dir.iterdir()} == {p.name for p in student_dir.iterdir()} | added
    student_config = json.loads((student_dir / "config.json").read_text())
    exported_config = json.loads((exported_dir / "config.json").read_text())
    assert "auto_map" not in student_config
    assert {k: v for k, v in exported_config.items() if k != "auto_map"} == student_config
    ours, theirs = load_file(student_dir / "model.safetensors"), load_file(exported_dir / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_config_answers_what_generic_tools_ask(exported_dir):
    """vocab_size, num_hidden_layers and the like read through to the teacher's configuration."""
    config = RWKVInsideConfig.from_pretrained(exported_dir)
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (320, 4, 64)
    assert config.max_position_embeddings == 512 and config.tie_word_embeddings is True
    with pytest.raises(AttributeError):
        config.no_such_setting


def test_modeling_file_is_generated_from_the_live_sources(exported_dir):
    """The export writes what the generator makes of the package's sources right now: nothing to go stale."""
    for name in (CONFIGURATION_FILE, MODELING_FILE):
        assert (exported_dir / name).read_text() == generate(name)
    text = generate(MODELING_FILE)
    assert "do NOT edit" in text and "# ---- rwkvinside/modeling/time_mixer.py ----" in text
    assert "# ---- rwkvinside/modeling/student.py ----" in text
    assert "import rwkvinside" not in text and "from rwkvinside" not in text
    # transformers refuses remote code whose imports are not installed: only these may be required.
    needed = set(transformers.dynamic_module_utils.get_imports(exported_dir / MODELING_FILE))
    assert needed - set(sys.stdlib_module_names) == {"torch", "transformers", "safetensors"}, needed


def test_remote_code_matches_the_toolkit_for_every_family(build_teacher, tiny_tokenizer, family, tmp_path,
                                                          remote_code_cache):
    student = tiny_student(build_teacher, family)
    save_student(student, tiny_tokenizer, tmp_path / "student", PROVENANCE)
    folder = export_student(tmp_path / "student", tmp_path / f"exported-{family}", dtype="fp32")
    exported = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(exported).__module__.startswith("transformers_modules")  # the generated code
    assert type(exported) is not RWKVInsideForCausalLM
    torch.testing.assert_close(logits(exported), logits(student), rtol=1e-5, atol=1e-5)
    if student.config.tie_word_embeddings:
        assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    # Generic tools (lm-eval, vLLM-style loaders, pipelines) read these off a causal LM's config.
    teacher_config = build_teacher(family).config
    assert exported.config.vocab_size == teacher_config.vocab_size == 320
    assert exported.config.num_hidden_layers == teacher_config.num_hidden_layers == 4
    assert exported.config.hidden_size == 64 and tuple(exported.config.rwkv_layers) == CONVERTED
    assert AutoConfig.from_pretrained(folder, trust_remote_code=True).vocab_size == 320


def test_an_exported_student_reads_its_lead(build_teacher, tiny_tokenizer, tmp_path, remote_code_cache):
    """convert.lead travels in config.json, and the generated code reads the lead as the toolkit does."""
    student = tiny_student(build_teacher, layers=None)
    student.config.lead_token_id = tiny_tokenizer.eos_token_id
    save_student(student, tiny_tokenizer, tmp_path / "student", PROVENANCE)
    folder = export_student(tmp_path / "student", tmp_path / "exported", dtype="fp32")
    exported = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert exported.config.lead_token_id == tiny_tokenizer.eos_token_id
    torch.testing.assert_close(logits(exported), logits(student), rtol=1e-5, atol=1e-5)
    exported.config.lead_token_id = None
    assert not torch.allclose(logits(exported), logits(student), rtol=1e-3, atol=1e-3)  # the lead mattered


LOAD_WITHOUT_RWKVINSIDE = """
import importlib.abc, json, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "rwkvinside":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")

sys.meta_path.insert(0, Blocker())
try:
    import rwkvinside
    sys.exit("rwkvinside is still importable")
except ModuleNotFoundError:
    pass

import torch
from transformers import AutoModelForCausalLM

folder, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(ids).logits
tokens = model.generate(ids[:, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
torch.save({"logits": logits, "tokens": tokens, "vocab_size": model.config.vocab_size,
            "num_hidden_layers": model.config.num_hidden_layers}, sys.argv[3])
"""


def test_loads_with_only_torch_and_transformers(exported_dir, student_dir, tmp_path):
    result_file = tmp_path / "result.pt"
    env = {"PATH": "/usr/bin:/bin", "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD_WITHOUT_RWKVINSIDE), str(exported_dir),
                    json.dumps(IDS.tolist()), str(result_file)], check=True, env=env, timeout=300)
    result = torch.load(result_file)
    student, _, _ = load_student(student_dir)
    torch.testing.assert_close(result["logits"], logits(student), rtol=1e-5, atol=1e-5)
    expected = student.generate(IDS[:, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(result["tokens"], expected)
    assert (result["vocab_size"], result["num_hidden_layers"]) == (320, 4)


def test_exported_folder_loads_with_load_student_as_the_student_it_came_from(exported_dir, student_dir,
                                                                            build_teacher):
    """A stage's student folder and an export load through the same function, into the same class,
    with the logits of the in-process student that was saved."""
    original = tiny_student(build_teacher)  # the student `student_dir` holds, built again
    from_stage, _, _ = load_student(student_dir)
    reloaded, tokenizer, metadata = load_student(exported_dir)
    assert type(reloaded) is type(from_stage) is RWKVInsideForCausalLM
    assert tokenizer is not None and metadata["format"] == 3 and metadata["teacher"] == "tiny-random"
    assert reloaded.rwkv_layers == CONVERTED and not reloaded.training
    torch.testing.assert_close(logits(reloaded), logits(original), rtol=0, atol=0)
    torch.testing.assert_close(logits(from_stage), logits(original), rtol=0, atol=0)


def test_exported_folder_loads_back_to_continue_training(exported_dir):
    reloaded, _, _ = load_student(exported_dir)
    trainable = select_trainable(reloaded, "all")
    assert set(trainable) == {name for name, _ in reloaded.named_parameters()}
    reloaded(IDS).logits.mean().backward()
    assert all(p.grad is not None for p in reloaded.parameters())  # no dead weights


def test_bf16_export_holds_bf16_weights(student_dir, tmp_path):
    folder = export_student(student_dir, tmp_path / "bf16")
    weights = load_file(folder / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert "lm_head.weight" not in weights  # tied to the embeddings, stored once
    student, _, _ = load_student(folder, dtype=torch.bfloat16)
    assert student.lm_head.weight.dtype == torch.bfloat16
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()


PROGRESS_BAR = re.compile(r"\d+%\|")  # transformers' tqdm bars (loading weights) share stderr


def _cli_error(args: list[str], capsys) -> str:
    """The one line the CLI prints for a user's mistake (exit status 2), with no traceback."""
    capsys.readouterr()
    assert main(args) == 2
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
             if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(lines) == 1 and lines[0].startswith("rwkvinside: error:"), lines
    return lines[0]


def test_bad_checkpoints_are_one_line_errors(student_dir, build_teacher, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "is neither a student folder" in _cli_error(["export", "--checkpoint", str(tmp_path),
                                                        "--output", out], capsys)

    no_tokenizer = tmp_path / "no-tokenizer"
    save_student(tiny_student(build_teacher), None, no_tokenizer, PROVENANCE)
    assert "has no tokenizer files" in _cli_error(["export", "--checkpoint", str(no_tokenizer),
                                                   "--output", out], capsys)

    no_weights = tmp_path / "no-weights"
    save_student(tiny_student(build_teacher), None, no_weights, PROVENANCE)
    (no_weights / "model.safetensors").unlink()
    assert "has no model.safetensors" in _cli_error(["export", "--checkpoint", str(no_weights),
                                                     "--output", out], capsys)
    assert not Path(out).exists()


def test_a_corrupt_weights_file_is_one_error_line(build_teacher, tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    save_student(tiny_student(build_teacher), None, corrupt, PROVENANCE)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="model.safetensors does not load"):
        load_student(corrupt)
    err = _cli_error(["export", "--checkpoint", str(corrupt), "--output", str(tmp_path / "out")], capsys)
    assert "model.safetensors does not load" in err and "re-run the stage that wrote it" in err


@pytest.mark.parametrize("version", [1, 99])
def test_a_student_of_an_unknown_format_is_refused(build_teacher, tmp_path, capsys, version):
    older = tmp_path / "older"
    save_student(tiny_student(build_teacher), None, older, PROVENANCE)
    metadata = json.loads((older / METADATA_FILE).read_text())
    (older / METADATA_FILE).write_text(json.dumps(metadata | {"format": version}))
    with pytest.raises(UserError, match=f"holds a student of format {version}") as error:
        load_student(older)
    message = str(error.value)
    assert "\n" not in message and "reads formats 2, 3" in message and "re-run the stage" in message
    assert f"format {version}" in _cli_error(["export", "--checkpoint", str(older), "--output",
                                              str(tmp_path / "out")], capsys)


def write_format_2_folder(student: RWKVInsideForCausalLM, tokenizer, folder: Path,
                          trained_context: int) -> None:
    """A student folder as rwkvinside wrote it before the one student class (format 2): the teacher's
    own config.json, the conversion in rwkvinside.json, every weight under the teacher's parameter
    names (a tied LM head stored under both names)."""
    folder.mkdir(parents=True)
    student.config.text_config.to_json_file(folder / "config.json")
    metadata = {"format": 2, "conversion": {"layers": list(student.rwkv_layers), "head_size": None,
                                            "init": "teacher"},
                "trained_context": trained_context, **PROVENANCE}
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    state = {name: tensor.detach().clone().contiguous() for name, tensor in student.state_dict().items()}
    assert "model.layers.0.self_attn.mixer.x_r" in state and "lm_head.weight" in state
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # a tied and an untied LM head
def test_a_format_2_student_folder_still_loads(build_teacher, tiny_tokenizer, tmp_path, family):
    student = tiny_student(build_teacher, family)
    folder = tmp_path / "format2"
    write_format_2_folder(student, tiny_tokenizer, folder, trained_context=64)
    assert json.loads((folder / "config.json").read_text())["model_type"] == family  # the teacher's own

    loaded, tokenizer, metadata = load_student(folder)
    assert metadata["format"] == 2 and tokenizer is not None
    assert loaded.rwkv_layers == CONVERTED and loaded.config.trained_context == 64
    assert loaded.config.text_config.model_type == family
    torch.testing.assert_close(logits(loaded), logits(student), rtol=0, atol=0)

    # Exporting it writes a folder of today's format, which loads back the same.
    exported = export_student(folder, tmp_path / "exported", dtype="fp32")
    assert json.loads((exported / "config.json").read_text())["model_type"] == "rwkvinside"
    assert json.loads((exported / METADATA_FILE).read_text())["format"] == 3
    again, _, _ = load_student(exported)
    assert again.config.trained_context == 64
    torch.testing.assert_close(logits(again), logits(student), rtol=0, atol=0)


def test_export_refuses_a_folder_holding_files(student_dir, exported_dir):
    with pytest.raises(UserError, match="already exists"):
        export_student(student_dir, exported_dir)


def test_cli_export(student_dir, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(student_dir), "--output", str(tmp_path / "out"),
                 "--dtype", "fp16"]) == 0
    assert "exported to" in capsys.readouterr().out
    metadata = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    assert metadata["export"]["dtype"] == "fp16" and metadata["export"]["source"] == str(student_dir)
    assert not Path(str(tmp_path / "out") + ".tmp").exists()


# ---- run folders ---------------------------------------------------------------------------------------


def test_a_run_folder_stands_for_its_last_finished_stage(build_teacher, tiny_tokenizer, tmp_path, caplog):
    run = make_run(tmp_path / "run", build_teacher, tiny_tokenizer, {1: 1, 2: 2})
    (run / "stage3" / "checkpoint-000010").mkdir(parents=True)  # stage 3 started, not finished
    with caplog.at_level(logging.INFO, logger="rwkvinside"):
        student, tokenizer, metadata = load_student(run)
    assert metadata["stage"] == 2 and tokenizer is not None
    assert any("stage2" in r.getMessage() and str(run / "stage2" / "student") in r.getMessage()
               for r in caplog.records)
    torch.testing.assert_close(logits(student), logits(tiny_student(build_teacher, seed=2)), rtol=0, atol=0)
    assert not torch.equal(logits(student), logits(tiny_student(build_teacher, seed=1)))

    make_run(run, build_teacher, tiny_tokenizer, {3: 3})  # stage 3 finishes
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rwkvinside"):
        assert resolve_student_folder(run) == run / "stage3" / "student"
    assert any("stage3" in r.getMessage() for r in caplog.records)
    assert read_metadata(run)["stage"] == 3
    # A stage's student folder itself is taken as it is.
    assert resolve_student_folder(run / "stage1" / "student") == run / "stage1" / "student"


def test_only_stage_1_finished(build_teacher, tiny_tokenizer, tmp_path):
    run = make_run(tmp_path / "run", build_teacher, tiny_tokenizer, {1: 1})
    assert resolve_student_folder(run) == run / "stage1" / "student"


def unfinished_run(tmp_path: Path) -> Path:
    run = tmp_path / "unfinished"
    (run / "stage1" / "checkpoint-000005").mkdir(parents=True)
    (run / "stage1" / "student.tmp").mkdir()  # a save that never completed
    (run / "run.json").write_text("{}")
    return run


def test_a_run_folder_without_a_finished_stage_is_refused(tmp_path, capsys):
    run = unfinished_run(tmp_path)
    with pytest.raises(UserError, match="has no finished stage yet") as error:
        load_student(run)
    assert "\n" not in str(error.value) and str(run) in str(error.value)
    err = _cli_error(["export", "--checkpoint", str(run), "--output", str(tmp_path / "out")], capsys)
    assert "has no finished stage yet" in err
    assert not (tmp_path / "out").exists()


def test_the_refusal_of_an_unfinished_run_names_the_command_that_finishes_it(tmp_path):
    run = unfinished_run(tmp_path)
    with pytest.raises(UserError) as error:
        resolve_student_folder(run)
    assert f"rwkvinside distill --output {run} --resume" in str(error.value)


def test_export_takes_a_run_folder(build_teacher, tiny_tokenizer, tmp_path, capsys, caplog):
    run = make_run(tmp_path / "run", build_teacher, tiny_tokenizer, {1: 1, 2: 2})
    with caplog.at_level(logging.INFO, logger="rwkvinside"):
        assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "out"),
                     "--dtype", "fp32"]) == 0
    assert any("stage2" in r.getMessage() for r in caplog.records)
    metadata = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    assert metadata["stage"] == 2 and metadata["export"]["source"] == str(run / "stage2" / "student")
    exported, _, _ = load_student(tmp_path / "out")
    torch.testing.assert_close(logits(exported), logits(tiny_student(build_teacher, seed=2)), rtol=0, atol=0)


# ---- the model card ------------------------------------------------------------------------------------


def eval_report(file_name: str) -> dict:
    """An `rwkvinside eval` report (eval.json) for one held-out file."""
    return {"model": "runs/x", "run": None, "teacher": "tiny-teacher", "seq_len": 48, "teacher_context": 512,
            "files": [{"path": f"/data/{file_name}", "tokens": 960, "student_ppl": 61.25, "teacher_ppl": 50.5,
                       "agreement": 0.625, "kl": 0.1234}],
            "passkey": {"trials": 2, "rows": [{"tokens": 200, "multiple": 4.0, "student": 0.5, "teacher": 1.0,
                                               "past_teacher_context": False}]}}


def heldout(student_ppl: float, teacher_ppl: float | None) -> list[dict]:
    with_teacher = teacher_ppl is not None
    return [{"path": "/data/heldout.txt", "tokens": 960, "student_ppl": student_ppl,
             "teacher_ppl": teacher_ppl, "agreement": 0.5 if with_teacher else None,
             "kl": 0.25 if with_teacher else None}]


# report.json as the pipeline writes it (read back from JSON: the stage numbers are strings).
DISTILLATION_REPORT = {
    "output": "runs/x",
    "baseline": {"teacher": heldout(50.31, None), "fresh_student": heldout(186578.25, 50.31)},
    "stages": {"1": {"stage": 1, "name": "alignment", "ended_by": "max_steps",
                     "heldout": heldout(145.61, 50.31)},
               "2": {"stage": 2, "name": "distillation", "ended_by": "max_tokens",
                     "heldout": heldout(118.34, 50.31)}},
}


def test_model_card_shows_the_eval_report(exported_dir):
    config = RWKVInsideConfig.from_pretrained(exported_dir)
    card = model_card(config, PROVENANCE, evaluation=eval_report("heldout.txt"))
    assert "## Measured retention" in card and "| heldout.txt |" in card
    assert "61.25" in card and "50.50" in card and "62.5%" in card and "0.1234" in card
    assert "tiny-teacher" in card and "| 200 |" in card  # the passkey table
    assert card.index("## Measured retention") < card.index("## Usage")
    assert "## Measured retention" not in model_card(config, PROVENANCE)


def test_model_card_summarises_the_distillation_report(exported_dir):
    """The held-out perplexities of the run's report.json: teacher, freshly converted, final student."""
    config = RWKVInsideConfig.from_pretrained(exported_dir)
    card = model_card(config, PROVENANCE, distillation=DISTILLATION_REPORT)
    assert "## Measured retention" in card
    figures = card.replace(",", "")  # however the thousands are written
    assert "50.31" in figures and "186578.25" in figures and "118.34" in figures
    assert "145.61" not in figures  # the final stage's student, not an earlier one


def test_model_card_of_an_all_rwkv_student(build_teacher, tmp_path):
    config = tiny_student(build_teacher, layers=None).config
    card = model_card(config, {"teacher": "tiny-random"})
    assert "4 of its 4 attention layers" in card and "No softmax attention is left" in card
    assert "(no distillation history recorded)" in card


def write_reports(run: Path, eval_file_name: str) -> None:
    (run / "eval").mkdir(parents=True, exist_ok=True)
    (run / "eval" / "eval.json").write_text(json.dumps(eval_report(eval_file_name)))
    (run / "report.json").write_text(json.dumps(DISTILLATION_REPORT))


def test_the_reports_are_found_through_the_run_in_the_provenance(build_teacher, tiny_tokenizer, tmp_path):
    run = make_run(tmp_path / "run", build_teacher, tiny_tokenizer, {2: 0})
    write_reports(run, "default.txt")
    expected = (eval_report("default.txt"), DISTILLATION_REPORT)
    assert reports_for(str(run), None) == expected
    assert reports_for(str(run / "stage2" / "student"), None) == expected
    given = tmp_path / "given.json"
    given.write_text(json.dumps(eval_report("given.txt")))
    assert reports_for(str(run), str(given)) == (eval_report("given.txt"), DISTILLATION_REPORT)
    # A student outside any run: no report unless one is given.
    outside = tmp_path / "outside"
    save_student(tiny_student(build_teacher), tiny_tokenizer, outside, PROVENANCE)
    assert reports_for(str(outside), None) == (None, None)
    # ... or the one `rwkvinside eval` writes beside it by default (<model>-eval/eval.json).
    (tmp_path / "outside-eval").mkdir()
    (tmp_path / "outside-eval" / "eval.json").write_text(json.dumps(eval_report("beside.txt")))
    assert reports_for(str(outside), None) == (eval_report("beside.txt"), None)


def test_cli_export_card_reads_the_run_eval_report(build_teacher, tiny_tokenizer, tmp_path):
    run = make_run(tmp_path / "run", build_teacher, tiny_tokenizer, {1: 1, 2: 2})
    write_reports(run, "default.txt")
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Measured retention" in card and "| default.txt |" in card


def test_cli_export_eval_report_option(build_teacher, tiny_tokenizer, student_dir, tmp_path):
    given = tmp_path / "given.json"
    given.write_text(json.dumps(eval_report("given.txt")))
    # A student of no run: the card shows the report given.
    assert main(["export", "--checkpoint", str(student_dir), "--output", str(tmp_path / "plain"),
                 "--eval-report", str(given)]) == 0
    card = (tmp_path / "plain" / "README.md").read_text()
    assert "## Measured retention" in card and "| given.txt |" in card
    # A run with its own eval report: the one given wins.
    run = make_run(tmp_path / "run", build_teacher, tiny_tokenizer, {2: 0})
    write_reports(run, "default.txt")
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "from-run"),
                 "--eval-report", str(given)]) == 0
    card = (tmp_path / "from-run" / "README.md").read_text()
    assert "| given.txt |" in card and "| default.txt |" not in card


def test_a_missing_eval_report_is_one_error_line(student_dir, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "eval.json"
    err = _cli_error(["export", "--checkpoint", str(student_dir), "--output", str(tmp_path / "out"),
                      "--eval-report", str(missing)], capsys)
    assert "--eval-report" in err and str(missing) in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_a_corrupt_eval_report_is_one_error_line(build_teacher, tiny_tokenizer, tmp_path, capsys):
    run = make_run(tmp_path / "run", build_teacher, tiny_tokenizer, {2: 0})
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text("{not json")
    err = _cli_error(["export", "--checkpoint", str(run), "--output", str(tmp_path / "out")], capsys)
    assert "eval.json is not a JSON report" in err and "--eval-report" in err


@pytest.mark.slow
def test_the_embedded_teacher_exports_and_loads_as_remote_code(tmp_path, remote_code_cache):
    """SmolLM2-135M (9 query / 3 key-value heads, its own tokenizer and chat template), 3 of 30 layers
    kept as attention: the remote-code model gives the toolkit's logits."""
    from rwkvinside.modeling.convert import ConversionSpec, convert
    from rwkvinside.modeling.loading import embedded_teacher_path, load_teacher

    try:
        embedded_teacher_path()
    except UserError as error:
        pytest.skip(str(error))

    teacher, tokenizer = load_teacher("smollm2-135m")
    student = convert(teacher, ConversionSpec(layers=tuple(i for i in range(30) if i % 10))).eval()
    save_student(student, tokenizer, tmp_path / "student", PROVENANCE)
    folder = export_student(tmp_path / "student", tmp_path / "exported", dtype="fp32")
    exported = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert exported.config.vocab_size == teacher.config.vocab_size
    assert exported.config.num_hidden_layers == 30
    prompt = AutoTokenizer.from_pretrained(folder, trust_remote_code=True).apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True)
    with torch.no_grad():
        torch.testing.assert_close(exported(prompt["input_ids"]).logits, student(prompt["input_ids"]).logits,
                                   rtol=1e-4, atol=1e-4)
