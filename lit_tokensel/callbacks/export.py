"""Export the trained model as a `save_pretrained` directory when `fit` ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from lit_tokensel.export import export_pretrained, gather_for_export


class ExportOnFitEnd(L.Callback):
    """Write the model (LoRA merged) and tokenizer at the end of `fit`.

    Args:
        output_dir: Target directory; default `<trainer.log_dir>/export`.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = output_dir
        self.exported_to: Path | None = None

    def resolve_output_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "export")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank: `trainer.log_dir` broadcasts, and a sharded (FSDP2) model is gathered collectively.
        output_dir = self.resolve_output_dir(trainer)
        model = gather_for_export(pl_module.model)
        if trainer.is_global_zero:
            self.exported_to = export_pretrained(model, pl_module.tokenizer, output_dir)
        trainer.strategy.barrier("export_on_fit_end")
