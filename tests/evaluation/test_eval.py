"""`rwkvinside eval`: student and teacher side by side, passkey retrieval, the report files."""

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from export.students import make_run, tiny_student
from transformers import AutoModelForCausalLM

from rwkvinside.cli import main
from rwkvinside.data import IGNORE_INDEX, heldout_batches
from rwkvinside.errors import UserError
from rwkvinside.evaluation.compare import WINDOW_START, compare, compare_on_file, seen_before
from rwkvinside.evaluation.evaluate import evaluate
from rwkvinside.evaluation.passkey import passkey_prompt, recalled
from rwkvinside.export.export import export_student
from rwkvinside.modeling.student_folder import save_student

TEXT = "To be, or not to be, that is the question. The quick brown fox jumps over the lazy dog. " * 12
SEQ_LEN = 48
CPU = torch.device("cpu")


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


@torch.no_grad()
def reference_scores(student, teacher, batches, select=None) -> dict:
    """The figures `compare` reports, computed here the plain way: full-vocabulary logits of whole
    batches from each model's own forward pass, in float64, over the target positions (those that
    select(ids, labels) -> [B, T] bool picks, if given)."""
    tokens, student_ce, teacher_ce, agree, kl = 0, 0.0, 0.0, 0, 0.0
    for batch in batches:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        target = labels != IGNORE_INDEX
        if select is not None:
            target &= select(ids, labels)
        ours = student(ids, attention_mask=mask, use_cache=False).logits.double()[target]  # [n, V]
        theirs = teacher(ids, attention_mask=mask, use_cache=False).logits.double()[target]
        tokens += int(target.sum())
        student_ce += F.cross_entropy(ours, labels[target], reduction="sum").item()
        teacher_ce += F.cross_entropy(theirs, labels[target], reduction="sum").item()
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        log_p, log_q = theirs.log_softmax(-1), ours.log_softmax(-1)
        kl += (log_p.exp() * (log_p - log_q)).sum().item()
    return {"tokens": tokens, "student_ppl": math.exp(student_ce / tokens),
            "teacher_ppl": math.exp(teacher_ce / tokens), "agreement": agree / tokens, "kl": kl / tokens}


def test_scores_match_an_independent_computation(build_teacher, tiny_tokenizer, text_file):
    """compare's perplexities, agreement and KL (chunked head, the training loss's scoring) equal a plain
    full-logits cross-entropy over the same held-out batches, for the student and for the teacher."""
    student, teacher = tiny_student(build_teacher), build_teacher("llama")
    scores = compare_on_file(text_file, student, teacher, tiny_tokenizer, SEQ_LEN, 2, CPU, chunk=16)
    expected = reference_scores(student, teacher, heldout_batches([text_file], tiny_tokenizer, SEQ_LEN, 2))
    assert scores["path"] == str(text_file)
    assert scores["tokens"] == expected["tokens"] > SEQ_LEN * 2  # several batches, the last one padded
    for key in ("student_ppl", "teacher_ppl"):
        assert math.isclose(scores[key], expected[key], rel_tol=1e-5), (key, scores[key], expected[key])
    assert scores["student_ppl"] != scores["teacher_ppl"]
    assert abs(scores["agreement"] - expected["agreement"]) * expected["tokens"] <= 1  # at most one near-tie
    assert 0 <= scores["agreement"] < 1
    assert math.isclose(scores["kl"], expected["kl"], rel_tol=1e-4) and scores["kl"] > 0
    # Parts of the targets: each window's first WINDOW_START; those the input held at or before their
    # position (a plain loop here), and the others.
    selections = {"start": lambda ids, labels: torch.arange(labels.shape[1]) < WINDOW_START,
                  "seen": seen_by_a_plain_loop, "unseen": lambda ids, labels: ~seen_by_a_plain_loop(ids, labels)}
    for part, select in selections.items():
        batches = heldout_batches([text_file], tiny_tokenizer, SEQ_LEN, 2)
        part_expected = reference_scores(student, teacher, batches, select)
        assert 0 < scores[part]["tokens"] == part_expected["tokens"] < scores["tokens"], part
        for key in ("student_ppl", "teacher_ppl"):
            assert math.isclose(scores[part][key], part_expected[key], rel_tol=1e-5), (part, key)
        assert math.isclose(scores[part]["kl"], part_expected["kl"], rel_tol=1e-4), part
        assert abs(scores[part]["agreement"] - part_expected["agreement"]) * part_expected["tokens"] <= 1, part
    assert scores["seen"]["tokens"] + scores["unseen"]["tokens"] == scores["tokens"]

    itself = compare_on_file(text_file, teacher, teacher, tiny_tokenizer, SEQ_LEN, 2, CPU)
    assert itself["agreement"] == 1 and abs(itself["kl"]) < 1e-6
    assert itself["student_ppl"] == itself["teacher_ppl"]
    assert math.isclose(itself["teacher_ppl"], expected["teacher_ppl"], rel_tol=1e-5)


