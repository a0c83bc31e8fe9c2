"""Training and evaluation data: sources, packing, chat rendering and resumable sharded loading.

Every batch follows one contract (see `batch.py`): LongTensors `input_ids`, `labels`,
`attention_mask`, all [B, T], with labels already shifted once and -100 where there is no target.
"""

from rwkvinside.data.batch import IGNORE_INDEX, Batch, Sample, collate, shifted_sample, target_mask, target_tokens
from rwkvinside.data.build import build_train_loader
from rwkvinside.data.chat import ChatDataset, assistant_tokens, check_chat_template, render_conversations
from rwkvinside.data.heldout import heldout_batches
from rwkvinside.data.loader import MapSource, ShardedLoader, StreamSource, WeightedSource, shuffle_buffer
from rwkvinside.data.packing import PackedDataset, eos_id, pack_windows, pad_id, tokenize_stream
from rwkvinside.data.sources import (Document, Record, iter_conversations, iter_documents, iter_records, iter_texts,
                                     resolve_sources)

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "ChatDataset",
    "Document",
    "MapSource",
    "PackedDataset",
    "Record",
    "Sample",
    "ShardedLoader",
    "StreamSource",
    "WeightedSource",
    "assistant_tokens",
    "build_train_loader",
    "check_chat_template",
    "collate",
    "eos_id",
    "heldout_batches",
    "iter_conversations",
    "iter_documents",
    "iter_records",
    "iter_texts",
    "pack_windows",
    "pad_id",
    "render_conversations",
    "resolve_sources",
    "shifted_sample",
    "shuffle_buffer",
    "target_mask",
    "target_tokens",
    "tokenize_stream",
]
