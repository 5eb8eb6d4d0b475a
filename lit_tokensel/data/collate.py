"""Right-padding collator for tokenized SFT samples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass
class DataCollatorForSFT:
    """Pad `input_ids`/`labels` on the right and add `attention_mask`; keep `sample_id`.

    Each feature is a mapping with `input_ids` and `labels` (equal-length int sequences) and `sample_id`
    (int). The batch holds `input_ids`, `attention_mask`, `labels` as `[B, T]` long tensors (`labels` is
    -100 on padding) and `sample_id` as `[B]` long. `T` is the longest sample, rounded up to a multiple
    of `pad_to_multiple_of` when given.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

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
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "sample_id": sample_id,
        }
