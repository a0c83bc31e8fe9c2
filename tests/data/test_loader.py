"""Loader: seeded per-epoch shuffling, disjoint equal shards, endless epochs, exact resume."""

from itertools import islice

import numpy as np
import pytest
import torch

from rwkvinside.data import MapSource, ShardedLoader, StreamSource, shuffle_buffer
from rwkvinside.errors import UserError

SEQ_LEN = 4


class IdDataset:
    """Sample i is filled with i, so a batch tells which sequences it holds."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = torch.full((SEQ_LEN,), index, dtype=torch.long)
        return {"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)}


def ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def map_loader(size=23, batch_size=2, seed=0, rank=0, world_size=1) -> ShardedLoader:
    return ShardedLoader(MapSource(IdDataset(size), seed), batch_size, rank, world_size)


def stream_loader(size=23, batch_size=2, seed=0, rank=0, world_size=1, buffer=5) -> ShardedLoader:
    source = StreamSource(lambda: iter(range(size)), IdDataset(size).__getitem__, seed, buffer)
    return ShardedLoader(source, batch_size, rank, world_size)


def take(loader: ShardedLoader, steps: int) -> list[list[int]]:
    return [ids(batch) for batch in islice(loader, steps)]


def test_batches_have_the_contract_shapes():
    batch = next(map_loader(batch_size=3))
    assert {key: tuple(value.shape) for key, value in batch.items()} == {
        "input_ids": (3, SEQ_LEN), "labels": (3, SEQ_LEN), "attention_mask": (3, SEQ_LEN)}


def test_shuffling_is_seeded_and_differs_per_epoch():
    loader = map_loader(size=20, batch_size=2)
    assert loader.steps_per_epoch == 10
    epochs = [sum(take(loader, 10), []) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(20))  # each epoch is a permutation
    assert epochs[0] != epochs[1] and epochs[0] != list(range(20))
    assert sum(take(map_loader(size=20, batch_size=2), 20), []) == epochs[0] + epochs[1]
    assert take(map_loader(size=20, seed=1), 10) != take(map_loader(size=20, seed=0), 10)


@pytest.mark.parametrize("make", [map_loader, stream_loader])
def test_ranks_get_disjoint_sequences_and_equal_counts(make):
    world = 3
    loaders = [make(size=23, batch_size=2, rank=rank, world_size=world) for rank in range(world)]
    steps = 23 // (2 * world)  # 3 global batches of 6; the 5 left over are dropped this epoch
    shards = [sum(take(loader, steps), []) for loader in loaders]
    assert all(len(shard) == steps * 2 for shard in shards)
    seen = sum(shards, [])
    assert len(set(seen)) == len(seen) == steps * 2 * world
    # The next batch on every rank comes from the next epoch: no rank waits for another.
    assert all(loader.state_dict()["epoch"] == 0 for loader in loaders)
    assert all(len(ids(next(loader))) == 2 and loader.epoch == 1 for loader in loaders)


def test_shards_partition_the_single_rank_order():
    single = sum(take(map_loader(size=24, batch_size=6), 4), [])
    ranks = [take(map_loader(size=24, batch_size=2, rank=rank, world_size=3), 4) for rank in range(3)]
    merged = [x for step in range(4) for rank in range(3) for x in ranks[rank][step]]
    assert merged == single


@pytest.mark.parametrize("make", [map_loader, stream_loader])
@pytest.mark.parametrize("stop", [3, 5, 12])  # 5 steps an epoch: mid-epoch, at its end, in the third
def test_restored_loader_yields_exactly_the_next_batches(make, stop):
    uninterrupted = take(make(rank=1, world_size=2), stop + 10)
    interrupted = make(rank=1, world_size=2)
    take(interrupted, stop)
    state = interrupted.state_dict()
    restored = make(rank=1, world_size=2)
    restored.load_state_dict(state)
    assert take(restored, 10) == uninterrupted[stop:]


def test_cursor_survives_a_change_of_world_size():
    single = map_loader(size=24, batch_size=4)
    take(single, 3)
    state = single.state_dict()
    expected = take(single, 1)[0]
    ranks = [map_loader(size=24, batch_size=2, rank=rank, world_size=2) for rank in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    assert take(ranks[0], 1)[0] + take(ranks[1], 1)[0] == expected


def test_cursor_is_the_same_on_every_rank():
    states = []
    for rank in range(2):
        loader = map_loader(rank=rank, world_size=2)
        take(loader, 7)
        states.append(loader.state_dict())
    assert states[0] == states[1]


def test_restore_into_different_data_is_refused():
    loader = map_loader(size=23)
    take(loader, 2)
    with pytest.raises(UserError, match="resume with the same data and seed"):
        map_loader(size=24).load_state_dict(loader.state_dict())
    with pytest.raises(UserError, match="resume with the same data and seed"):
        map_loader(size=23, seed=5).load_state_dict(loader.state_dict())


@pytest.mark.parametrize("make", [map_loader, stream_loader])
def test_too_little_data_for_one_global_batch(make):
    with pytest.raises(UserError, match=r"an epoch has 5 sequences but one global batch needs batch size 2 x "
                                        r"4 ranks = 8"):
        next(make(size=5, batch_size=2, world_size=4))


def test_invalid_rank():
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        map_loader(rank=2, world_size=2)


def test_stream_has_no_known_length():
    assert stream_loader().steps_per_epoch is None


def test_shuffle_buffer_is_a_seeded_bounded_permutation():
    consumed = []

    def items():
        for i in range(50):
            consumed.append(i)
            yield i

    stream = shuffle_buffer(items(), 8, np.random.default_rng(0))
    first = next(stream)
    assert len(consumed) == 9  # holds at most 8 items before emitting
    out = [first, *stream]
    assert sorted(out) == list(range(50)) and out != list(range(50))
    assert out == list(shuffle_buffer(range(50), 8, np.random.default_rng(0)))
