"""Fixtures: a text corpus folder and a chat JSONL file in tmp_path."""

from pathlib import Path

import pytest

from .helpers import CONVERSATIONS, write_docs, write_jsonl


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    write_docs(tmp_path / "corpus")
    return tmp_path / "corpus"


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages} for messages in CONVERSATIONS])
