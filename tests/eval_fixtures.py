"""Models for the evaluation tests: an untrained tiny Llama and the same model after a short quickstart SFT.

Training uses the quickstart's own data, restricted to the families the bundled tasks ask about (capital
cities, next letter), with `FullSFT` and the `SFTDataModule`, so the trained model answers in the chat
format the bundled tasks prompt with. 300 steps take about ten seconds on one CPU thread.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lit_tokensel.builtin.models import ASSETS, build_model_dir

EVAL_SPEC = {
    "seed": 0,
    "tokenizer": {"vocab_size": 512},
    "model": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
}
BUNDLED_QUESTION_PREFIXES = ("What is the capital of ", "Which letter comes after ")
TRAIN_STEPS = 300


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads. Tiny models are several times faster on one thread, and much more so
    when other processes share the CPU cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class EvalModels:
    untrained_dir: Path
    trained_dir: Path
    checkpoint: Path


def quickstart_rows_for_bundled_tasks() -> list[dict]:
    """Rows of the shipped quickstart training data whose every user turn is a capital or next-letter question."""
    rows = []
    for line in (ASSETS / "quickstart" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        questions = [m["content"] for m in row["messages"] if m["role"] == "user"]
        if all(q.startswith(BUNDLED_QUESTION_PREFIXES) for q in questions):
            rows.append(row)
    return rows


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory: pytest.TempPathFactory) -> EvalModels:
    """An untrained tiny model, the same after `TRAIN_STEPS` of quickstart SFT, and that run's checkpoint."""
    import lightning as L

    from lit_tokensel import FullSFT, SFTDataModule
    from lit_tokensel.export import export_pretrained

    root = tmp_path_factory.mktemp("eval_models")
    untrained = root / "untrained"
    build_model_dir(EVAL_SPEC, ASSETS / "quickstart" / "train.jsonl", untrained)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in quickstart_rows_for_bundled_tasks()))
    with torch_threads(1):
        L.seed_everything(0)
        module = FullSFT(model=str(untrained), learning_rate=5e-3, lr_schedule="cosine", warmup_ratio=0.05)
        datamodule = SFTDataModule(
            train_file=str(data), batch_size=16, max_length=96, cache_dir=str(root / "hf")
        )
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=TRAIN_STEPS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=datamodule)
    checkpoint = root / "quickstart_sft.ckpt"
    trainer.save_checkpoint(checkpoint)
    trained = export_pretrained(module.model, module.tokenizer, root / "trained")
    return EvalModels(untrained_dir=untrained, trained_dir=trained, checkpoint=checkpoint)
