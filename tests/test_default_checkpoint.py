"""The quickstart's checkpointing works with and without validation data (one config for both runs)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from lit_tokensel.cli import main

QUICKSTART = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
SHORT = [
    "--trainer.max_epochs",
    "2",
    "--trainer.limit_train_batches",
    "3",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.log_every_n_steps",
    "1",
]


def _fit(run_dir: Path, *args: str) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run_dir)
        mp.setattr(sys, "argv", ["lit-tokensel"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main(["fit", "-c", str(QUICKSTART), *SHORT, *args])
    assert not [w for w in caught if "monitored key" in str(w.message)]
    return run_dir / "runs" / "quickstart" / "full_sft" / "version_0" / "checkpoints"


def test_quickstart_without_validation_data_keeps_the_latest_checkpoint(tmp_path):
    checkpoints = _fit(tmp_path, "--data.val_file", "null")
    assert sorted(p.name for p in checkpoints.iterdir()) == [  # each with its sha256 sidecar
        "epoch=1-step=6.ckpt",
        "epoch=1-step=6.ckpt.sha256",
        "last.ckpt",
        "last.ckpt.sha256",
    ]
    state = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert state["global_step"] == 6 and state["SFTDataModule"] == {"epoch": 1, "consumed_samples": 3 * 16}


def test_quickstart_with_validation_data_keeps_the_best_checkpoint(tmp_path):
    checkpoints = _fit(tmp_path, "--trainer.val_check_interval", "1.0", "--trainer.limit_val_batches", "1")
    names = sorted(p.name for p in checkpoints.iterdir())
    # the loss falls, so the best is the latest; each with its sha256 sidecar
    assert names == ["epoch=1-step=6.ckpt", "epoch=1-step=6.ckpt.sha256", "last.ckpt", "last.ckpt.sha256"]
    callbacks = torch.load(checkpoints / "last.ckpt", weights_only=True)["callbacks"]
    (state,) = [v for k, v in callbacks.items() if k.startswith("MonitoredCheckpoint")]
    assert state["monitor"] == "val/loss" and state["best_model_path"].endswith("epoch=1-step=6.ckpt")
