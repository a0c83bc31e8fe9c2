"""From a `DataConfig` to this rank's training loader: packed text (stages 1-2) or chat (stage 3)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rwkvinside.data.batch import Sample
from rwkvinside.data.chat import ChatDataset, conversation_sample, render_conversations
from rwkvinside.data.loader import MapSource, ShardedLoader, StreamSource
from rwkvinside.data.packing import PackedDataset, pack_windows, packed_sample, pad_id, tokenize_stream
from rwkvinside.data.sources import iter_conversations, iter_texts

if TYPE_CHECKING:  # transformers is slow to import and only named in annotations
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """The data knobs of one training stage."""

    paths: list[str] = field(default_factory=list)  # training files/folders, read in this order
    seq_len: int = 2048  # tokens per training sequence (T)
    batch_size: int = 8  # sequences per rank per micro-step (B)
    seed: int = 0  # shuffling seed; epoch e uses (seed, e)
    streaming: bool = False  # tokenise lazily each epoch instead of holding the corpus in memory
    shuffle_buffer: int = 10_000  # streaming only: sequences held for the approximate shuffle
    eval_paths: list[str] = field(default_factory=list)  # held-out text files/folders for perplexity
    eval_batch_size: int = 1  # held-out windows per evaluation batch

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "shuffle_buffer", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be at least 1, got {getattr(self, name)}")


def build_train_loader(config: DataConfig, tokenizer: PreTrainedTokenizerBase, *, chat: bool,
                       rank: int = 0, world_size: int = 1) -> ShardedLoader:
    """This rank's endless loader of [batch_size, seq_len] batches; `chat` selects SFT rendering."""
    if config.streaming:
        source = StreamSource(lambda: _stream_samples(config, tokenizer, chat), config.seed,
                              config.shuffle_buffer)
    else:
        dataset = (ChatDataset.from_records(iter_conversations(config.paths), tokenizer, config.seq_len)
                   if chat else PackedDataset.from_texts(iter_texts(config.paths), tokenizer, config.seq_len))
        logger.info("training data: %d sequences of %d tokens, %d target tokens", len(dataset),
                    config.seq_len, dataset.num_target_tokens)
        source = MapSource(dataset, config.seed)
    return ShardedLoader(source, config.batch_size, rank, world_size)


def _stream_samples(config: DataConfig, tokenizer: PreTrainedTokenizerBase, chat: bool) -> Iterator[Sample]:
    """One lazy pass over the data as training samples [seq_len]."""
    if chat:
        pad = pad_id(tokenizer)
        for conversation in render_conversations(iter_conversations(config.paths), tokenizer, config.seq_len):
            yield conversation_sample(conversation, config.seq_len, pad)
    else:
        for window in pack_windows(tokenize_stream(iter_texts(config.paths), tokenizer), config.seq_len):
            yield packed_sample(window, config.seq_len)
