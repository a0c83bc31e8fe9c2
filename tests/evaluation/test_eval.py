"""`rwkvinside eval`: student and teacher side by side, passkey retrieval, the report files."""

import json
import math

import pytest
import torch
from export.students import PROVENANCE, tiny_student

from rwkvinside.cli import main
from rwkvinside.data import heldout_batches
from rwkvinside.errors import UserError
from rwkvinside.evaluation.compare import Side, compare_on_file
from rwkvinside.evaluation.evaluate import evaluate
from rwkvinside.evaluation.passkey import passkey_prompt, recalled
from rwkvinside.evaluation.perplexity import perplexity, teacher_hidden_fn
from rwkvinside.export.export import export_student
from rwkvinside.modeling.student import save_student

TEXT = "To be, or not to be, that is the question. The quick brown fox jumps over the lazy dog. " * 12
SEQ_LEN = 48


@pytest.fixture(scope="module")
def teacher_dir(build_teacher, tiny_tokenizer, tmp_path_factory):
    """The tiny teacher the student was converted from, as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("teacher")
    build_teacher("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    path.write_text(TEXT)
    return path


def test_scores_match_the_perplexity_of_the_training_code(build_teacher, tiny_tokenizer, text_file):
    student, teacher = tiny_student(build_teacher), build_teacher("llama")
    scores = compare_on_file(text_file, Side(student.hidden_states, student.lm_head),
                             Side(teacher_hidden_fn(teacher), teacher.lm_head), tiny_tokenizer, SEQ_LEN, 2,
                             torch.device("cpu"))
    for hidden, head, key in ((student.hidden_states, student.lm_head, "student_ppl"),
                              (teacher_hidden_fn(teacher), teacher.lm_head, "teacher_ppl")):
        expected, tokens = perplexity(hidden, head, heldout_batches([text_file], tiny_tokenizer, SEQ_LEN, 2),
                                      torch.device("cpu"))
        assert scores["tokens"] == tokens and math.isclose(scores[key], expected, rel_tol=1e-5)
    assert 0 <= scores["agreement"] <= 1 and scores["kl"] > 0

    itself = compare_on_file(text_file, Side(teacher_hidden_fn(teacher), teacher.lm_head),
                             Side(teacher_hidden_fn(teacher), teacher.lm_head), tiny_tokenizer, SEQ_LEN, 2,
                             torch.device("cpu"))
    assert itself["agreement"] == 1 and abs(itself["kl"]) < 1e-6


def test_passkey_prompt_has_the_asked_length_and_hides_the_key(tiny_tokenizer):
    ids = passkey_prompt(tiny_tokenizer, 300, key=42424, depth=0.3)
    assert ids.shape == (1, 300)
    text = tiny_tokenizer.decode(ids[0])
    assert "42424" in text and text.rstrip().endswith("The pass key is")
    assert recalled(" 42424. Remember", 42424)
    assert not recalled(" 4242 4", 42424) and not recalled("none", 42424)


def test_evaluate_reports_student_and_teacher(student_dir, teacher_dir, text_file):
    report = evaluate(student_dir, [text_file], teacher=str(teacher_dir), seq_len=SEQ_LEN,
                      lengths=[200, 600], trials=2)
    assert report["teacher"] == str(teacher_dir) and report["teacher_context"] == 512
    (scores,) = report["files"]
    assert scores["student_ppl"] > 1 and scores["teacher_ppl"] > 1 and scores["kl"] > 0
    rows = report["passkey"]["rows"]
    assert [(r["tokens"], r["past_teacher_context"]) for r in rows] == [(200, False), (600, True)]
    assert all(r["student"] in (0, 0.5, 1) and r["teacher"] in (0, 0.5, 1) for r in rows)


def test_cli_eval_writes_the_report_and_the_export_card_reads_it(build_teacher, tiny_tokenizer, teacher_dir,
                                                                 text_file, tmp_path, capsys):
    # A checkpoint inside a run folder: the report goes to the run's eval/ folder by default.
    run = tmp_path / "run"
    (run / "stage2").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    checkpoint = run / "stage2" / "student"
    provenance = {**PROVENANCE, "teacher": str(teacher_dir)}
    save_student(tiny_student(build_teacher), tiny_tokenizer, checkpoint, provenance)
    assert main(["eval", "--model", str(checkpoint), "--data", str(text_file), "--seq-len", "40",
                 "--passkey-lengths", "200", "600", "--passkey-trials", "1"]) == 0
    out = capsys.readouterr().out
    assert "student ppl" in out and "600" in out and "*" in out  # past the teacher's context: marked
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["seq_len"] == 40 and report["teacher"] == str(teacher_dir)
    assert (run / "eval" / "passkey.png").stat().st_size > 0
    assert "![passkey recall](passkey.png)" in (run / "eval" / "eval.md").read_text()

    card = (export_student(checkpoint, tmp_path / "exported") / "README.md").read_text()
    assert "## Measured retention" in card and "| heldout.txt |" in card


def test_passkey_length_zero_is_a_user_error(student_dir, text_file, capsys):
    with pytest.raises(UserError, match="passkey length 0"):
        evaluate(student_dir, [text_file], lengths=[0])
    assert main(["eval", "--model", str(student_dir), "--data", str(text_file), "--seq-len", "0"]) == 2
    assert "--seq-len must be a positive" in capsys.readouterr().err
