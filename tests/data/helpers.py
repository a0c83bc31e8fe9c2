"""Small corpora for the data tests, and reference token streams computed without the package."""

import json
from pathlib import Path

DOCS = [
    "To be, or not to be, that is the question. " * 3,
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, there was a little girl who loved to read. " * 2,
    "0123456789 abcdefghijklmnopqrstuvwxyz",
]

CONVERSATIONS = [
    [
        {"role": "user", "content": "Who wrote Hamlet?"},
        {"role": "assistant", "content": "Shakespeare wrote it."},
        {"role": "user", "content": "And Paradise Lost?"},
        {"role": "assistant", "content": "John Milton."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello!"},
    ],
    [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, three."},
    ],
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_docs(folder: Path, docs: list[str] = DOCS) -> list[Path]:
    """One .txt file per document, named so that sorted order is document order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"doc{i:02d}.txt" for i in range(len(docs))]
    for path, doc in zip(paths, docs):
        path.write_text(doc, encoding="utf-8")
    return paths


def reference_stream(tokenizer, docs: list[str]) -> list[int]:
    """doc_1 EOS doc_2 EOS ...: what packing must produce, tokenised one document at a time."""
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return stream
