"""Right padding, attention mask and sample ids of collated batches."""

from __future__ import annotations

import pytest
import torch

from lit_tokensel.data import DataCollatorForSFT, pad_token_id_of

FEATURES = [
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "sample_id": 11},
    {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, -100, 10, 11, -100], "sample_id": 3},
]


def test_right_padding_and_attention_mask():
    batch = DataCollatorForSFT(pad_token_id=0)(FEATURES)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "sample_id"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, -100]]
    assert batch["sample_id"].tolist() == [11, 3]


def test_pad_to_multiple_of():
    batch = DataCollatorForSFT(pad_token_id=1, pad_to_multiple_of=4)(FEATURES)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0, 3:].tolist() == [1] * 5
    assert batch["attention_mask"].sum(1).tolist() == [3, 5]
    assert (batch["labels"][:, 5:] == -100).all()


def test_mismatched_lengths_refused():
    with pytest.raises(ValueError, match="sample 4: 2 input_ids but 1 labels"):
        DataCollatorForSFT(0)([{"input_ids": [1, 2], "labels": [1], "sample_id": 4}])


def test_pad_token_falls_back_to_eos(chat_tokenizer):
    assert pad_token_id_of(chat_tokenizer) == chat_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    chat_tokenizer.pad_token = None
    assert pad_token_id_of(chat_tokenizer) == chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