def seen_by_a_plain_loop(ids, labels) -> torch.Tensor:
    """[B, T] bool: whether each target is a token the input held at or before its position."""
    return torch.tensor([[int(label) != IGNORE_INDEX and int(label) in row[:t + 1].tolist()
                          for t, label in enumerate(targets)] for row, targets in zip(ids, labels)])


def test_seen_before_marks_the_targets_the_input_already_held():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (3, 40), generator=generator)
    labels = torch.randint(0, 20, (3, 40), generator=generator)
    labels[0, -5:] = IGNORE_INDEX  # padding: never a target
    expected = seen_by_a_plain_loop(ids, labels)
    assert torch.equal(seen_before(ids, labels), expected)
    assert 0 < int(expected.sum()) < 3 * 40


def test_compare_without_a_teacher_and_with_a_token_budget(build_teacher, tiny_tokenizer, text_file):
    student = tiny_student(build_teacher)
    alone = compare_on_file(text_file, student, None, tiny_tokenizer, SEQ_LEN, 2, CPU)
    assert alone["teacher_ppl"] is None and alone["agreement"] is None and alone["kl"] is None
    teacher = build_teacher("llama")
    with_teacher = compare_on_file(text_file, student, teacher, tiny_tokenizer, SEQ_LEN, 2, CPU)
    assert math.isclose(alone["student_ppl"], with_teacher["student_ppl"], rel_tol=1e-6)
    # A budget stops after the batch that reaches it: one batch of 2 windows here.
    batches = list(heldout_batches([text_file], tiny_tokenizer, SEQ_LEN, 2))
    budget = compare(student, None, batches, CPU, max_tokens=SEQ_LEN)
    first = reference_scores(student, student, batches[:1])
    assert budget["tokens"] == first["tokens"] == 2 * SEQ_LEN
    assert math.isclose(budget["student_ppl"], first["student_ppl"], rel_tol=1e-5)


def test_a_student_with_a_lead_is_scored_reading_its_lead(build_teacher, tiny_tokenizer, text_file, tmp_path,
                                                          remote_code_cache):
    """convert.lead: evaluation scores the student as its forward runs (the EOS read first), not its body
    alone, which reads input it was never trained on; the same for its export through remote code."""
    student, teacher = tiny_student(build_teacher, layers=None), build_teacher("llama")
    student.config.lead_token_id = tiny_tokenizer.eos_token_id
    scores = compare_on_file(text_file, student, teacher, tiny_tokenizer, SEQ_LEN, 2, CPU, chunk=16)
    expected = reference_scores(student, teacher, heldout_batches([text_file], tiny_tokenizer, SEQ_LEN, 2))
    for key in ("student_ppl", "kl"):
        assert math.isclose(scores[key], expected[key], rel_tol=1e-4), (key, scores[key], expected[key])
    student.config.lead_token_id = None
    unled = compare_on_file(text_file, student, teacher, tiny_tokenizer, SEQ_LEN, 2, CPU, chunk=16)
    assert not math.isclose(unled["student_ppl"], scores["student_ppl"], rel_tol=1e-3)  # the lead mattered

    student.config.lead_token_id = tiny_tokenizer.eos_token_id
    save_student(student, tiny_tokenizer, tmp_path / "student", {"teacher": "tiny-random"})
    exported = AutoModelForCausalLM.from_pretrained(export_student(tmp_path / "student", tmp_path / "exported",
                                                                   dtype="fp32"), trust_remote_code=True).eval()
    theirs = compare_on_file(text_file, exported, teacher, tiny_tokenizer, SEQ_LEN, 2, CPU, chunk=16)
    assert math.isclose(theirs["student_ppl"], scores["student_ppl"], rel_tol=1e-5)


