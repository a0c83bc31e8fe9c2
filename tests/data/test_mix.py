"""Teacher samples as training documents, and data.train's weights: what a weight means, the same
order on every rank, exact resume."""

import copy
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkvinside.config import DataConfig, WeightedPath, load_config
from rwkvinside.data import (MapSource, PackedDataset, ShardedLoader, WeightedSource, build_train_loader,
                             heldout_batches, iter_documents, tokenize_stream)
from rwkvinside.data.synthetic import FORMAT, shard_name, vocabulary, write_manifest, write_shard
from rwkvinside.errors import UserError

from .helpers import DOCS, reference_stream, write_docs

SEQ_LEN = 8


def write_samples(folder: Path, tokenizer, samples: list[list[int]], listed: int | None = None) -> Path:
    """A teacher-sample folder as `rwkvinside synth` writes it: one shard per two samples, the first
    `listed` shards (all by default) in the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, start in enumerate(range(0, len(samples), 2)):
        batch = samples[start: start + 2]
        write_shard(folder / shard_name(index), batch, tokenizer.batch_decode(batch), ["free"] * len(batch),
                    [1] * len(batch))
        shards.append({"file": shard_name(index), "samples": len(batch), "tokens": sum(map(len, batch))})
    write_manifest(folder, {"format": FORMAT, "tokenizer": vocabulary(tokenizer),
                            "shards": shards[:listed] if listed is not None else shards})
    return folder


def samples_of(tokenizer) -> list[list[int]]:
    """Samples as synth writes them: EOS prompt + text (+ EOS where the teacher ended)."""
    eos = tokenizer.eos_token_id
    texts = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in DOCS]
    return [[eos] + texts[0] + [eos], [eos] + texts[1], texts[2] + [eos], texts[3]]


# ---- teacher samples as documents -----------------------------------------------------------------

def test_sample_ids_are_documents_joined_by_single_eos(tiny_tokenizer, tmp_path):
    folder = write_samples(tmp_path / "synth", tiny_tokenizer, samples_of(tiny_tokenizer))
    documents = list(iter_documents([folder]))
    assert documents == [tuple(sample) for sample in samples_of(tiny_tokenizer)]  # ids, not texts
    stream = np.concatenate(list(tokenize_stream(documents, tiny_tokenizer))).tolist()
    assert stream == reference_stream(tiny_tokenizer, DOCS)  # as the same texts: one EOS between documents


def test_only_the_shards_the_manifest_lists_are_read(tiny_tokenizer, tmp_path):
    folder = write_samples(tmp_path / "synth", tiny_tokenizer, samples_of(tiny_tokenizer), listed=1)
    (folder / (shard_name(2) + ".tmp")).write_bytes(b"half a shard")
    assert len(list(iter_documents([folder]))) == 2
    assert len(list(iter_documents([tmp_path]))) == 2  # inside a parent folder: read by its manifest too


def test_a_shard_named_alone_is_read_as_ids(tiny_tokenizer, tmp_path):
    folder = write_samples(tmp_path / "synth", tiny_tokenizer, samples_of(tiny_tokenizer))
    second = [tuple(sample) for sample in samples_of(tiny_tokenizer)[2:]]
    assert list(iter_documents([folder / shard_name(1)])) == second


def test_texts_and_samples_train_together(tiny_tokenizer, tmp_path):
    folder = write_samples(tmp_path / "synth", tiny_tokenizer, samples_of(tiny_tokenizer))
    write_docs(tmp_path / "text", DOCS)
    loader = build_train_loader(DataConfig(seq_len=SEQ_LEN, eos_first=True), [str(tmp_path / "text"), str(folder)],
                                1, tiny_tokenizer, chat=False)
    stream, eos = reference_stream(tiny_tokenizer, DOCS * 2), tiny_tokenizer.eos_token_id
    # Each window: the EOS, then the stream's next SEQ_LEN - 1 inputs (data.eos_first).
    windows = Counter((eos, *stream[i: i + SEQ_LEN - 1]) for i in range(0, len(stream) - SEQ_LEN + 1, SEQ_LEN))
    assert loader.steps_per_epoch == windows.total()
    epoch = islice(loader, windows.total())
    assert Counter(tuple(batch["input_ids"][0].tolist()) for batch in epoch) == windows


@pytest.mark.parametrize("streaming", [False, True])
def test_samples_of_another_tokenizer_are_refused(tiny_tokenizer, tmp_path, streaming):
    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["<another token>"])
    folder = write_samples(tmp_path / "synth", other, samples_of(other))
    with pytest.raises(UserError, match="made with another tokenizer") as error:
        build_train_loader(DataConfig(seq_len=SEQ_LEN, streaming=streaming), [str(folder)], 1, tiny_tokenizer,
                           chat=False)
    assert "\n" not in str(error.value) and "321 tokens" in str(error.value)
    with pytest.raises(UserError, match="made with another tokenizer"):
        next(heldout_batches([folder], tiny_tokenizer, SEQ_LEN))


# ---- weights ----------------------------------------------------------------------------------------

class Filled:
    """Item i of dataset `tag` is filled with tag * 1000 + i, so a batch tells which items it holds."""

    def __init__(self, tag: int, size: int) -> None:
        self.tag, self.size = tag, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = torch.full((SEQ_LEN,), self.tag * 1000 + index, dtype=torch.long)
        return {"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)}


def epoch_items(source, epoch: int) -> list[int]:
    return [int(sample["input_ids"][0]) for sample in source.epoch(epoch, 0)]


def test_a_weight_is_the_times_each_item_appears_per_epoch():
    source = WeightedSource([(Filled(1, 10), 1.0), (Filled(2, 10), 2.0), (Filled(3, 10), 0.5)], seed=0)
    assert len(source) == 10 + 20 + 5
    halves = []
    for epoch in range(3):
        counts = Counter(epoch_items(source, epoch))
        assert len(list(counts.elements())) == len(source)
        assert all(counts[1000 + i] == 1 and counts[2000 + i] == 2 for i in range(10))
        half = {item for item in counts if item >= 3000}
        assert len(half) == 5 and all(counts[item] == 1 for item in half)
        halves.append(half)
    assert len({frozenset(half) for half in halves}) > 1  # a different half each epoch
    mixed = epoch_items(source, 0)
    assert mixed != sorted(mixed) and min(mixed[:10]) < 2000 < max(mixed[:10])  # shuffled together


def test_weight_one_everywhere_is_the_unweighted_order():
    weighted = WeightedSource([(Filled(1, 12), 1.0)], seed=3)
    assert epoch_items(weighted, 2) == epoch_items(MapSource(Filled(1, 12), 3), 2)


def test_every_rank_cuts_the_same_weighted_order_and_resumes_exactly():
    def loader(rank: int = 0, world: int = 1, batch: int = 2) -> ShardedLoader:
        source = WeightedSource([(Filled(1, 9), 1.5), (Filled(2, 4), 2.0)], seed=7)
        return ShardedLoader(source, batch, rank, world)

    def items(batches) -> list[list[int]]:
        return [batch["input_ids"][:, 0].tolist() for batch in batches]

    single = items(islice(loader(batch=4), 12))  # 21 items an epoch: 5 global batches, several epochs
    ranks = [items(islice(loader(rank, 2), 12)) for rank in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single
    for rank in range(2):
        first = loader(rank, 2)
        list(islice(first, 7))  # into the second epoch
        resumed = loader(rank, 2)
        resumed.load_state_dict(first.state_dict())
        assert items(islice(resumed, 5)) == ranks[rank][7:]


def test_weighted_files_end_to_end(tiny_tokenizer, tmp_path):
    """Each entry's windows, repeated by its weight; entries of one weight share one token stream."""
    write_docs(tmp_path / "a", DOCS[:2])
    write_docs(tmp_path / "b", DOCS[2:])
    synth = write_samples(tmp_path / "synth", tiny_tokenizer, samples_of(tiny_tokenizer))
    entries = [str(tmp_path / "a"), WeightedPath(str(synth), 2.0), WeightedPath(str(tmp_path / "b"), 1.0)]
    loader = build_train_loader(DataConfig(seq_len=SEQ_LEN, seed=1, eos_first=True), entries, 1, tiny_tokenizer,
                                chat=False)

    def windows(documents) -> list[tuple[int, ...]]:
        dataset = PackedDataset.from_texts(documents, tiny_tokenizer, SEQ_LEN, eos_first=True)
        return [tuple(dataset[i]["input_ids"].tolist()) for i in range(len(dataset))]

    plain = windows(DOCS[:2] + DOCS[2:])  # a and b: weight 1, one stream
    doubled = windows(iter_documents([synth]))
    assert loader.steps_per_epoch == len(plain) + 2 * len(doubled)
    seen = Counter(tuple(batch["input_ids"][0].tolist()) for batch in islice(loader, loader.steps_per_epoch))
    assert seen == Counter(plain) + Counter(doubled * 2)


