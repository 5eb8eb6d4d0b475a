"""The one LightningCLI of the project: `TokenSelCLI` and `build_cli`, used by every subcommand and recipe."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from rich.console import Console

from lit_tokensel.callbacks.export import ExportOnFitEnd
from lit_tokensel.checkpoint_io import check_cli_checkpoint, load_checkpoint_file, use_checksummed_checkpoints
from lit_tokensel.cli.errors import RaisesWithOptions
from lit_tokensel.data import SFTDataModule
from lit_tokensel.methods.base import TokenSelectionModule
from lit_tokensel.renamed_settings import migrate_hparams
from lit_tokensel.trusted_classes import resolve_trusted_class


class TokenSelParser(RaisesWithOptions, LightningArgumentParser):
    """LightningCLI's parser, raising its errors for the CLI's one-line report."""


class TokenSelCLI(LightningCLI):
    """LightningCLI with the export callback always configured and a summary after `fit`."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ExportOnFitEnd, "export")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        check_cli_checkpoint(self.config)  # before LightningCLI reads --ckpt_path's hyper-parameters

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's reading of `--ckpt_path`'s hyper-parameters into the model's config, from the
        checked file (`load_checkpoint_file`), with the settings renamed since it was written mapped to
        their new names (`lit_tokensel.renamed_settings`): a run saved with `rho` resumes as `ratio`."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = dict(load_checkpoint_file(ckpt_path, mmap=True).get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        class_path = hparams.pop("_class_path", None)
        model_config = self.config[subcommand].get("model")
        owner = class_path or (model_config.get("class_path") if model_config is not None else None)
        if owner:
            cls = resolve_trusted_class(owner, f"{ckpt_path}: hyper_parameters", base=L.LightningModule)
            hparams = migrate_hparams(cls, hparams)
        model = {"class_path": class_path, "dict_kwargs": hparams} if class_path else hparams
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

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
