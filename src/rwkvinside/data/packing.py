"""Tokenise documents into one stream and pack it into fixed-length sequences (stages 1 and 2).

The stream is `doc_1 EOS doc_2 EOS ... doc_n EOS` (the tokenizer's `eos_token_id`, no BOS: the
tokenizer is called with `add_special_tokens=False`). A document given as token ids (a teacher
sample, `synthetic.py`) joins the stream as it is, except that its EOS at either end is the
stream's own separator, not a second one: a sample the teacher wrote from a bare EOS prompt, or
ended with EOS, reads exactly as a text document does. Every token of a teacher sample is trained
on, its prompt included: distillation matches the teacher's next-token distribution on any text,
and the prompts (instructions in the chat template, document openings) are text the student will
read too; masking them would only discard targets. Sequence i is the window
`stream[i*T : i*T + T + 1]` of T+1 tokens: its first T tokens are the inputs and its last T the
targets, so consecutive windows overlap by one token and every token after the first is a target
exactly once. The incomplete last window is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from rwkvinside.data.batch import Sample, chunked, shifted_sample
from rwkvinside.data.sources import Document
from rwkvinside.errors import UserError

if TYPE_CHECKING:  # transformers is slow to import and only named in annotations
    from transformers import PreTrainedTokenizerBase

DOCS_PER_CALL = 64  # documents per batched tokenizer call: the fast tokenizer parallelises within one


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The end-of-text token that separates documents."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no end-of-text token (eos_token) to separate documents; use the "
                        "teacher's own tokenizer or set tokenizer.eos_token")
    return int(tokenizer.eos_token_id)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id written into padded positions (masked out, so any id works; prefer the pad token)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos_id(tokenizer)


def tokenize_stream(documents: Iterable[Document],
                    tokenizer: PreTrainedTokenizerBase) -> Iterator[np.ndarray]:
    """Token ids of the documents (texts tokenised, token ids as they are), each followed by EOS; one
    int32 array [n] per tokenizer call."""
    eos = eos_id(tokenizer)
    for batch in chunked(documents, DOCS_PER_CALL):
        texts = [doc for doc in batch if isinstance(doc, str)]
        # verbose=False: documents longer than model_max_length are fine here, packing cuts them.
        encoded = iter(tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                 verbose=False)["input_ids"] if texts else [])
        ids = [next(encoded) + [eos] if isinstance(doc, str) else separated(doc, eos) for doc in batch]
        yield np.concatenate([np.asarray(doc, dtype=np.int32) for doc in ids])


def separated(ids: Sequence[int], eos: int) -> list[int]:
    """Token ids of a document as the stream holds them: no EOS in front (the previous document's
    separator is there already) and exactly one at the end."""
    ids = list(ids)
    if ids[:1] == [eos]:
        ids = ids[1:]
    return ids if ids[-1:] == [eos] else ids + [eos]


def pack_windows(chunks: Iterable[np.ndarray], seq_len: int) -> Iterator[np.ndarray]:
    """Windows [seq_len+1] of a token stream given in chunks, overlapping by one token (streaming)."""
    buffer = np.empty(0, dtype=np.int32)
    total = 0
    for chunk in chunks:
        total += chunk.size
        buffer = np.concatenate([buffer, chunk])
        count = (buffer.size - 1) // seq_len
        for i in range(count):  # copies: a view would keep the whole chunk alive in a shuffle buffer
            yield buffer[i * seq_len: i * seq_len + seq_len + 1].copy()
        buffer = buffer[count * seq_len:]  # keeps the overlap token: the next window's first input
    if total < seq_len + 1:
        raise too_small(total, seq_len)


def packed_sample(window: np.ndarray, seq_len: int) -> Sample:
    """The training sample of one full window [seq_len+1]: every position has a target."""
    return shifted_sample(torch.from_numpy(np.ascontiguousarray(window)), seq_len, pad_id=0)


def too_small(num_tokens: int, seq_len: int) -> UserError:
    return UserError(f"the corpus has {num_tokens} tokens but one training sequence of --seq-len {seq_len} "
                     f"needs {seq_len + 1}; give a smaller --seq-len or more data")


class PackedDataset:
    """All packed sequences of an in-memory token stream; item i is window i as a `Sample`."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        """tokens: [N] int32, the whole stream."""
        if tokens.size < seq_len + 1:
            raise too_small(tokens.size, seq_len)
        self.tokens = tokens
        self.seq_len = seq_len

    @classmethod
    def from_texts(cls, documents: Iterable[Document], tokenizer: PreTrainedTokenizerBase,
                   seq_len: int) -> "PackedDataset":
        """The packed stream of documents: texts, or token ids (`tokenize_stream`)."""
        return cls(np.concatenate(list(tokenize_stream(documents, tokenizer))), seq_len)

    def __len__(self) -> int:
        return (self.tokens.size - 1) // self.seq_len

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.seq_len
        return packed_sample(self.tokens[start: start + self.seq_len + 1], self.seq_len)

    @property
    def num_target_tokens(self) -> int:
        """Target tokens over all sequences: every position of a packed sequence is trained."""
        return len(self) * self.seq_len
