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


# ---- overrides wherever they stand ----------------------------------------------------------------

def distill_call(monkeypatch, argv: list[str]) -> dict:
    """The arguments `rwkvinside distill ...` hands to the pipeline (which does not run)."""
    from rwkvinside.distill import pipeline

    seen = {}

    def fake(config_path, overrides, stage, output, init_from, resume, overwrite):
        seen.update(config=load_config(config_path, overrides), overrides=overrides, init_from=init_from)
        return None

    monkeypatch.setattr(pipeline, "distill", fake)
    assert cli.main(argv) == 0
    return seen


def test_an_override_after_the_data_paths_is_an_override(monkeypatch):
    config = distill_call(monkeypatch, ["distill", "--data", "a.txt", "b.txt", "stage1.max_steps=2"])["config"]
    assert config.data.train == ["a.txt", "b.txt"] and config.stage1.max_steps == 2


def test_overrides_before_and_between_options(monkeypatch):
    config = distill_call(monkeypatch, ["-q", "distill", "stage2.lr=3e-5", "--data", "a.txt",
                                        "data.seq_len=64", "--batch-size", "2", "train.grad_accum=4"])["config"]
    assert (config.stage2.lr, config.data.seq_len, config.train.batch_size, config.train.grad_accum) == (
        3e-5, 64, 2, 4)
    assert config.data.train == ["a.txt"]


def test_a_path_with_an_equals_sign_stays_a_path(monkeypatch, tmp_path):
    """A Parquet partition folder is named key=value: without a config section it is no override."""
    folder = tmp_path / "year=2024"
    folder.mkdir()
    config = distill_call(monkeypatch, ["distill", "--data", str(folder), "a=b.txt", "stage1.max_steps=5"])["config"]
    assert config.data.train == [str(folder), "a=b.txt"] and config.stage1.max_steps == 5


def test_only_distill_reads_overrides():
    argv = ["generate", "--model", "m", "--prompt", "stage1.max_steps=2 is a prompt"]
    assert cli.split_overrides(argv) == (argv, [])
    assert cli.build_parser().parse_args(["generate", "--model", "m", "--prompt", "a=b"]).prompt == "a=b"


def test_a_misspelt_override_is_named_with_a_suggestion(tmp_path, capsys):
    output = tmp_path / "run"
    assert cli.main(["distill", "--data", "a.txt", "stage1.max_step=2", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'stage1.max_step'; did you mean 'stage1.max_steps'?" in err
    assert not output.exists()


def test_a_run_folder_is_accepted_for_init_from(monkeypatch, tmp_path):
    """The pipeline resolves it (tests/distill); the command line passes it on as given."""
    seen = distill_call(monkeypatch, ["distill", "--stage", "2", "--init-from", str(tmp_path)])
    assert seen["init_from"] == str(tmp_path)


# ---- a budget on the command line replaces the config's -------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["stage1.max_time=140"], (0, 0, 140.0)),
    (["stage1.max_time=140", "stage1.max_steps=500"], (500, 0, 140.0)),
    (["--max-tokens", "9000"], (0, 9000, 0.0)),
])
def test_a_budget_on_the_command_line_replaces_the_config_files(monkeypatch, tmp_path, argv, expected):
    path = tmp_path / "run.yaml"
    path.write_text("stage1:\n  max_steps: 60\n  lr: 5.0e-4\nstage2:\n  max_steps: 7\n", encoding="utf-8")
    config = distill_call(monkeypatch, ["distill", "--config", str(path), *argv])["config"]
    assert (config.stage1.max_steps, config.stage1.max_tokens, config.stage1.max_time) == expected
    assert config.stage1.lr == 5e-4  # the rest of the section stays
    if not argv[0].startswith("--"):
        assert config.stage2.max_steps == 7  # other stages keep theirs


# ---- -q ---------------------------------------------------------------------------------------------

def test_quiet_leaves_only_warnings_and_the_bars_off(monkeypatch, capfd):
    import logging

    from tqdm.auto import tqdm

    from rwkvinside.modeling.loading import _quiet_unless_informing

    monkeypatch.setattr(cli, "run_distill", lambda args: 0)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # basicConfig configures afresh
    assert cli.main(["-q", "distill"]) == 0
    assert not logging.getLogger("rwkvinside").isEnabledFor(logging.INFO)
    with _quiet_unless_informing():  # what the GGUF loader's own bar sees
        for _ in tqdm(range(3), desc="de-quantizing"):
            pass
    assert "de-quantizing" not in capfd.readouterr().err


# ---- every command refuses a bad argument with one line -------------------------------------------

@pytest.mark.parametrize("argv", [
    ["distill", "--max-steps", "0"],
    ["distill", "--seq-len", "1"],
    ["distill", "--batch-size", "two"],
    ["export", "--checkpoint", "c", "--output", "o", "--dtype", "int8"],
    ["generate", "--model", "m", "--prompt", "p", "--max-new-tokens", "-5"],
    ["generate", "--model", "m", "--prompt", "p", "--top-p", "0"],
    ["generate", "--model", "m", "--prompt", "p", "--temperature", "-1"],
    ["chat", "--model", "m", "--top-p", "1.5"],
    ["eval", "--model", "m", "--data", "d", "--passkey-trials", "0"],
    ["eval", "--model", "m", "--data", "d", "--batch-size", "0"],
    ["eval", "--model", "m", "--data", "d", "--passkey-lengths", "512", "-3"],
    ["eval", "--model", "m", "--data", "d", "--max-tokens", "-1"],
], ids=lambda argv: " ".join(argv[:1] + argv[-2:]))
def test_an_out_of_range_or_malformed_argument_is_one_line(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rwkvinside: error: argument --") and "Traceback" not in err


@pytest.mark.parametrize("command", [["generate", "--prompt", "p"], ["chat"], ["eval", "--data", "d"]])
def test_a_bad_device_or_dtype_is_one_line(tmp_path, capsys, command):
    for option in (["--device", "gpu7"], ["--dtype", "int8"]):
        assert cli.main([command[0], "--model", str(tmp_path), *command[1:], *option]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("rwkvinside: error:")
