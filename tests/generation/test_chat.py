"""`rwkvinside generate` and `rwkvinside chat`: the state carries over between turns."""

import io
import logging

import pytest
import torch
from torch._dynamo.utils import counters
from export.students import make_run, tiny_student

from rwkvinside.cli import main
from rwkvinside.generation.chat import ChatSession, generate_text, sampling_options
from rwkvinside.generation.loading import load_model, warn_if_longer_than_seen
from rwkvinside.modeling.student_folder import save_student

GREEDY = {"max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0}


def test_chat_feeds_only_each_turns_new_tokens(student_dir):
    model, tokenizer, _ = load_model(student_dir)
    fed = []

    def record(body, args, kwargs):
        fed.append(kwargs["input_ids"].shape[1])

    model.model.register_forward_pre_hook(record, with_kwargs=True)  # the base model (e.g. LlamaModel)
    session = ChatSession(model, tokenizer, sampling_options(tokenizer, **GREEDY))
    session.reply("To be, or not to be?")
    history, text = session.ids.shape[1], session.text
    fed.clear()
    session.reply("The quick brown fox.")

    rendered = tokenizer.apply_chat_template(session.messages[:-1], tokenize=False,
                                             add_generation_prompt=True)
    new = len(tokenizer(rendered[len(text):], add_special_tokens=False)["input_ids"])
    assert fed[0] == new + 1  # the turn's own tokens, and the last answer token (generated, never read)
    # The carried state answers as reading the whole conversation afresh does.
    prompt = session.ids[:, :history + new]
    fresh = model.generate(prompt, attention_mask=torch.ones_like(prompt), **session.options)
    assert torch.equal(fresh, session.ids)


@pytest.mark.parametrize("folder", ["student_dir", "exported_dir"])
def test_cli_chat_reads_turns_from_stdin(folder, request, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nOnce upon a time\n"))
    model = str(request.getfixturevalue(folder))
    assert main(["chat", "--model", model, "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("> ") == 3  # two turns answered, then end of input


def test_cli_generate_warns_past_the_trained_length(student_dir, capsys, caplog):
    prompt = "The quick brown fox jumps over the lazy dog. " * 30  # past the tiny teacher's 512 positions
    with caplog.at_level(logging.WARNING):
        status = main(["generate", "--model", str(student_dir), "--prompt", prompt, "--max-new-tokens", "3"])
    assert status == 0
    assert capsys.readouterr().out.startswith(prompt)
    assert any("longer than the teacher's context" in r.getMessage() for r in caplog.records)


def test_a_system_message_opens_the_conversation(student_dir):
    model, tokenizer, _ = load_model(student_dir)
    session = ChatSession(model, tokenizer, sampling_options(tokenizer, **GREEDY), system="Be brief.")
    answer = session.reply("Hello")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert session.messages[-1]["content"] == answer
    assert session.text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_generate_text_continues_the_prompt_greedily(student_dir):
    model, tokenizer, _ = load_model(student_dir)
    options = sampling_options(tokenizer, **GREEDY)
    text = generate_text(model, tokenizer, "Once upon a time", **options)
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    expected = greedy(model, ids, options["max_new_tokens"])
    assert text == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


def test_cli_generate_with_compiled_mixers_says_what_it_says_without(student_dir, capsys):
    args = ["generate", "--model", str(student_dir), "--prompt", "Once upon a time", "--max-new-tokens", "6",
            "--temperature", "0", "--device", "cpu"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    torch._dynamo.reset()  # no compiled code or recompilation count left from other tests
    counters.clear()
    assert main([*args, "--compile"]) == 0
    assert counters["stats"]["unique_graphs"] >= 1  # the mixers did run compiled
    assert capsys.readouterr().out == eager


def greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes, no cache (the model emits no stop token here)."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_cli_generate_takes_a_run_folder(build_teacher, tiny_tokenizer, tmp_path, capsys, caplog):
    """The last finished stage's student (named in a log line) generates, as its own folder would."""
    run = make_run(tmp_path / "run", build_teacher, tiny_tokenizer, {1: 1, 2: 2})
    args = ["--prompt", "Once upon a time", "--max-new-tokens", "5", "--device", "cpu"]
    with caplog.at_level(logging.INFO, logger="rwkvinside"):
        assert main(["generate", "--model", str(run), *args]) == 0
    from_run = capsys.readouterr().out
    assert any("stage2" in r.getMessage() for r in caplog.records)
    assert main(["generate", "--model", str(run / "stage2" / "student"), *args]) == 0
    assert capsys.readouterr().out == from_run
    assert main(["generate", "--model", str(run / "stage1" / "student"), *args]) == 0
    assert capsys.readouterr().out != from_run  # the stages' students differ: the right one was taken


def test_cli_generate_refuses_a_run_without_a_finished_stage(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "stage1").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    capsys.readouterr()
    assert main(["generate", "--model", str(run), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("rwkvinside: error:") and "no finished stage" in err


def test_cli_generate_warns_past_the_distilled_length(build_teacher, tiny_tokenizer, tmp_path, capsys,
                                                      caplog):
    student = tiny_student(build_teacher)
    student.config.trained_context = 32  # saved in config.json, as a stage records it
    save_student(student, tiny_tokenizer, tmp_path / "student", {"teacher": "tiny-random"})
    prompt = "The quick brown fox jumps over the lazy dog. " * 3  # past 32 tokens, within 512
    with caplog.at_level(logging.WARNING):
        assert main(["generate", "--model", str(tmp_path / "student"), "--prompt", prompt,
                     "--max-new-tokens", "3"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("the 32-token sequences the student was distilled on" in m for m in messages), messages
    assert not any("longer than the teacher's context" in m for m in messages)


def test_no_warning_about_the_teacher_context_without_attention_layers(build_teacher, caplog):
    """An all-RWKV student keeps no attention layer bound to the teacher's positions."""
    with caplog.at_level(logging.WARNING):
        warn_if_longer_than_seen(600, tiny_student(build_teacher, layers=None))
        assert not caplog.records
        warn_if_longer_than_seen(600, tiny_student(build_teacher))
    assert any("longer than the teacher's context of 512" in r.getMessage() for r in caplog.records)
