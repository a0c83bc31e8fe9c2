"""Shuffled, sharded, resumable batches over an in-memory dataset or a stream.

Every rank builds the same global order of sequences for an epoch (seeded by `(seed, epoch)`), cuts
it into global batches of `batch_size * world_size` sequences and keeps its own contiguous
`batch_size` of each. So ranks see disjoint sequences and the same number of batches; the
incomplete last global batch of an epoch is dropped (a different remainder each epoch, as the order
changes). Epochs repeat forever: the training loop decides when to stop.

The cursor is `(epoch, sequences consumed in that epoch by all ranks together)`; it is the same on
every rank and independent of `world_size`. Restoring it reproduces the batches an uninterrupted
run would have yielded next: an in-memory source jumps straight there, a streaming source re-reads
its epoch from the start and skips the consumed sequences (costs re-tokenising them).
"""

from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from itertools import islice
from typing import Any, Protocol, TypeVar

import numpy as np

from rwkvinside.data.batch import Batch, Sample, collate
from rwkvinside.errors import UserError

T = TypeVar("T")


class Dataset(Protocol):
    """Indexable samples: `PackedDataset`, `ChatDataset`."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


class Source(Protocol):
    """A seeded global order of sequences per epoch."""

    def epoch(self, epoch: int, start: int) -> Iterator[Sample]:
        """The epoch's sequences in order, from the `start`-th on."""

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between saving and restoring a cursor."""


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """An independent, reproducible generator per (seed, epoch)."""
    return np.random.default_rng([seed, epoch])


class MapSource:
    """An in-memory dataset in a fresh permutation each epoch."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def epoch(self, epoch: int, start: int) -> Iterator[Sample]:
        order = epoch_rng(self.seed, epoch).permutation(len(self.dataset))
        return (self.dataset[int(index)] for index in order[start:])

    def fingerprint(self) -> dict[str, Any]:
        return {"seed": self.seed, "sequences": len(self.dataset)}


class WeightedSource:
    """In-memory datasets mixed by weight, in a fresh permutation each epoch.

    A weight w is how many times each item of its dataset appears per epoch on average: every item
    floor(w) times, and a random round(frac(w) * n) of the dataset's n items once more, drawn anew
    each epoch (weight 2: each item twice; 0.5: a random half of the items). Like everything in an
    epoch's order, the draw depends on (seed, epoch) alone, so every rank makes the same one.
    """

    def __init__(self, parts: Sequence[tuple[Dataset, float]], seed: int) -> None:
        """parts: (dataset, weight > 0) pairs; the items are numbered across them in this order."""
        self.datasets = [dataset for dataset, _ in parts]
        self.weights = [weight for _, weight in parts]
        self.seed = seed
        self.starts = np.cumsum([0] + [len(dataset) for dataset in self.datasets])  # first number of each

    def __len__(self) -> int:
        return sum(len(dataset) * int(weight) + round(weight % 1 * len(dataset))
                   for dataset, weight in zip(self.datasets, self.weights))

    def order(self, epoch: int) -> np.ndarray:
        """The numbers of the epoch's items, in order."""
        extra = np.random.default_rng([self.seed, epoch, 1])  # apart from the permutation's generator
        items = []
        for start, dataset, weight in zip(self.starts, self.datasets, self.weights):
            size = len(dataset)
            chosen = extra.choice(size, round(weight % 1 * size), replace=False)
            items.append(start + np.concatenate([np.tile(np.arange(size), int(weight)), chosen]))
        everything = np.concatenate(items)
        return everything[epoch_rng(self.seed, epoch).permutation(everything.size)]

    def epoch(self, epoch: int, start: int) -> Iterator[Sample]:
        return (self._item(int(number)) for number in self.order(epoch)[start:])

    def _item(self, number: int) -> Sample:
        part = int(np.searchsorted(self.starts, number, side="right")) - 1
        return self.datasets[part][number - int(self.starts[part])]

    def fingerprint(self) -> dict[str, Any]:
        return {"seed": self.seed, "sequences": [len(dataset) for dataset in self.datasets],
                "weights": self.weights}


class StreamSource:
    """Sequences produced on the fly each epoch, shuffled within a bounded buffer.

    The buffer holds compact items (token windows, rendered conversations) rather than padded
    samples, and `to_sample` turns an item into a `Sample` only when it is taken.
    """

    def __init__(self, make_items: Callable[[], Iterable[Any]], to_sample: Callable[[Any], Sample],
                 seed: int, buffer_size: int) -> None:
        """make_items: returns a fresh pass over the data, in the same order every call."""
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size}")
        self.make_items = make_items
        self.to_sample = to_sample
        self.seed = seed
        self.buffer_size = buffer_size

    def epoch(self, epoch: int, start: int) -> Iterator[Sample]:
        shuffled = shuffle_buffer(self.make_items(), self.buffer_size, epoch_rng(self.seed, epoch))
        return map(self.to_sample, islice(shuffled, start, None))

    def fingerprint(self) -> dict[str, Any]:
        return {"seed": self.seed, "buffer_size": self.buffer_size}


def shuffle_buffer(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Approximate shuffle holding at most `size` items: emit a random held item as each new one arrives."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = item
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


class ShardedLoader:
    """Endless iterator of this rank's batches (dicts of [batch_size, T] tensors) with a resumable cursor."""

    def __init__(self, source: Source, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, "
                             f"{world_size}")
        self.source = source
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.consumed = 0  # sequences of this epoch taken by all ranks together
        self._sequences: Iterator[Sample] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int | None:
        """Batches per epoch on each rank; None for a stream, whose length is unknown in advance."""
        return len(self.source) // self.global_batch if isinstance(self.source, Sized) else None

    def __iter__(self) -> "ShardedLoader":
        return self

    def __next__(self) -> Batch:
        while True:
            if self._sequences is None:
                self._sequences = self.source.epoch(self.epoch, self.consumed)
            group = list(islice(self._sequences, self.global_batch))
            if len(group) == self.global_batch:
                self.consumed += self.global_batch
                return collate(group[self.rank * self.batch_size: (self.rank + 1) * self.batch_size])
            if self.consumed == 0:  # a whole epoch without one global batch would loop forever
                raise UserError(f"an epoch has {len(group)} sequences but one global batch needs batch size "
                                f"{self.batch_size} x {self.world_size} ranks = {self.global_batch}; lower "
                                "the batch size or add data")
            self.epoch, self.consumed, self._sequences = self.epoch + 1, 0, None

    def state_dict(self) -> dict[str, Any]:
        """The cursor after the last batch yielded; the same on every rank."""
        return {"epoch": self.epoch, "consumed": self.consumed, "source": self.source.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved cursor; the next batch is the one an uninterrupted run would yield."""
        if state["source"] != self.source.fingerprint():
            raise UserError(f"the data loader state in the checkpoint was saved for {state['source']} but "
                            f"this run reads {self.source.fingerprint()}; resume with the same data and seed")
        self.epoch, self.consumed, self._sequences = state["epoch"], state["consumed"], None
