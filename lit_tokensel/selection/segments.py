"""Packed rows <-> per-sample frame: where each sample of a packed batch sits, and gathers between frames.

A packed batch (`lit_tokensel.data.packing`) puts several samples one after the other in a row:
`input_ids`, `labels`, `attention_mask` and `position_ids` are `[R, T]`, `sample_index` `[R, T]` says
which entry of `sample_id` `[N]` each token belongs to (-1 on the row's tail padding), and `labels` is
-100 on the first token of every sample, so no target crosses a sample boundary.

Every method selects in the per-sample frame that a padded batch of the same samples has (`[N, L]`
tokens, `[N, L-1]` targets, `L` the longest sample): `PackedLayout` gathers per-token tensors of the
packed rows into that frame (and back), so per-sequence rankings, min-max normalisation, neighbour
smoothing and sample statistics run unchanged and stay per sample. The forward passes run on the
packed rows. `sample_view` builds that padded-frame batch; it carries the rows under `PACKED_KEY`, so
a forward asked for on the view runs on the rows and gathers its output (`lit_tokensel.modeling.forward`).

Pure torch, no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
PACKED_KEY = "packed_rows"
"""Key of a sample view that holds its `PackedRows` (a non-tensor entry: never moved or indexed)."""
PACKED_FIELDS = ("input_ids", "labels", "attention_mask", "position_ids", "sample_index")
"""The `[R, T]` fields of a packed batch."""


def is_packed(batch: dict[str, Any]) -> bool:
    """True for a packed batch (rows with `sample_index`), False for a padded batch or a sample view."""
    return "sample_index" in batch


@dataclass(frozen=True)
class PackedLayout:
    """Where each of `N` samples lies in `R` packed rows of `T` tokens.

    Attributes:
        row: `[N]` row of each sample.
        start: `[N]` column of its first token.
        length: `[N]` its token count.
        width: `L`, the per-sample frame's token width (the longest sample, or more when asked).
        rows: `R`. columns: `T`.
    """

    row: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    width: int
    rows: int
    columns: int

    @classmethod
    def from_sample_index(
        cls, sample_index: torch.Tensor, num_samples: int, min_width: int = 0
    ) -> PackedLayout:
        """Layout from `sample_index` `[R, T]` (sample of each token, -1 on padding); checks that every
        sample is one contiguous run inside one row."""
        R, T = sample_index.shape
        real = sample_index >= 0  # [R, T]
        flat = sample_index.flatten()  # [R*T]
        positions = torch.arange(R * T, device=sample_index.device)  # [R*T]
        ids = flat[real.flatten()]
        length = torch.bincount(ids, minlength=num_samples)[:num_samples]  # [N]
        first = torch.full((num_samples,), R * T, dtype=torch.long, device=sample_index.device)
        first = first.scatter_reduce(0, ids, positions[real.flatten()], reduce="amin")  # [N]
        if bool((length == 0).any()):
            missing = (length == 0).nonzero().flatten().tolist()
            raise ValueError(f"packed batch: samples {missing} of sample_id have no token in sample_index")
        row, start = first // T, first % T
        layout = cls(row, start, length, max(int(length.max()), min_width), R, T)
        index, mask = layout._token_index(shift=False)
        if not bool(
            (
                flat[index][mask]
                == torch.arange(num_samples, device=flat.device)[:, None].expand_as(mask)[mask]
            ).all()
        ) or bool((start + length > T).any()):
            raise ValueError("packed batch: each sample must be one contiguous run of tokens inside one row")
        return layout

    @property
    def num_samples(self) -> int:
        return int(self.length.shape[0])

    def _token_index(self, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat index into `[R, T]` (or `[R, T-1]` when `shift`) for each `[N, L]` (`[N, L-1]`) entry, and
        the mask of entries that exist."""
        width = self.width - 1 if shift else self.width
        columns = self.columns - 1 if shift else self.columns
        offsets = torch.arange(max(width, 0), device=self.start.device)  # [L] or [L-1]
        count = self.length - 1 if shift else self.length  # [N]
        mask = offsets[None, :] < count[:, None]  # [N, L(-1)]
        index = (self.row * columns + self.start)[:, None] + offsets[None, :]  # [N, L(-1)]
        return index.masked_fill(~mask, 0), mask

    def to_samples(self, x: torch.Tensor, fill: float | int | bool = 0) -> torch.Tensor:
        """Gather a per-token tensor of the rows into the per-sample frame (differentiable).

        `[R, T, ...]` (tokens) gives `[N, L, ...]`; `[R, T-1, ...]` (targets, entry j predicts token j+1)
        gives `[N, L-1, ...]`. Entries past a sample's end hold `fill`.
        """
        shift = self._frame(x)
        index, mask = self._token_index(shift)  # [N, W]
        out = x.flatten(0, 1)[index.flatten()].view(*index.shape, *x.shape[2:])  # [N, W, ...]
        keep = mask.view(*mask.shape, *([1] * (x.dim() - 2)))
        return torch.where(keep, out, torch.full_like(out, fill))

    def to_rows(self, x: torch.Tensor, fill: float | int | bool = 0) -> torch.Tensor:
        """Scatter a per-sample tensor back into the rows: `[N, L, ...]` -> `[R, T, ...]`, `[N, L-1, ...]` ->
        `[R, T-1, ...]`; positions no sample covers hold `fill`."""
        if x.shape[1] not in (self.width, self.width - 1):
            raise ValueError(
                f"per-sample tensor of width {x.shape[1]}, expected {self.width} or {self.width - 1}"
            )
        shift = x.shape[1] == self.width - 1
        index, mask = self._token_index(shift)
        columns = self.columns - 1 if shift else self.columns
        out = torch.full((self.rows * columns, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
        out[index[mask]] = x[mask]
        return out.view(self.rows, columns, *x.shape[2:])

    def _frame(self, x: torch.Tensor) -> bool:
        if x.dim() < 2 or x.shape[0] != self.rows or x.shape[1] not in (self.columns, self.columns - 1):
            raise ValueError(
                f"tensor of shape {tuple(x.shape)} is not in the packed frame [R, T] = [{self.rows}, {self.columns}] "
                f"or [R, T-1]"
            )
        return x.shape[1] == self.columns - 1


@dataclass(frozen=True)
class PackedRows:
    """The packed batch behind a sample view, and its layout."""

    batch: dict[str, Any]
    layout: PackedLayout


def layout_of(batch: dict[str, Any], min_width: int = 0) -> PackedLayout:
    """The `PackedLayout` of a packed batch."""
    return PackedLayout.from_sample_index(batch["sample_index"], int(batch["sample_id"].shape[0]), min_width)


def sample_view(batch: dict[str, Any], layout: PackedLayout | None = None) -> dict[str, Any]:
    """The padded-frame batch of a packed batch's samples, in `sample_id` order.

    `input_ids` (0 past each sample's end), `attention_mask` and `labels` are `[N, L]`; `sample_id` and the
    `cached/<name>` columns (already per sample, `[N, L-1]`) pass through; `batch[PACKED_KEY]` holds the
    rows, so a model forward on the view runs on the rows. Labels are -100 on each sample's first token,
    which no target uses. Equals the padded collator's batch of the same samples (up to `input_ids` padding).
    """
    layout = layout if layout is not None else layout_of(batch)
    view: dict[str, Any] = {
        "input_ids": layout.to_samples(batch["input_ids"], 0),
        "attention_mask": layout.to_samples(torch.ones_like(batch["input_ids"]), 0),
        "labels": layout.to_samples(batch["labels"], IGNORE_INDEX),
    }
    for key, value in batch.items():
        if key not in PACKED_FIELDS:
            view[key] = value
    view[PACKED_KEY] = PackedRows(batch, layout)
    return view


def packed_rows(batch: dict[str, Any]) -> PackedRows | None:
    """The rows behind a sample view, or None for any other batch."""
    return batch.get(PACKED_KEY)


def as_samples(batch: dict[str, Any]) -> dict[str, Any]:
    """A packed batch's sample view; any other batch unchanged."""
    return sample_view(batch) if is_packed(batch) else batch


def to_sample_frame(batch: dict[str, Any], x: torch.Tensor | None) -> torch.Tensor | None:
    """`x`, computed on the rows behind the sample view `batch`, gathered into the per-sample frame;
    `x` unchanged when `batch` is no sample view (a padded batch).

    For per-token signals computed during the packed forward (ssToken's attention score)."""
    rows = packed_rows(batch)
    return x if rows is None or x is None else rows.layout.to_samples(x)


def drop_samples(batch: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """The packed batch without the samples where `keep` `[N]` is False: their tokens leave the rows.

    Kept samples move left inside their row (positions, labels and sample order unchanged), rows left
    empty go, and `T` shrinks to the fullest row, so dropped samples cost no forward or backward work
    (Q-Tuning's saving). Rows are not re-packed across each other: that would need another bin packing
    on the device for a small gain, and the kept samples' losses do not depend on it.
    """
    keep = keep.to(batch["sample_index"].device).bool()
    sample_index = batch["sample_index"]  # [R, T]
    real = sample_index >= 0
    tokens = real & keep[sample_index.clamp(min=0)]  # [R, T] tokens that stay
    counts = tokens.sum(dim=1)  # [R]
    rows = counts > 0  # [R]
    width = int(counts.max())
    column = tokens.long().cumsum(dim=1) - 1  # [R, T] new column of each staying token
    new_index = torch.cumsum(keep.long(), 0) - 1  # [N] old sample -> new sample
    R = int(rows.sum())
    out: dict[str, Any] = {}
    fills = {"input_ids": 0, "labels": IGNORE_INDEX, "attention_mask": 0, "sample_index": -1}
    src_rows = rows.nonzero().flatten()
    row_of = torch.cumsum(rows.long(), 0) - 1  # [R] old row -> new row
    r_idx, c_idx = tokens.nonzero(as_tuple=True)
    for key in PACKED_FIELDS:
        value = batch[key]
        if key == "position_ids":
            tail = torch.arange(width, device=value.device)[None, :] - counts[src_rows, None]  # [R', T']
            new = tail.clamp(min=0).to(value.dtype)  # the tail restarts at 0: its own segment
        else:
            new = torch.full((R, width), fills[key], dtype=value.dtype, device=value.device)
        src = value[r_idx, c_idx]
        if key == "sample_index":
            src = new_index[src]
        new[row_of[r_idx], column[r_idx, c_idx]] = src
        out[key] = new
    for key, value in batch.items():
        if key in PACKED_FIELDS:
            continue
        out[key] = value[keep] if torch.is_tensor(value) and value.dim() > 0 else value
    return out
