"""The command line: flags become config overrides; user errors are one line and exit status 2."""

import pytest

from rwkvinside import cli
from rwkvinside.config import load_config
from rwkvinside.errors import UserError


def config_of(*argv: str):
    args = cli.build_parser().parse_args(["distill", *argv])
    return load_config(overrides=cli.distill_overrides(args))


def test_distill_help_explains_overrides(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["distill", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "KEY=VALUE" in out and "--init-from" in out and "--resume" in out


def test_flags_become_overrides():
    config = config_of("--teacher", "/models/llama", "--data", "a.txt", "dir with space/", "it's.jsonl",
                       "--seq-len", "64", "--batch-size", "3", "--save-every", "10", "--max-steps", "7",
                       "--max-tokens", "5000")
    assert config.teacher.source == "/models/llama"
    assert config.data.train == ["a.txt", "dir with space/", "it's.jsonl"]
    assert (config.data.seq_len, config.train.batch_size, config.checkpoint.save_every) == (64, 3, 10)
    for number in (1, 2, 3):
        assert (config.stage(number).max_steps, config.stage(number).max_tokens) == (7, 5000)


def test_a_token_budget_flag_alone_is_not_capped_by_the_default_steps():
    stage = config_of("--max-tokens", "100000").stage1
    assert (stage.max_tokens, stage.max_steps) == (100000, 0)


def test_a_budget_flag_replaces_the_budget_a_config_file_sets(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage1:\n  max_steps: 60\n  max_time: 30\n", encoding="utf-8")
    args = cli.build_parser().parse_args(["distill", "--max-tokens", "100000"])
    stage = load_config(path, cli.distill_overrides(args)).stage1
    assert (stage.max_tokens, stage.max_steps, stage.max_time) == (100000, 0, 0)


def test_flags_win_over_positional_overrides():
    config = config_of("data.seq_len=128", "train.grad_accum=4", "--seq-len", "32")
    assert config.data.seq_len == 32 and config.train.grad_accum == 4


@pytest.mark.parametrize("teacher", ["2024", "models/qwen: v2", "null"])
def test_any_teacher_path_is_taken_as_a_string(teacher):
    assert config_of("--teacher", teacher).teacher.source == teacher


def test_a_user_error_is_one_line_and_status_2(monkeypatch, capsys):
    def fail(args):
        raise UserError("the thing is wrong; fix it")

    monkeypatch.setattr(cli, "run_distill", fail)
    assert cli.main(["-q", "distill"]) == 2
    assert capsys.readouterr().err == "rwkvinside: error: the thing is wrong; fix it\n"


def test_an_interrupt_is_status_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_distill", interrupted)
    assert cli.main(["distill"]) == 130
    assert capsys.readouterr().err == "rwkvinside: interrupted\n"


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["distil"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