def test_weights_are_refused_for_streams_and_chat(tiny_tokenizer, text_corpus, chat_file):
    weighted = [WeightedPath(str(text_corpus), 2.0)]
    with pytest.raises(UserError, match="weights in data.train apply to text read in memory"):
        build_train_loader(DataConfig(seq_len=SEQ_LEN, streaming=True), weighted, 1, tiny_tokenizer,
                           chat=False)
    with pytest.raises(UserError, match="weights in data.train apply to text read in memory"):
        build_train_loader(DataConfig(seq_len=SEQ_LEN), [WeightedPath(str(chat_file), 2.0)], 1,
                           tiny_tokenizer, chat=True)


# ---- the configuration ------------------------------------------------------------------------------

def test_an_override_mixes_paths_and_weighted_entries():
    config = load_config(overrides=["data.train=[a.txt, {path: synth/, weight: 2}]"])
    assert config.data.train == ["a.txt", WeightedPath("synth/", 2.0)]
    half = load_config(overrides=["data.train=[{path: s, weight: 0.5}]"])
    assert half.data.train == [WeightedPath("s", 0.5)]


def test_a_weighted_config_round_trips_through_yaml(tmp_path):
    from rwkvinside.config import save_config

    config = load_config(overrides=["data.train=[a.txt, {path: synth/, weight: 2}]"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("override, message", [
    ("data.train=[{path: s, wieght: 2}]", "unknown config key 'data.train[0].wieght'; did you mean "
                                          "'data.train[0].weight'?"),
    ("data.train=[{path: s, weight: 0}]", "the weight of 's' must be > 0"),
    ("data.train=[{weight: 2}]", "an entry with a weight needs a path"),
    ("data.train=[{path: s, weight: two}]", "config key 'data.train[0].weight' must be a number"),
])
def test_a_bad_entry_is_named(override, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(overrides=[override])


def test_weights_in_a_stream_are_refused_by_the_config():
    with pytest.raises(UserError, match="weights in data.train need data.streaming false"):
        load_config(overrides=["data.train=[{path: s, weight: 2}]", "data.streaming=true"])
    assert load_config(overrides=["data.train=[{path: s, weight: 1}]", "data.streaming=true"]).data.streaming


def test_the_command_line_takes_weighted_entries_beside_data_paths(monkeypatch):
    from rwkvinside import cli
    from rwkvinside.distill import pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "distill", lambda config, overrides, *rest: seen.update(
        config=load_config(config, overrides)))
    assert cli.main(["distill", "data.train=[a.txt, {path: synth/, weight: 2}]", "stage1.max_steps=2"]) == 0
    assert seen["config"].data.train == ["a.txt", WeightedPath("synth/", 2.0)]
    assert cli.main(["distill", "--data", "a.txt", "b/"]) == 0
    assert seen["config"].data.train == ["a.txt", "b/"]
