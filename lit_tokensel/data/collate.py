"""Right-padding collator for tokenized SFT samples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lit_tokensel.data.tokenization import IGNORE_INDEX


def pad_token_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad token id, falling back to its eos token id."""
    for name in ("pad_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return int(token_id)
    raise ValueError(
        f"{type(tokenizer).__name__} has neither a pad token nor an eos token; set tokenizer.pad_token"
    )


class LossLookup(Protocol):
    """Per-sample cached losses: `lookup[sample_id]` is a float array of `len(input_ids) - 1` values."""

    def __getitem__(self, sample_id: int) -> Any: ...


@dataclass
class DataCollatorForSFT:
    """Pad `input_ids`/`labels` on the right and add `attention_mask`; keep `sample_id`.

    Each feature is a mapping with `input_ids` and `labels` (equal-length int sequences) and `sample_id`
    (int). The batch holds `input_ids`, `attention_mask`, `labels` as `[B, T]` long tensors (`labels` is
    -100 on padding) and `sample_id` as `[B]` long. `T` is the longest sample, rounded up to a multiple
    of `pad_to_multiple_of` when given.

    `cached` maps a name to per-sample cached losses (e.g. a `TokenLossCache`); each adds
    `batch["cached/<name>"]`, float32 `[B, T-1]` aligned with `labels[:, 1:]`, 0 on padding, joined by
    `sample_id` so it stays right under shuffling.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    cached: Mapping[str, LossLookup] = field(default_factory=dict)
    token_weights: Mapping[int, Sequence[float]] = field(default_factory=dict)
    """Per-token weights from the data by `sample_id` (`lit_tokensel.data.weights`); when any, every batch
    gets `batch["token_weights"]`, float32 `[B, T-1]` aligned with `labels[:, 1:]`, 1 where none is given."""

    def __post_init__(self) -> None:
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {self.pad_to_multiple_of}")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of samples")
        lengths = [len(f["input_ids"]) for f in features]
        max_len = max(lengths)
        if self.pad_to_multiple_of:
            max_len = -(-max_len // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(features)
        input_ids = torch.full((batch_size, max_len), self.pad_token_id, dtype=torch.long)  # [B, T]
        labels = torch.full((batch_size, max_len), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((batch_size, max_len), dtype=torch.long)  # [B, T]
        for i, (feature, length) in enumerate(zip(features, lengths, strict=True)):
            if len(feature["labels"]) != length:
                raise ValueError(
                    f"sample {feature.get('sample_id')}: {length} input_ids but {len(feature['labels'])} labels"
                )
            input_ids[i, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[i, :length] = torch.as_tensor(feature["labels"], dtype=torch.long)
            attention_mask[i, :length] = 1
        sample_id = torch.tensor([int(f["sample_id"]) for f in features], dtype=torch.long)  # [B]
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "sample_id": sample_id,
        }
        for name, lookup in self.cached.items():
            batch[f"cached/{name}"] = self._join(name, lookup, sample_id.tolist(), lengths, max_len)
        if self.token_weights:
            batch["token_weights"] = self._join_weights(sample_id.tolist(), lengths, max_len)
        return batch

    def _join_weights(self, sample_ids: list[int], lengths: list[int], max_len: int) -> torch.Tensor:
        """The data weights of these samples' targets, float32 `[B, max_len-1]`, 1 where none is given."""
        weights = torch.ones((len(sample_ids), max(max_len - 1, 0)), dtype=torch.float32)  # [B, T-1]
        for i, (sid, length) in enumerate(zip(sample_ids, lengths, strict=True)):
            if sid in self.token_weights:
                weights[i, : length - 1] = torch.tensor(
                    self.token_weights[sid][1:length], dtype=torch.float32
                )
        return weights

    @staticmethod
    def _join(
        name: str, lookup: LossLookup, sample_ids: list[int], lengths: list[int], max_len: int
    ) -> torch.Tensor:
        """Cached rows of these samples, right-padded with 0 into `[B, T-1]`."""
        out = torch.zeros((len(sample_ids), max(max_len - 1, 0)), dtype=torch.float32)  # [B, T-1]
        for i, (sid, length) in enumerate(zip(sample_ids, lengths, strict=True)):
            row = torch.tensor(
                lookup[sid], dtype=torch.float32
            )  # [len - 1], a copy (cached rows are read-only)
            if row.shape[0] != length - 1:
                raise ValueError(
                    f"cached/{name}: sample {sid} has {row.shape[0]} cached losses but {length} tokens "
                    f"(expected {length - 1}); the cache was made with another tokenization"
                )
            out[i, : length - 1] = row
        return out