def test_compare_scores_an_export_loaded_through_remote_code(build_teacher, tiny_tokenizer, text_file,
                                                            exported_dir, remote_code_cache):
    """Models are any causal LMs: the exported student scores as the student it came from."""
    exported = AutoModelForCausalLM.from_pretrained(exported_dir, trust_remote_code=True).eval()
    teacher = build_teacher("llama")
    theirs = compare_on_file(text_file, exported, teacher, tiny_tokenizer, SEQ_LEN, 2, CPU)
    ours = compare_on_file(text_file, tiny_student(build_teacher), teacher, tiny_tokenizer, SEQ_LEN, 2, CPU)
    assert theirs["tokens"] == ours["tokens"]
    for key in ("student_ppl", "teacher_ppl", "agreement", "kl"):
        assert math.isclose(theirs[key], ours[key], rel_tol=1e-5, abs_tol=1e-7), key


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
                                                                 text_file, tmp_path, capsys, caplog):
    # A run folder (its last stage's student, which records the run): the report goes to the run's
    # eval/ folder by default, and the export of the run finds it there for the model card.
    run = make_run(tmp_path / "run", build_teacher, tiny_tokenizer, {1: 1, 2: 0},
                   provenance={"teacher": str(teacher_dir)})
    with caplog.at_level(logging.INFO, logger="rwkvinside"):
        assert main(["eval", "--model", str(run), "--data", str(text_file), "--seq-len", "40",
                     "--passkey-lengths", "200", "600", "--passkey-trials", "1"]) == 0
    assert any("stage2" in r.getMessage() and "stage2/student" in r.getMessage() for r in caplog.records)
    out = capsys.readouterr().out
    assert "student ppl" in out and "600" in out and "*" in out  # past the teacher's context: marked
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["seq_len"] == 40 and report["teacher"] == str(teacher_dir)
    assert report["run"] == str(run.resolve()) and report["model"] == str(run)
    # The stage 2 student (tiny_student seed 0) was scored, not stage 1's.
    expected = compare_on_file(text_file, tiny_student(build_teacher), build_teacher("llama"), tiny_tokenizer,
                               40, 1, CPU)
    assert math.isclose(report["files"][0]["student_ppl"], expected["student_ppl"], rel_tol=1e-5)
    assert (run / "eval" / "passkey.png").stat().st_size > 0
    markdown = (run / "eval" / "eval.md").read_text()
    assert "![passkey recall](passkey.png)" in markdown
    assert f"The same over parts of the targets: the first {WINDOW_START} of each window" in markdown
    assert markdown.count("| heldout.txt |") == 1 + 3  # whole windows, then their three parts
    assert "| heldout.txt | seen earlier in the window |" in markdown

    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "exported")]) == 0
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "## Measured retention" in card and "| heldout.txt |" in card


def test_eval_of_a_student_outside_a_run_writes_beside_it(build_teacher, tiny_tokenizer, text_file, tmp_path,
                                                          capsys, caplog):
    """No run recorded: the report goes to <model>-eval; no teacher recorded or given: the student alone."""
    student = tmp_path / "student"
    save_student(tiny_student(build_teacher), tiny_tokenizer, student, {"stage": 2})
    with caplog.at_level(logging.WARNING):
        assert main(["eval", "--model", str(student), "--data", str(text_file), "--seq-len", "40",
                     "--passkey-lengths", "200", "--passkey-trials", "1"]) == 0
    assert any("evaluating the student alone" in r.getMessage() for r in caplog.records)
    report = json.loads((tmp_path / "student-eval" / "eval.json").read_text())
    assert report["run"] is None and report["teacher"] is None
    assert report["files"][0]["teacher_ppl"] is None and report["files"][0]["student_ppl"] > 1
    assert [row["teacher"] for row in report["passkey"]["rows"]] == [None]


def test_passkey_length_zero_is_a_user_error(student_dir, text_file, capsys):
    with pytest.raises(UserError, match="passkey length 0"):
        evaluate(student_dir, [text_file], lengths=[0])
    with pytest.raises(UserError, match="--seq-len must be a positive"):
        evaluate(student_dir, [text_file], seq_len=0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # the command line refuses it before loading anything
        main(["eval", "--model", str(student_dir), "--data", str(text_file), "--seq-len", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("rwkvinside: error:") and "--seq-len" in err


def test_eval_refuses_a_run_without_a_finished_stage(text_file, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "stage1").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    with pytest.raises(UserError, match="no finished stage"):
        evaluate(run, [text_file])
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--data", str(text_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no finished stage" in err
