"""Training-order samplers whose order is a function of (seed, epoch) alone, so a resumed run replays it."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A fresh seeded permutation per epoch: `randperm(n, seed + epoch)`.

    A DataLoader with `shuffle=True` and a seeded generator draws epoch e's order from the generator's
    state after e epochs; a run resumed from a checkpoint starts a new generator and so repeats epoch
    0's order. Lightning calls `set_epoch` on samplers that have it (also after a resume), which makes
    this order depend only on the epoch number.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples
