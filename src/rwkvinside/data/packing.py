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

With a lead token (`data.eos_first`: the EOS), window i is instead `EOS stream[i*T : i*T + T]`: every
sequence starts as a document does, and the T stream tokens after the EOS are its targets (no
overlap; every token is a target exactly once). Position 0 is special to a transformer teacher (its
attention sink, a residual activation hundreds of times the others'); a window that starts mid-text
puts an arbitrary token there, and in stage 2 that position's gradients spiked by up to 50,000x
the median token's (BENCHMARKS.md). The configuration turns the lead on only for an all-RWKV
student that reads no lead of its own (`convert.lead=false`): one that keeps attention layers must
learn to build their sink from any first token, as prompts have, and EOS-first windows never show it
one (`config.DataConfig.eos_first`).

A lead may also come first in only a fraction f of the windows (`Lead.fraction`), spread evenly
(window i has it where ceil(i*f) < ceil((i+1)*f): window 0 always). A window without it then starts
one stream token earlier, `stream[i*T - 1 : i*T + T]`, so that it has the same T targets: every token
is still a target exactly once, whichever windows are led.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
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


def eos_lead(tokenizer: PreTrainedTokenizerBase, fraction: float) -> Lead | None:
    """The EOS as the lead of `fraction` of the windows (None for none)."""
    return Lead(eos_id(tokenizer), fraction) if fraction else None


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


@dataclass(frozen=True)
class Lead:
    """A token put first in a fraction of the windows (the module docstring says which ones)."""

    token: int
    fraction: float = 1.0

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"a lead's fraction must be in (0, 1], not {self.fraction}")

    def leads(self, index: int) -> bool:
        return math.ceil(index * self.fraction) < math.ceil((index + 1) * self.fraction)


def stream_tokens_needed(seq_len: int, lead: Lead | None) -> int:
    """Stream tokens from a window's start to its end: seq_len + 1 (inputs and the last target), or
    seq_len where there is a lead (the last target is then the window's last token)."""
    return seq_len if lead is not None else seq_len + 1


def window_at(tokens: np.ndarray, index: int, seq_len: int, lead: Lead | None, base: int = 0) -> np.ndarray:
    """Window `index` [seq_len+1] of a stream whose token `base` is tokens[0]: its own tokens (a view),
    `lead` then seq_len of them, or (an unled window beside led ones) the token before and seq_len."""
    start = index * seq_len - base
    if lead is None:
        return tokens[start: start + seq_len + 1]
    if lead.leads(index):
        return np.concatenate([np.array([lead.token], dtype=tokens.dtype), tokens[start: start + seq_len]])
    return tokens[start - 1: start + seq_len]


def pack_windows(chunks: Iterable[np.ndarray], seq_len: int, lead: Lead | None = None) -> Iterator[np.ndarray]:
    """Windows [seq_len+1] of a token stream given in chunks (streaming), as `window_at` cuts them."""
    needed = stream_tokens_needed(seq_len, lead)
    # the stream from `base` on: the next window's start, and with a lead the token before it too
    buffer, base, index, total = np.empty(0, dtype=np.int32), 0, 0, 0
    for chunk in chunks:
        total += chunk.size
        buffer = np.concatenate([buffer, chunk])
        while index * seq_len + needed <= base + buffer.size:
            # copies: a view would keep the whole chunk alive in a shuffle buffer
            yield window_at(buffer, index, seq_len, lead, base).copy()
            index += 1
        keep_from = index * seq_len - (1 if lead is not None and index else 0)
        buffer, base = buffer[keep_from - base:], keep_from
    if total < needed:
        raise too_small(total, needed)


def packed_sample(window: np.ndarray, seq_len: int) -> Sample:
    """The training sample of one full window [seq_len+1]: every position has a target."""
    return shifted_sample(torch.from_numpy(np.ascontiguousarray(window)), seq_len, pad_id=0)


def too_small(num_tokens: int, needed: int) -> UserError:
    return UserError(f"the corpus has {num_tokens} tokens but one training sequence needs {needed}; give a "
                     "smaller --seq-len or more data")


class PackedDataset:
    """All packed sequences of an in-memory token stream; item i is window i as a `Sample`."""

    def __init__(self, tokens: np.ndarray, seq_len: int, lead: Lead | None = None) -> None:
        """tokens: [N] int32, the whole stream; lead: a token to start windows with (or None)."""
        needed = stream_tokens_needed(seq_len, lead)
        if tokens.size < needed:
            raise too_small(tokens.size, needed)
        self.tokens = tokens
        self.seq_len = seq_len
        self.lead = lead

    @classmethod
    def from_texts(cls, documents: Iterable[Document], tokenizer: PreTrainedTokenizerBase,
                   seq_len: int, eos_first: float = 0.0) -> "PackedDataset":
        """The packed stream of documents: texts, or token ids (`tokenize_stream`); eos_first: the
        fraction of windows that start with the EOS (1: every one)."""
        return cls(np.concatenate(list(tokenize_stream(documents, tokenizer))), seq_len, eos_lead(tokenizer, eos_first))

    def __len__(self) -> int:
        return (self.tokens.size - stream_tokens_needed(self.seq_len, self.lead)) // self.seq_len + 1

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return packed_sample(window_at(self.tokens, index, self.seq_len, self.lead), self.seq_len)

    @property
    def num_target_tokens(self) -> int:
        """Target tokens over all sequences: every position of a packed sequence is trained."""
        return len(self) * self.seq_len
