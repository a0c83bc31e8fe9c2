"""Held-out text for perplexity: the same token stream and batch contract as training, in order.

Consecutive windows of seq_len+1 tokens overlapping by one (as in packing), plus the tail as a
shorter, right-padded window, so every token of the stream after the first is a target exactly
once. Each window starts without the previous one's context (non-overlapping perplexity). Teacher
and student must be given the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from rwkvinside.data.batch import Batch, chunked, collate, shifted_sample
from rwkvinside.data.packing import pad_id, tokenize_stream
from rwkvinside.data.sources import PathLike, iter_documents, resolve_sources
from rwkvinside.data.synthetic import check_tokenizer
from rwkvinside.errors import UserError

if TYPE_CHECKING:  # transformers is slow to import and only named in annotations
    from transformers import PreTrainedTokenizerBase


def heldout_batches(paths: Sequence[PathLike], tokenizer: PreTrainedTokenizerBase, seq_len: int,
                    batch_size: int = 1) -> Iterator[Batch]:
    """Evaluation batches [batch_size, seq_len] over the files' token stream; the last may have fewer rows."""
    check_tokenizer(resolve_sources(paths), tokenizer)
    tokens = np.concatenate(list(tokenize_stream(iter_documents(paths), tokenizer)))
    if tokens.size < 2:
        raise UserError(f"the held-out text {', '.join(map(str, paths))} has fewer than 2 tokens; give a "
                        "longer held-out file")
    pad = pad_id(tokenizer)
    samples = (shifted_sample(torch.from_numpy(tokens[start: start + seq_len + 1]), seq_len, pad)
               for start in range(0, tokens.size - 1, seq_len))
    for group in chunked(samples, batch_size):
        yield collate(group)
