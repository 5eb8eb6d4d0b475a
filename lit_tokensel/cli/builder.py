"""The one LightningCLI of the project: `TokenSelCLI` and `build_cli`, used by every subcommand and recipe."""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from rich.console import Console

from lit_tokensel.callbacks.export import ExportOnFitEnd
from lit_tokensel.checkpoint_io import check_cli_checkpoint, use_checksummed_checkpoints
from lit_tokensel.cli.errors import RaisesWithOptions
from lit_tokensel.data import SFTDataModule
from lit_tokensel.methods.base import TokenSelectionModule


class TokenSelParser(RaisesWithOptions, LightningArgumentParser):
    """LightningCLI's parser, raising its errors for the CLI's one-line report."""


class TokenSelCLI(LightningCLI):
    """LightningCLI with the export callback always configured and a summary after `fit`."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ExportOnFitEnd, "export")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        check_cli_checkpoint(self.config)  # before LightningCLI reads --ckpt_path's hyper-parameters

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        use_checksummed_checkpoints(trainer)  # atomic .ckpt files with a sha256 sidecar
        return trainer

    def after_fit(self) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir  # on every rank: it broadcasts from rank 0 in multi-process runs
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
        exporter = next((c for c in trainer.callbacks if isinstance(c, ExportOnFitEnd)), None)
        checkpoint = trainer.checkpoint_callback
        console = Console(stderr=True)
        console.rule("lit-tokensel: run finished")
        console.print(f"method        {type(self.model).__name__}")
        console.print(f"steps         {trainer.global_step}")
        for key in ("train/loss", "val/loss", "val/ppl"):
            if key in metrics:
                console.print(f"{key:<13} {metrics[key]:.4f}")
        console.print(f"logs          {log_dir}")
        if checkpoint is not None and (checkpoint.last_model_path or checkpoint.best_model_path):
            console.print(f"checkpoint    {checkpoint.last_model_path or checkpoint.best_model_path}")
        if exporter is not None and exporter.exported_to is not None:
            console.print(f"export        {exporter.exported_to}  (AutoModelForCausalLM.from_pretrained)")


def build_cli(args: list[str] | None, *, run: bool = False, description: str | None = None) -> TokenSelCLI:
    """Parse `args` (None: `sys.argv`) into model, DataModule and Trainer exactly as `lit-tokensel fit` does.

    `run=True` also runs the subcommand in `args` (fit, validate, ...) and saves its config; `run=False`
    only instantiates (for `score`, `inspect` and recipe stages, which save no config of their own).
    """
    extra: dict[str, Any] = (
        {"save_config_kwargs": {"overwrite": True}} if run else {"save_config_callback": None}
    )
    with warnings.catch_warnings():  # our subcommands pass their remaining args on purpose
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return TokenSelCLI(
            TokenSelectionModule,
            SFTDataModule,
            subclass_mode_model=True,
            run=run,
            args=args,
            parser_class=TokenSelParser,
            parser_kwargs={"exit_on_error": False, **({"description": description} if description else {})},
            **extra,
        )
