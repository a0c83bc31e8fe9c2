"""`rwkvinside generate` and `rwkvinside chat`: the state carries over between turns."""

import io
import logging

import pytest
import torch

from rwkvinside.cli import main
from rwkvinside.generation.chat import ChatSession, sampling_options
from rwkvinside.generation.loading import load_model

GREEDY = {"max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0}


def test_chat_feeds_only_each_turns_new_tokens(student_dir):
    model, tokenizer, metadata = load_model(student_dir)
    fed = []
    def record(body, args, kwargs):
        fed.append(kwargs["input_ids"].shape[1])

    model.model.base_model.register_forward_pre_hook(record, with_kwargs=True)
    session = ChatSession(model, tokenizer, metadata, sampling_options(tokenizer, **GREEDY))
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
