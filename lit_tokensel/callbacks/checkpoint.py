"""A `ModelCheckpoint` that works with and without validation data, so one config serves both runs."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException


class MonitoredCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` keeping the best checkpoint by `monitor` when the run validates, and the latest
    one (at each epoch's end) when it has no validation data.

    A plain `ModelCheckpoint(monitor="val/loss")` in a run without validation data warns at every save
    and keeps no best checkpoint; this one drops the monitor at `setup` instead, says so once, and keeps
    the latest checkpoint (`save_top_k` 1, or all with -1). `save_last` and every other argument behave as
    in `ModelCheckpoint`.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.monitor is not None and stage == "fit" and not _has_validation(trainer):
            rank_zero_info(
                f"no validation data: checkpointing the latest model instead of the best {self.monitor!r}"
            )
            self.monitor = None
            if self.save_top_k > 1:
                self.save_top_k = 1
        super().setup(trainer, pl_module, stage)


def _has_validation(trainer: L.Trainer) -> bool:
    """Whether `fit` will run validation: some validation batches allowed and a non-empty val loader."""
    if trainer.limit_val_batches == 0:
        return False
    source = trainer.datamodule if trainer.datamodule is not None else trainer.lightning_module
    try:
        loaders = source.val_dataloader()
    except (MisconfigurationException, NotImplementedError):  # the hook is not implemented
        return False
    if loaders is None:
        return False
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if not isinstance(loaders, list | tuple):
        loaders = [loaders]
    return any(_nonempty(loader) for loader in loaders)


def _nonempty(loader: object) -> bool:
    try:
        return len(loader) > 0  # type: ignore[arg-type]
    except TypeError:  # an iterable-style loader has no length: assume it yields batches
        return True
