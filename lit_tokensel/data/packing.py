"""Padding-free batches: each batch's samples packed into rows by best-fit decreasing.

The sampler decides which samples make a batch (the seeded, resumable shuffle of the padded case), and
this collator packs exactly those samples into as few rows as best-fit decreasing finds, rows as wide
as the batch's longest sample or a fixed `max_tokens_per_row`. Batch composition, and so every batch-scoped ranking, the loss normaliser and
the resume position (`consumed_samples`), are those of the padded run; only the padding goes away.
Best-fit decreasing depends on the lengths and their order alone, so packing is deterministic from the
sampler's seed and epoch.

A packed batch holds, besides the padded collator's `sample_id` `[N]`, `cached/<name>` `[N, L-1]` and
data weights `token_weights` `[N, L-1]` (joined by sample id, per sample, `L` the longest sample):

- `input_ids`, `labels`, `attention_mask`, `position_ids`, `sample_index`: `[R, T]` long.
- `position_ids` restart at 0 at every sample (and at the row's tail padding, its own segment), which is
  how transformers confines attention to a sample: a block-diagonal causal mask for SDPA, eager and
  flex attention when the model gets no `attention_mask`, FlashAttention's varlen kernel otherwise.
- `sample_index` is the entry of `sample_id` that each token belongs to, -1 on padding: the per-token
  sample id is `sample_id[sample_index]`.
- `labels` is -100 on every sample's first token, so no target crosses a sample boundary (a padded
  batch never uses `labels[:, 0]` either).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lit_tokensel.data.collate import DataCollatorForSFT
from lit_tokensel.data.tokenization import IGNORE_INDEX


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each summing to at most `capacity`, by best-fit decreasing.

    Items go longest first (ties: the earlier index first) into the open bin with the least room that
    still fits them, else into a new bin (ties between bins: the earlier bin). Deterministic.
    """
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be >= 1")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"item {i} has {n} tokens, more than a packed row holds ({capacity})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin index), sorted
    for i in order:
        slot = bisect.bisect_left(room, (lengths[i], -1))
        if slot == len(room):
            bins.append([i])
            free, b = capacity - lengths[i], len(bins) - 1
        else:
            free, b = room.pop(slot)
            bins[b].append(i)
            free -= lengths[i]
        bisect.insort(room, (free, b))
    return bins


@dataclass
class PackedCollatorForSFT(DataCollatorForSFT):
    """Packs a batch's samples into rows of at most `max_tokens_per_row` tokens (see the module docstring).

    `max_tokens_per_row=None` (the default) makes rows as wide as the batch's longest sample: no row is
    wider than the padded batch, so SDPA's and eager attention's per-row `T x T` cost never grows, and
    the rows are fewer. A fixed width packs denser, which pays with FlashAttention's varlen kernel (its
    cost is per sample, not per row). `T` is the fullest row, rounded up to a multiple of
    `pad_to_multiple_of` when given. Samples keep their order in `sample_id`; inside a row they follow
    the packing order (longest first).
    """

    max_tokens_per_row: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_tokens_per_row is not None and self.max_tokens_per_row < 1:
            raise ValueError(f"max_tokens_per_row must be >= 1 or None, got {self.max_tokens_per_row}")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of samples")
        lengths = [len(f["input_ids"]) for f in features]
        for f, n in zip(features, lengths, strict=True):
            if len(f["labels"]) != n:
                raise ValueError(f"sample {f.get('sample_id')}: {n} input_ids but {len(f['labels'])} labels")
        capacity = self.max_tokens_per_row or max(lengths)
        for f, n in zip(features, lengths, strict=True):
            if n > capacity:
                raise ValueError(
                    f"packing: sample {f.get('sample_id')} has {n} tokens, more than max_tokens_per_row="
                    f"{self.max_tokens_per_row}; make it at least data.max_length"
                )
        bins = best_fit_decreasing(lengths, capacity)
        width = max(sum(lengths[i] for i in b) for b in bins)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(bins), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)  # [R, T]
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)  # [R, T]
        attention_mask = torch.zeros(shape, dtype=torch.long)  # [R, T]
        position_ids = torch.zeros(shape, dtype=torch.long)  # [R, T]
        sample_index = torch.full(shape, -1, dtype=torch.long)  # [R, T]
        for r, members in enumerate(bins):
            column = 0
            for i in members:
                n, span = lengths[i], slice(column, column + lengths[i])
                input_ids[r, span] = torch.as_tensor(features[i]["input_ids"], dtype=torch.long)
                labels[r, span] = torch.as_tensor(features[i]["labels"], dtype=torch.long)
                labels[r, column] = IGNORE_INDEX  # a target never crosses into the next sample
                attention_mask[r, span] = 1
                position_ids[r, span] = torch.arange(n)
                sample_index[r, span] = i
                column += n
            position_ids[r, column:] = torch.arange(width - column)  # the tail is a segment of its own
        sample_id = torch.tensor([int(f["sample_id"]) for f in features], dtype=torch.long)  # [N]
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "position_ids": position_ids,
            "sample_index": sample_index,
            "sample_id": sample_id,
        }
        for name, lookup in self.cached.items():  # per sample, [N, L-1], as in a padded batch
            batch[f"cached/{name}"] = self._join(name, lookup, sample_id.tolist(), lengths, max(lengths))
        if self.token_weights:  # per sample too, [N, L-1]
            batch["token_weights"] = self._join_weights(sample_id.tolist(), lengths, max(lengths))
        return batch


def padding_fraction(batch: Mapping[str, torch.Tensor]) -> float:
    """Share of the batch's `[R, T]` (or `[B, T]`) positions that are padding."""
    mask = batch["attention_mask"]
    return 1.0 - float(mask.sum()) / max(mask.numel(), 1)
