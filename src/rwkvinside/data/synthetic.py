"""Teacher samples on disk (written by `rwkvinside synth`, read as training documents).

An output folder holds Parquet shards and a manifest:

    synth.json              teacher, tokenizer (vocabulary size and fingerprint), sampling settings,
                            tokens requested and written, and the list of finished shards
    shard-00000.parquet     one row per sample: `ids` (list<int32>, the whole sample: prompt and
    shard-00001.parquet     continuation, ending with a stop token if the teacher ended it), `text`
    ...                     (the ids decoded, for reading), `kind` (the prompt's kind) and
                            `prompt_tokens` (how many of the ids are the prompt)

The ids are trained on as they are, never re-tokenised, so they must mean the same tokens to the
tokenizer in use: `check_tokenizer` compares the manifest's fingerprint with it. A folder is read
through its manifest's shard list only, so a shard being written (a `.tmp` file, renamed when
complete) or one written after the manifest was last saved is never read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rwkvinside.errors import UserError
from rwkvinside.files import write_atomically

if TYPE_CHECKING:  # transformers is slow to import and only named in annotations
    from transformers import PreTrainedTokenizerBase

MANIFEST = "synth.json"
FORMAT = 1
ROW_BATCH = 1024  # rows read at a time


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def vocabulary(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What the ids mean: the vocabulary's size and the sha256 of its (token, id) pairs, sorted."""
    pairs = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"vocab_size": len(pairs), "sha256": digest}


def is_synthetic(folder: Path) -> bool:
    """Whether `folder` is the output of `rwkvinside synth`."""
    return (folder / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {folder / MANIFEST} ({error}); it is written by `rwkvinside synth`, "
                        "run it again with the same --output to repair the folder") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{folder / MANIFEST} has format {manifest.get('format')!r}; this version reads "
                        f"format {FORMAT}")
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_atomically(folder / MANIFEST,
                     lambda path: path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8"))


def write_shard(path: Path, ids: Sequence[Sequence[int]], texts: Sequence[str], kinds: Sequence[str],
                prompt_tokens: Sequence[int]) -> None:
    """One shard of samples, written atomically."""
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.table({"ids": pyarrow.array(ids, type=pyarrow.list_(pyarrow.int32())),
                           "text": pyarrow.array(texts, type=pyarrow.string()),
                           "kind": pyarrow.array(kinds, type=pyarrow.string()),
                           "prompt_tokens": pyarrow.array(prompt_tokens, type=pyarrow.int32())})
    write_atomically(path, lambda temporary: pyarrow.parquet.write_table(table, temporary))


def manifest_folder(source: Path) -> Path | None:
    """The synthetic folder whose manifest describes `source` (the folder, or one of its shards)."""
    folder = source if source.is_dir() else source.parent
    return folder if is_synthetic(folder) else None


def shards(folder: Path) -> list[Path]:
    """The finished shards of a synthetic folder, in order."""
    return [folder / shard["file"] for shard in read_manifest(folder)["shards"]]


def read_samples(path: Path) -> Iterator[tuple[int, tuple[int, ...], str]]:
    """(row, ids, text) of each sample of one shard."""
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.ParquetFile(path)
    except (OSError, pyarrow.ArrowException) as error:
        raise UserError(f"cannot read the shard {path} ({error}); run `rwkvinside synth` again with the "
                        "same --output to rewrite it") from None
    row = 0
    for batch in table.iter_batches(ROW_BATCH, columns=["ids", "text"]):
        ids = batch.column(0)
        flat, offsets = ids.values.to_numpy(), ids.offsets.to_numpy()
        for i, text in enumerate(batch.column(1).to_pylist()):
            yield row, tuple(flat[offsets[i]: offsets[i + 1]].tolist()), text
            row += 1


def check_tokenizer(sources: Iterable[Path], tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse teacher samples made with another tokenizer: their ids would stand for other tokens."""
    folders = {folder for folder in map(manifest_folder, sources) if folder is not None}
    if not folders:
        return
    ours = vocabulary(tokenizer)
    for folder in sorted(folders):
        theirs = read_manifest(folder)["tokenizer"]
        if theirs != ours:
            made, used = (f"{words['vocab_size']} tokens, sha256 {words['sha256'][:12]}"
                          for words in (theirs, ours))
            raise UserError(f"the teacher samples in {folder} were made with another tokenizer ({made}) "
                            f"than this run's ({used}); train with the teacher that wrote them, or sample "
                            "them again with `rwkvinside synth --teacher` this run's teacher")
