"""`lit-tokensel`: LightningCLI over every method and the SFT DataModule, plus `export`, `score`, `inspect`.

    lit-tokensel fit -c configs/quickstart.yaml
    lit-tokensel fit -c configs/methods/full_sft.yaml -c configs/data/quickstart.yaml
    lit-tokensel export --checkpoint runs/.../last.ckpt --output_dir exported/
    lit-tokensel score -c configs/quickstart.yaml --model.init_args.model REF_DIR --output_dir ref_losses/
    lit-tokensel inspect -c configs/quickstart.yaml -c configs/methods/rho1.yaml --output kept.jsonl --limit 20
    lit-tokensel data prepare natural_instructions --rows 5000 --seed 0   # then train_file: builtin:<name>
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from rich.console import Console

from lit_tokensel.callbacks.export import ExportOnFitEnd
from lit_tokensel.data import SFTDataModule
from lit_tokensel.methods.base import TokenSelectionModule


class TokenSelCLI(LightningCLI):
    """LightningCLI with the export callback always configured and a summary after `fit`."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ExportOnFitEnd, "export")

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


def run_export(argv: list[str]) -> Path:
    from jsonargparse import CLI

    from lit_tokensel.export import export_checkpoint

    output = CLI(export_checkpoint, args=argv, as_positional=False)
    Console(stderr=True).print(f"exported to {output}")
    return output


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    cli_args = sys.argv[1:] if argv is None else argv
    if cli_args and cli_args[0] == "export":
        run_export(cli_args[1:])
        return
    if cli_args and cli_args[0] == "score":
        from lit_tokensel.cache.scoring import run_score

        run_score(cli_args[1:])
        return
    if cli_args and cli_args[0] == "inspect":
        from lit_tokensel.inspection import run_inspect

        run_inspect(cli_args[1:])
        return
    if cli_args and cli_args[0] == "data":
        from lit_tokensel.data.real_sources import run_data_cli

        run_data_cli(cli_args[1:])
        return
    if cli_args and cli_args[0] == "recipe":
        from lit_tokensel.recipes import run_recipe_cli

        run_recipe_cli(cli_args[1:])
        return
    TokenSelCLI(
        TokenSelectionModule,
        SFTDataModule,
        subclass_mode_model=True,
        args=argv,  # None: LightningCLI reads sys.argv itself
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": __doc__},
    )


if __name__ == "__main__":
    main()
