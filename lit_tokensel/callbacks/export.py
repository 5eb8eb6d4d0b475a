"""Export the trained model as a `save_pretrained` directory when `fit` ends."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import lightning as L

from lit_tokensel.export import check_export_target, export_pretrained, gather_for_export


class ExportOnFitEnd(L.Callback):
    """Write the model (LoRA merged) and tokenizer at the end of `fit`, atomically.

    Each run has an id (kept in its checkpoints, so a resumed run keeps it). A target directory that
    holds another run's export or other files is refused when `fit` starts, before any training,
    unless `overwrite`; a re-export of the same run replaces its previous export.

    Args:
        output_dir: Target directory; default `<trainer.log_dir>/export`.
        overwrite: Replace whatever `output_dir` holds.
    """

    def __init__(self, output_dir: str | None = None, overwrite: bool = False) -> None:
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.run_id = uuid.uuid4().hex
        self.exported_to: Path | None = None

    def resolve_output_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "export")

    @property
    def source(self) -> str:
        return f"run:{self.run_id}"

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run_id = str(state_dict.get("run_id", self.run_id))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        output_dir = self.resolve_output_dir(trainer)  # every rank: `trainer.log_dir` broadcasts
        if trainer.is_global_zero:  # fail before training, not after hours of it
            check_export_target(output_dir.absolute(), self.source, self.overwrite)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank: `trainer.log_dir` broadcasts, and a sharded (FSDP2) model is gathered collectively.
        output_dir = self.resolve_output_dir(trainer)
        model = gather_for_export(pl_module.model)
        if trainer.is_global_zero:
            self.exported_to = export_pretrained(
                model, pl_module.tokenizer, output_dir, source=self.source, overwrite=self.overwrite
            )
        trainer.strategy.barrier("export_on_fit_end")
