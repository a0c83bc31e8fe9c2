"""From a DataConfig to batches, end to end on files: in memory and streaming, text and chat."""

from itertools import islice

import pytest
import torch

from rwkvinside.data import IGNORE_INDEX, DataConfig, PackedDataset, build_train_loader, iter_texts

from .helpers import DOCS, reference_stream, write_docs


def batches(config: DataConfig, tokenizer, steps: int, chat: bool = False, **shard) -> list[dict]:
    return list(islice(build_train_loader(config, tokenizer, chat=chat, **shard), steps))


def windows(batch_list: list[dict]) -> list[tuple[int, ...]]:
    return [tuple(row) for batch in batch_list for row in batch["input_ids"].tolist()]


@pytest.mark.parametrize("streaming", [False, True])
def test_text_batches_follow_the_contract(tiny_tokenizer, text_corpus, streaming):
    config = DataConfig(paths=[str(text_corpus)], seq_len=16, batch_size=2, streaming=streaming)
    stream = reference_stream(tiny_tokenizer, DOCS)
    starts = {tuple(stream[i: i + 16]): i for i in range(0, len(stream) - 16, 16)}
    for batch in batches(config, tiny_tokenizer, 6):
        assert all(value.dtype == torch.long and value.shape == (2, 16) for value in batch.values())
        for inputs, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            start = starts[tuple(inputs)]
            assert labels == stream[start + 1: start + 17]


def test_streaming_epoch_is_a_shuffle_of_the_in_memory_sequences(tiny_tokenizer, text_corpus):
    config = DataConfig(paths=[str(text_corpus)], seq_len=8, batch_size=1, shuffle_buffer=4)
    count = len(PackedDataset.from_texts(iter_texts([text_corpus]), tiny_tokenizer, 8))
    in_memory = windows(batches(config, tiny_tokenizer, count))
    streamed = windows(batches(DataConfig(**{**vars(config), "streaming": True}), tiny_tokenizer, count))
    assert sorted(in_memory) == sorted(streamed) and len(set(streamed)) == count
    assert streamed != in_memory


def test_streaming_resume_on_two_ranks(tiny_tokenizer, tmp_path):
    write_docs(tmp_path / "big", DOCS * 3)
    config = DataConfig(paths=[str(tmp_path / "big")], seq_len=8, batch_size=2, streaming=True,
                        shuffle_buffer=6)
    for rank in range(2):
        uninterrupted = batches(config, tiny_tokenizer, 20, rank=rank, world_size=2)
        first = build_train_loader(config, tiny_tokenizer, chat=False, rank=rank, world_size=2)
        list(islice(first, 7))
        resumed = build_train_loader(config, tiny_tokenizer, chat=False, rank=rank, world_size=2)
        resumed.load_state_dict(first.state_dict())
        assert windows(list(islice(resumed, 13))) == windows(uninterrupted[7:])


@pytest.mark.parametrize("streaming", [False, True])
def test_chat_batches_train_only_assistant_tokens(tiny_tokenizer, chat_file, streaming):
    config = DataConfig(paths=[str(chat_file)], seq_len=128, batch_size=3, streaming=streaming)
    (batch,) = batches(config, tiny_tokenizer, 1, chat=True)
    decoded = sorted(tiny_tokenizer.decode(row[row != IGNORE_INDEX]) for row in batch["labels"])
    assert decoded == sorted(["Shakespeare wrote it.<|im_end|>John Milton.<|im_end|>", "Hello!<|im_end|>",
                              "One, two, three.<|im_end|>"])
    assert bool((batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all())


@pytest.mark.parametrize("field", ["seq_len", "batch_size", "shuffle_buffer"])
def test_config_rejects_non_positive_sizes(field):
    with pytest.raises(ValueError, match=f"data.{field} must be at least 1"):
        DataConfig(**{field: 0})
