"""From a `DataConfig` to this rank's training loader: packed text (stages 1-2) or chat (stage 3).

data.train may weigh its entries (`{path: synth/, weight: 2}`, config.WeightedPath): the entries of
one weight are packed into one token stream, in the order given, so that a window never mixes two
weights, and `WeightedSource` repeats or thins each stream's windows by its weight every epoch.
With every weight 1 (plain paths) that is the one stream of all paths, as without weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rwkvinside.config import DataConfig, WeightedPath, train_entries
from rwkvinside.data.chat import ChatDataset, conversation_sample, render_conversations
from rwkvinside.data.loader import MapSource, ShardedLoader, StreamSource, WeightedSource
from rwkvinside.data.packing import PackedDataset, eos_lead, pack_windows, packed_sample, pad_id, tokenize_stream
from rwkvinside.data.sources import iter_conversations, iter_documents, resolve_sources
from rwkvinside.data.synthetic import check_tokenizer
from rwkvinside.errors import UserError

if TYPE_CHECKING:  # transformers is slow to import and only named in annotations
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Entry = str | WeightedPath  # an entry of data.train


def build_train_loader(config: DataConfig, paths: Sequence[Entry], batch_size: int,
                       tokenizer: PreTrainedTokenizerBase, *, chat: bool, rank: int = 0,
                       world_size: int = 1) -> ShardedLoader:
    """This rank's endless loader of [batch_size, config.seq_len] batches of `paths` (data.train or
    data.chat); `chat` selects SFT rendering."""
    groups = weight_groups(paths)
    plain = [path for _, group in groups for path in group]
    check_tokenizer(resolve_sources(plain), tokenizer)
    if (config.streaming or chat) and [weight for weight, _ in groups] != [1.0]:
        raise UserError("weights in data.train apply to text read in memory (data.streaming false); give "
                        "plain paths here")
    if config.streaming:
        source = _stream_source(config, plain, tokenizer, chat)
    elif chat:
        dataset = ChatDataset.from_records(iter_conversations(plain), tokenizer, config.seq_len)
        _log_size(dataset, config.seq_len)
        source = MapSource(dataset, config.seed)
    else:
        source = _packed_source(config, groups, tokenizer)
    return ShardedLoader(source, batch_size, rank, world_size)


def weight_groups(entries: Sequence[Entry]) -> list[tuple[float, list[str]]]:
    """(weight, paths) for each weight of data.train, in the order of their first entries."""
    groups: dict[float, list[str]] = {}
    for path, weight in train_entries(list(entries)):
        groups.setdefault(weight, []).append(path)
    return list(groups.items())


def _packed_source(config: DataConfig, groups: list[tuple[float, list[str]]],
                   tokenizer: PreTrainedTokenizerBase) -> MapSource | WeightedSource:
    parts = []
    for weight, paths in groups:
        dataset = PackedDataset.from_texts(iter_documents(paths), tokenizer, config.seq_len,
                                           config.eos_first_fraction)
        which = f" (weight {weight:g}: {', '.join(paths)})" if len(groups) > 1 else ""
        _log_size(dataset, config.seq_len, which)
        parts.append((dataset, weight))
    if len(parts) == 1 and parts[0][1] == 1:
        return MapSource(parts[0][0], config.seed)
    return WeightedSource(parts, config.seed)


def _log_size(dataset: PackedDataset | ChatDataset, seq_len: int, which: str = "") -> None:
    logger.info("training data%s: %d sequences of %d tokens, %d target tokens", which, len(dataset), seq_len,
                dataset.num_target_tokens)


def _stream_source(config: DataConfig, paths: Sequence[str], tokenizer: PreTrainedTokenizerBase,
                   chat: bool) -> StreamSource:
    """Each epoch one lazy pass over the files: rendered conversations or packed token windows."""
    seq_len = config.seq_len
    if chat:
        pad = pad_id(tokenizer)
        return StreamSource(lambda: render_conversations(iter_conversations(paths), tokenizer, seq_len),
                            lambda conversation: conversation_sample(conversation, seq_len, pad),
                            config.seed, config.shuffle_buffer)
    lead = eos_lead(tokenizer, config.eos_first_fraction)
    return StreamSource(lambda: pack_windows(tokenize_stream(iter_documents(paths), tokenizer), seq_len, lead),
                        lambda window: packed_sample(window, seq_len), config.seed, config.shuffle_buffer)
