"""From the run config's data section to batches, end to end on files: in memory and streaming, text and chat."""

import dataclasses
from itertools import islice

import pytest
import torch

from rwkvinside.config import DataConfig
from rwkvinside.data import IGNORE_INDEX, PackedDataset, build_train_loader, iter_texts

from .helpers import DOCS, reference_stream, write_docs


def batches(config: DataConfig, paths, tokenizer, steps: int, batch_size: int, chat: bool = False,
            **shard) -> list[dict]:
    return list(islice(build_train_loader(config, paths, batch_size, tokenizer, chat=chat, **shard), steps))


def windows(batch_list: list[dict]) -> list[tuple[int, ...]]:
    return [tuple(row) for batch in batch_list for row in batch["input_ids"].tolist()]


@pytest.mark.parametrize("streaming", [False, True])
def test_text_batches_follow_the_contract(tiny_tokenizer, text_corpus, streaming):
    config = DataConfig(seq_len=16, streaming=streaming, eos_first=False)  # plain slices of the stream
    stream = reference_stream(tiny_tokenizer, DOCS)
    starts = {tuple(stream[i: i + 16]): i for i in range(0, len(stream) - 16, 16)}
    for batch in batches(config, [str(text_corpus)], tiny_tokenizer, 6, batch_size=2):
        assert set(batch) == {"input_ids", "labels", "attention_mask"}
        assert all(value.dtype == torch.long and value.shape == (2, 16) for value in batch.values())
        assert bool(batch["attention_mask"].all())  # packed text has no padding
        for inputs, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            start = starts[tuple(inputs)]
            assert labels == stream[start + 1: start + 17]


@pytest.mark.parametrize("streaming", [False, True])
def test_eos_first_starts_every_sequence_with_the_eos(tiny_tokenizer, text_corpus, streaming):
    config = DataConfig(seq_len=16, streaming=streaming, eos_first=True)
    stream, eos = reference_stream(tiny_tokenizer, DOCS), tiny_tokenizer.eos_token_id
    chunks = {tuple(stream[i: i + 16]) for i in range(0, len(stream) - 15, 16)}
    for batch in batches(config, [str(text_corpus)], tiny_tokenizer, 6, batch_size=2):
        assert batch["input_ids"][:, 0].tolist() == [eos, eos]
        assert all(tuple(labels) in chunks for labels in batch["labels"].tolist())


def test_the_paths_given_are_read_not_the_config_lists(tiny_tokenizer, text_corpus, tmp_path):
    """The config's train/chat lists are the pipeline's to choose from; the loader reads `paths`."""
    config = DataConfig(train=[str(tmp_path / "missing.txt")], chat=[str(tmp_path / "missing.jsonl")], seq_len=16,
                        eos_first=False)
    (batch,) = batches(config, [str(text_corpus)], tiny_tokenizer, 1, batch_size=2)
    stream = reference_stream(tiny_tokenizer, DOCS)
    windows_of_stream = {tuple(stream[i: i + 16]) for i in range(0, len(stream) - 16, 16)}
    assert all(tuple(row) in windows_of_stream for row in batch["input_ids"].tolist())


@pytest.mark.parametrize("streaming", [False, True])
def test_the_seed_of_the_data_section_sets_the_order(tiny_tokenizer, text_corpus, streaming):
    def order(seed: int) -> list[tuple[int, ...]]:
        config = DataConfig(seq_len=8, seed=seed, streaming=streaming, shuffle_buffer=4)
        return windows(batches(config, [str(text_corpus)], tiny_tokenizer, 6, batch_size=1))

    assert order(0) == order(0)
    assert order(0) != order(1)


def test_streaming_epoch_is_a_shuffle_of_the_in_memory_sequences(tiny_tokenizer, text_corpus):
    config = DataConfig(seq_len=8, shuffle_buffer=4)
    count = len(PackedDataset.from_texts(iter_texts([text_corpus]), tiny_tokenizer, 8))
    in_memory = windows(batches(config, [str(text_corpus)], tiny_tokenizer, count, batch_size=1))
    streamed = windows(batches(dataclasses.replace(config, streaming=True), [str(text_corpus)], tiny_tokenizer,
                               count, batch_size=1))
    assert sorted(in_memory) == sorted(streamed) and len(set(streamed)) == count
    assert streamed != in_memory


def test_streaming_resume_on_two_ranks(tiny_tokenizer, tmp_path):
    write_docs(tmp_path / "big", DOCS * 3)
    config = DataConfig(seq_len=8, streaming=True, shuffle_buffer=6)
    paths = [str(tmp_path / "big")]
    for rank in range(2):
        uninterrupted = batches(config, paths, tiny_tokenizer, 20, batch_size=2, rank=rank, world_size=2)
        first = build_train_loader(config, paths, 2, tiny_tokenizer, chat=False, rank=rank, world_size=2)
        list(islice(first, 7))
        resumed = build_train_loader(config, paths, 2, tiny_tokenizer, chat=False, rank=rank, world_size=2)
        resumed.load_state_dict(first.state_dict())
        assert windows(list(islice(resumed, 13))) == windows(uninterrupted[7:])


def test_two_ranks_read_disjoint_halves_of_one_global_batch(tiny_tokenizer, text_corpus):
    config = DataConfig(seq_len=8)
    paths = [str(text_corpus)]
    single = batches(config, paths, tiny_tokenizer, 3, batch_size=4)
    ranks = [batches(config, paths, tiny_tokenizer, 3, batch_size=2, rank=rank, world_size=2) for rank in range(2)]
    for step in range(3):
        assert windows([ranks[0][step]]) + windows([ranks[1][step]]) == windows([single[step]])


@pytest.mark.parametrize("streaming", [False, True])
def test_chat_batches_train_only_assistant_tokens(tiny_tokenizer, chat_file, streaming):
    config = DataConfig(seq_len=128, streaming=streaming)
    (batch,) = batches(config, [str(chat_file)], tiny_tokenizer, 1, batch_size=3, chat=True)
    decoded = sorted(tiny_tokenizer.decode(row[row != IGNORE_INDEX]) for row in batch["labels"])
    assert decoded == sorted(["Shakespeare wrote it.<|im_end|>John Milton.<|im_end|>", "Hello!<|im_end|>",
                              "One, two, three.<|im_end|>"])
    assert bool((batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all())


@pytest.mark.parametrize("field, value, message", [
    ("seq_len", 0, "data.seq_len must be at least 2"),
    ("seq_len", 1, "data.seq_len must be at least 2"),
    ("shuffle_buffer", 0, "data.shuffle_buffer must be at least 1"),
    ("eval_tokens", -1, "data.eval_tokens must be >= 0"),
])
def test_the_data_section_rejects_bad_sizes(field, value, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**{field: value})


def test_a_batch_size_below_one_is_refused(tiny_tokenizer, text_corpus):
    with pytest.raises(ValueError, match="batch_size >= 1"):
        build_train_loader(DataConfig(seq_len=16), [str(text_corpus)], 0, tiny_tokenizer, chat=False)
