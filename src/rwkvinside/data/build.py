"""From a `DataConfig` to this rank's training loader: packed text (stages 1-2) or chat (stage 3)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rwkvinside.data.chat import ChatDataset, conversation_sample, render_conversations
from rwkvinside.data.loader import MapSource, ShardedLoader, StreamSource
from rwkvinside.data.packing import PackedDataset, pack_windows, packed_sample, pad_id, tokenize_stream
from rwkvinside.data.sources import iter_conversations, iter_texts

if TYPE_CHECKING:  # transformers is slow to import and only named in annotations
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """The loader knobs of one training stage (the run config maps its own sections onto these)."""

    paths: list[str] = field(default_factory=list)  # training files/folders, read in this order
    seq_len: int = 2048  # tokens per training sequence (T)
    batch_size: int = 8  # sequences per rank per micro-step (B)
    seed: int = 0  # shuffling seed; epoch e uses (seed, e)
    streaming: bool = False  # tokenise lazily each epoch instead of holding the corpus in memory
    shuffle_buffer: int = 10_000  # streaming only: sequences held for the approximate shuffle

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be at least 1, got {getattr(self, name)}")


def build_train_loader(config: DataConfig, tokenizer: PreTrainedTokenizerBase, *, chat: bool,
                       rank: int = 0, world_size: int = 1) -> ShardedLoader:
    """This rank's endless loader of [batch_size, seq_len] batches; `chat` selects SFT rendering."""
    if config.streaming:
        source = _stream_source(config, tokenizer, chat)
    else:
        dataset = (ChatDataset.from_records(iter_conversations(config.paths), tokenizer, config.seq_len)
                   if chat else PackedDataset.from_texts(iter_texts(config.paths), tokenizer, config.seq_len))
        logger.info("training data: %d sequences of %d tokens, %d target tokens", len(dataset),
                    config.seq_len, dataset.num_target_tokens)
        source = MapSource(dataset, config.seed)
    return ShardedLoader(source, config.batch_size, rank, world_size)


def _stream_source(config: DataConfig, tokenizer: PreTrainedTokenizerBase, chat: bool) -> StreamSource:
    """Each epoch one lazy pass over the files: rendered conversations or packed token windows."""
    paths, seq_len = config.paths, config.seq_len
    if chat:
        pad = pad_id(tokenizer)
        return StreamSource(lambda: render_conversations(iter_conversations(paths), tokenizer, seq_len),
                            lambda conversation: conversation_sample(conversation, seq_len, pad),
                            config.seed, config.shuffle_buffer)
    return StreamSource(lambda: pack_windows(tokenize_stream(iter_texts(paths), tokenizer), seq_len),
                        lambda window: packed_sample(window, seq_len), config.seed, config.shuffle_buffer)

