"""Fixtures of the distillation tests: a tiny Llama teacher, saved once per session as an HF folder."""

import importlib.util
import json
from pathlib import Path

import pytest


def _root_conftest():
    """tests/conftest.py under a name of its own (several test folders have a module `conftest`)."""
    spec = importlib.util.spec_from_file_location("rwkvinside_tests_root", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROOT = _root_conftest()
TEACHER_LAYERS = 2


def tiny_teacher(seed: int = 0):
    """A random 2-layer Llama (hidden 64, 4 query / 2 key-value heads of 16, vocabulary 320)."""
    return ROOT.build_tiny_teacher("llama", seed=seed, num_layers=TEACHER_LAYERS)


@pytest.fixture(scope="session")
def tokenizer():
    return ROOT.build_tiny_tokenizer()


@pytest.fixture(scope="session")
def teacher_folder(tmp_path_factory, tokenizer) -> Path:
    """The tiny teacher and its tokenizer (with a chat template) as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("teacher")
    tiny_teacher().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


SEQ_LEN, BATCH, STEPS = 32, 2, 3
CONVERSATIONS = [
    [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "Shakespeare did."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again."},
     {"role": "assistant", "content": "Hello again!"}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."}],
    [{"role": "user", "content": "The quick brown fox?"}, {"role": "assistant", "content": "Jumps over the dog."}],
]


@pytest.fixture(scope="session")
def inputs(tmp_path_factory, teacher_folder) -> dict[str, Path]:
    """A teacher folder, a text corpus, a chat file, a second held-out file and a config file with quick
    settings (the corpus and the second file held out)."""
    folder = tmp_path_factory.mktemp("inputs")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(ROOT.TRAINING_TEXT * 3), encoding="utf-8")
    heldout = folder / "heldout.txt"
    heldout.write_text(" ".join(reversed(ROOT.TRAINING_TEXT)) * 2, encoding="utf-8")
    chat = folder / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS), encoding="utf-8")
    config = folder / "quick.yaml"
    config.write_text(f"data:\n  eval: ['{corpus}', '{heldout}']\n  eval_tokens: 64\nlog:\n  progress: false\n"
                      "stage1:\n  warmup_steps: 1\nstage2:\n  warmup_steps: 1\nstage3:\n  warmup_steps: 1\n",
                      encoding="utf-8")
    return {"teacher": teacher_folder, "corpus": corpus, "chat": chat, "heldout": heldout, "config": config}


def distill_args(inputs, output: Path | None, *extra: str, steps: int | None = STEPS) -> list[str]:
    """The command line of a quick run; steps=None leaves the budgets to the config (and `extra`)."""
    args = ["distill", "--config", str(inputs["config"]), "--teacher", str(inputs["teacher"]),
            "--data", str(inputs["corpus"]), "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH)]
    if steps is not None:
        args += ["--max-steps", str(steps)]
    return args + (["--output", str(output)] if output is not None else []) + list(extra)


def error_line(capsys) -> str:
    """The one error line on stderr (progress bars may precede it; a traceback may not)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rwkvinside: error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert "Traceback" not in err
    return lines[0]
