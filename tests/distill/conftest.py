"""Fixtures of the distillation tests: a tiny Llama teacher, saved once per session as an HF folder."""

import importlib.util
from pathlib import Path

import pytest
import torch


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


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """The models are tiny: threads only add overhead on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
