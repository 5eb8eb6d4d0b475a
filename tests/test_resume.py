"""Exact resume from every checkpoint a fit writes: validation-time (`val_check_interval: 0.5` with a monitored
`ModelCheckpoint`, as configs/quickstart.yaml), end-of-epoch ones, and the recipe's `resume/last.ckpt`.

A run is "killed" by an exception right after a checkpoint was written; the resumed run must end with the
same weights (and EMA history) as the uninterrupted one, bit for bit (CPU, float32, no dropout).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_tokensel import FullSFT, SsTokenSFT
from lit_tokensel.data import SFTDataModule
from lit_tokensel.reference import HistoryReference
from tests.model_fixtures import QUICKSTART_TRAIN

TRAIN_ROWS, VAL_ROWS, BATCH = 24, 8, 4  # 6 batches per epoch; validation after batches 3 and 6
EPOCHS = 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume")
    rows = QUICKSTART_TRAIN.read_text().splitlines()
    (path / "train.jsonl").write_text("\n".join(rows[:TRAIN_ROWS]) + "\n")
    (path / "val.jsonl").write_text("\n".join(rows[TRAIN_ROWS : TRAIN_ROWS + VAL_ROWS]) + "\n")
    return path


class Killed(Exception):
    """Stands in for kill -9: the run stops at once, after the last checkpoint was written."""


class KillAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def _quickstart_checkpoint(dirpath: Path) -> ModelCheckpoint:
    """configs/quickstart.yaml's checkpoint callback."""
    return ModelCheckpoint(dirpath=dirpath, save_last=True, save_top_k=1, monitor="val/loss", mode="min")


def _recipe_checkpoint(dirpath: Path) -> ModelCheckpoint:
    """lit_tokensel/recipes/stages.py's `resume/last.ckpt` callback."""
    return ModelCheckpoint(dirpath=dirpath, filename="last", save_top_k=1, enable_version_counter=False)


def _full_sft(model_dir: str) -> tuple[L.LightningModule, HistoryReference | None]:
    return FullSFT(model=model_dir, learning_rate=1e-2, lr_schedule="cosine", warmup_ratio=0.1), None


def _sstoken(model_dir: str) -> tuple[L.LightningModule, HistoryReference | None]:
    history = HistoryReference("ema", decay=0.5)
    module = SsTokenSFT(
        history=history,
        model=model_dir,
        learning_rate=1e-2,
        lr_schedule="cosine",
        warmup_ratio=0.1,
        warmup=0.5,
    )
    return module, history


def _fit(
    make,
    model_dir: str,
    workdir: Path,
    checkpoint: ModelCheckpoint,
    *,
    val: bool,
    kill_at: int | None = None,
    ckpt_path: Path | None = None,
):
    L.seed_everything(0)
    module, history = make(model_dir)
    dm = SFTDataModule(
        train_file=str(workdir / "train.jsonl"),
        val_file=str(workdir / "val.jsonl") if val else None,
        tokenizer=model_dir,
        batch_size=BATCH,
        cache_dir=str(workdir / "hf"),
        seed=0,
    )
    callbacks: list[L.Callback] = [checkpoint]
    if kill_at is not None:
        callbacks.append(KillAtStep(kill_at))
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        val_check_interval=0.5 if val else None,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=workdir,
        callbacks=callbacks,
    )
    if kill_at is None:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    else:
        with pytest.raises(Killed):
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, history, trainer


def _assert_same(resumed, full) -> None:
    (module, history, trainer), (ref_module, ref_history, ref_trainer) = resumed, full
    assert trainer.global_step == ref_trainer.global_step == EPOCHS * TRAIN_ROWS // BATCH
    ref_weights = ref_module.model.state_dict()
    for key, value in module.model.state_dict().items():
        assert torch.equal(value, ref_weights[key]), key
    if ref_history is not None:
        assert history.updates == ref_history.updates == ref_trainer.global_step
        for a, b in zip(history.shadow, ref_history.shadow, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("make", [_full_sft, _sstoken], ids=["full_sft", "sstoken_ema"])
@pytest.mark.parametrize("kill_at", [3, 6, 9], ids=["mid_epoch_0", "end_of_epoch_0", "mid_epoch_1"])
def test_resume_from_validation_time_last_ckpt_equals_uninterrupted_run(
    tiny_model_dir, workdir, tmp_path, make, kill_at
):
    """The quickstart's `last.ckpt` is written at each validation (after batches 3 and 6 of each epoch)."""
    full = _fit(make, tiny_model_dir, workdir, _quickstart_checkpoint(tmp_path / "full"), val=True)
    _fit(make, tiny_model_dir, workdir, _quickstart_checkpoint(tmp_path / "run"), val=True, kill_at=kill_at)
    last = tmp_path / "run" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == kill_at
    resumed = _fit(
        make, tiny_model_dir, workdir, _quickstart_checkpoint(tmp_path / "run"), val=True, ckpt_path=last
    )
    _assert_same(resumed, full)


@pytest.mark.parametrize("val", [True, False], ids=["with_val", "without_val"])
def test_resume_from_the_recipes_last_ckpt_equals_uninterrupted_run(tiny_model_dir, workdir, tmp_path, val):
    """The recipe's `resume/last.ckpt`: at each validation with val data, at each epoch's end without."""
    kill_at = 3 if val else 6
    full = _fit(_sstoken, tiny_model_dir, workdir, _recipe_checkpoint(tmp_path / "full"), val=val)
    _fit(_sstoken, tiny_model_dir, workdir, _recipe_checkpoint(tmp_path / "resume"), val=val, kill_at=kill_at)
    last = tmp_path / "resume" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == kill_at
    resumed = _fit(
        _sstoken, tiny_model_dir, workdir, _recipe_checkpoint(tmp_path / "resume"), val=val, ckpt_path=last
    )
    _assert_same(resumed, full)


def test_validation_time_checkpoint_records_the_data_position(tiny_model_dir, workdir, tmp_path):
    _fit(_full_sft, tiny_model_dir, workdir, _quickstart_checkpoint(tmp_path), val=True, kill_at=3)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert state["SFTDataModule"] == {"epoch": 0, "consumed_samples": 3 * BATCH}
