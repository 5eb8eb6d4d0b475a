"""Disjoint data chunks, one per epoch: self-evolving TokenCleaning trains round t on chunk t only.

The training samples are split once, by a seeded permutation of their dataset positions, into
`num_chunks` disjoint chunks that cover the dataset (sizes differ by at most one; the first chunks
are the larger ones). Epoch `e` yields a seeded shuffle of chunk `e % num_chunks` and nothing else.
Membership depends only on `(num_samples, num_chunks, seed)`, so a resumed run and the method that
scores a chunk see the same chunks as the sampler.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler


def chunk_partition(num_samples: int, num_chunks: int, seed: int) -> list[np.ndarray]:
    """`num_chunks` disjoint, sorted arrays of dataset positions that together cover `range(num_samples)`."""
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"epoch_chunks={num_chunks!r} must be an integer >= 1")
    if num_samples < num_chunks:
        raise ValueError(
            f"cannot split {num_samples} training samples into {num_chunks} non-empty chunks; "
            f"lower epoch_chunks (and the method's chunks) or add data"
        )
    order = np.random.default_rng([seed, 0]).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_chunks)]


def train_chunks(datamodule: Any) -> list[np.ndarray]:
    """The chunks of a set-up `SFTDataModule` with `epoch_chunks` (the ones its train sampler uses)."""
    return chunk_partition(len(datamodule.train_dataset), datamodule.epoch_chunks, datamodule.seed)


class ChunkSampler(Sampler[int]):
    """Yields, in epoch `e`, a seeded shuffle of the dataset positions of chunk `e % num_chunks`.

    Lightning calls `set_epoch` before every epoch (also through its distributed wrapper, which then
    shards the chunk over ranks). `len()` is the size of the current epoch's chunk; Lightning reads
    it once, at epoch 0, for `trainer.estimated_stepping_batches`, and chunk 0 is the largest, so
    the schedule length is exact when the chunks have equal batch counts and otherwise
    over-estimates by at most one batch per epoch (the schedule never runs past its end).

    Args:
        num_samples: Size of the training dataset.
        num_chunks: Number of disjoint chunks (rounds).
        seed: Seed of the chunk membership and of each epoch's order.
        shuffle: Shuffle within the chunk (False yields the chunk in position order).
    """

    def __init__(self, num_samples: int, num_chunks: int, seed: int = 0, shuffle: bool = True) -> None:
        self.chunks = chunk_partition(num_samples, num_chunks, seed)
        self.num_chunks = num_chunks
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def chunk_index(self) -> int:
        """The chunk of the current epoch."""
        return self.epoch % self.num_chunks

    def __len__(self) -> int:
        return len(self.chunks[self.chunk_index])

    def __iter__(self) -> Iterator[int]:
        positions = self.chunks[self.chunk_index]
        if self.shuffle:
            positions = np.random.default_rng([self.seed, 1, self.epoch]).permutation(positions)
        return iter(positions.tolist())
