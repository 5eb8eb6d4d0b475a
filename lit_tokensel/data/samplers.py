"""Training-order samplers whose order is a function of (seed, epoch) alone, so a resumed run replays it."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Epoch e's order as a seeded shuffling DataLoader gives it, computed from `(seed, epoch)` alone.

    The orders equal those of `DataLoader(shuffle=True, generator=Generator().manual_seed(seed))`,
    but computed from `(seed, epoch)` alone: the DataLoader draws epoch e's order from the generator's
    state after e epochs, so a run resumed from a checkpoint started a new generator and repeated epoch
    0's order. Lightning calls `set_epoch` on samplers that have it (also after a resume).
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch):  # replay what each earlier epoch drew from the generator
            _draw_epoch(generator, self.num_samples)
        return iter(_draw_epoch(generator, self.num_samples))

    def __len__(self) -> int:
        return self.num_samples


def _draw_epoch(generator: torch.Generator, n: int) -> list[int]:
    """One epoch of a shuffled DataLoader: its iterator's worker base seed, RandomSampler's permutation,
    and the empty remainder permutation RandomSampler also draws (`randperm(n)[: num_samples % n]`)."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    order = torch.randperm(n, generator=generator).tolist()
    torch.randperm(n, generator=generator)
    return order


class ResumableSampler(Sampler[int]):
    """Wraps an epoch-aware sampler so a run resumed mid-epoch skips the samples it already trained on.

    Lightning restores the loop's batch counter from a mid-epoch checkpoint but restarts a plain
    DataLoader from the beginning of the epoch, so without this the first batches of the epoch are
    seen twice and the last ones never. `resume_at(epoch, consumed)` (from the DataModule's checkpoint
    state) makes the next pass over `epoch` start after its first `consumed` samples; other epochs are
    untouched. `len()` stays the full epoch: Lightning counts the skipped batches as already done.
    """

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def resume_at(self, epoch: int, consumed: int) -> None:
        self._resume = (epoch, consumed) if consumed > 0 else None

    def __iter__(self) -> Iterator[int]:
        indices = iter(self.sampler)
        if self._resume is not None and self._resume[0] == self.epoch:
            for _ in range(self._resume[1]):
                next(indices, None)
        self._resume = None
        return indices

    def __len__(self) -> int:
        return len(self.sampler)
