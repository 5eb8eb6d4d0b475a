"""Tiny models built locally for tests: a 2-layer Llama with the quickstart BPE tokenizer."""

from __future__ import annotations

import pytest
import torch

from lit_tokensel.builtin.models import ASSETS, build_model_dir
from lit_tokensel.data import SFTDataModule

QUICKSTART_TRAIN = ASSETS / "quickstart" / "train.jsonl"
"""The embedded quickstart rows; tests train on the first few."""

TINY_SPEC = {
    "seed": 0,
    "tokenizer": {"vocab_size": 512},
    "model": {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    },
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved 2-layer Llama (GQA) plus tokenizer; built once per test session."""
    target = tmp_path_factory.mktemp("models") / "tiny-llama"
    build_model_dir(TINY_SPEC, QUICKSTART_TRAIN, target)
    return str(target)


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs into a batch dict with sample ids 0..n-1."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        attention_mask[i, : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "sample_id": torch.arange(len(rows)),
    }


def synthetic_rows(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Sequences with a prompt part (label -100) and responses of very different lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt_len, response_len = 3 + i % 3, 2 + 5 * (i % 4)
        ids = torch.randint(3, vocab, (prompt_len + response_len,), generator=g).tolist()
        rows.append((ids, [-100] * prompt_len + ids[prompt_len:]))
    return rows


def save_perturbed_copy(model_dir: str, target, seed: int, scale: float = 0.3) -> str:
    """Save `model_dir`'s model with seeded Gaussian noise on every weight (a different model on the same
    tokenizer: a stand-in reference or history) to `target`; return the path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    return str(target)


def setup_datamodule(model_dir: str, workdir, **kwargs) -> SFTDataModule:
    """An `SFTDataModule` over `workdir/train.jsonl` with the model's tokenizer, batch 8, set up for fit."""
    dm = SFTDataModule(
        train_file=str(workdir / "train.jsonl"),
        tokenizer=model_dir,
        batch_size=8,
        cache_dir=str(workdir / "hf"),
        **kwargs,
    )
    dm.setup("fit")
    return dm
