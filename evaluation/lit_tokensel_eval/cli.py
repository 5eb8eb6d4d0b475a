"""`lit-tokensel-eval`: evaluate models with lm-eval, and compare runs in the papers' table layout.

    lit-tokensel-eval run --model DIR|CKPT|builtin:NAME [--suite NAME] [--tasks a,b] [--limit N] ...
    lit-tokensel-eval compare RUN_DIR... [--output FILE]   (default FILE: comparison.md beside the runs)
    lit-tokensel-eval list
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("lit_tokensel_eval")


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"limit must be positive, got {text}")
    return int(value) if value >= 1 and value.is_integer() else value


def _batch_size(text: str) -> int | str:
    return text if text.startswith("auto") else int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-tokensel-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="evaluate one model; writes results.json and results.csv")
    run.add_argument("--model", required=True,
                     help="exported model directory, Lightning .ckpt (exported on the fly), or builtin:<name>")
    run.add_argument("--tasks", action="append", default=[],
                     help="lm-eval task/group/tag names, comma-separated or repeated (ours: `list`)")
    run.add_argument("--suite", help="a shipped suite name (see `list`) or the path of a suite YAML")
    run.add_argument("--limit", type=_limit, help="documents per task (below 1: a fraction); overrides the suite")
    run.add_argument("--num_fewshot", type=int, help="few-shot examples for every task; overrides the suite")
    run.add_argument("--apply_chat_template", action=argparse.BooleanOptionalAction, default=None,
                     help="render prompts with the tokenizer's chat template (default: per suite; "
                          "always for the bundled tasks)")
    run.add_argument("--batch_size", type=_batch_size, default=8, help="an integer or 'auto' (default 8)")
    run.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    run.add_argument("--output_dir", default="runs/eval", help="runs are written to OUTPUT_DIR/NAME (default runs/eval)")
    run.add_argument("--name", help="run name in tables and the output folder (default: from the model path)")
    run.add_argument("--log_samples", action="store_true", help="also write every document's prompt and output")
    run.add_argument("--bootstrap_iters", type=int, default=100_000,
                     help="lm-eval's bootstrap iterations for standard errors (0: none)")

    compare = commands.add_parser("compare", help="markdown table of runs (rows) by tasks (columns), with averages")
    compare.add_argument("runs", nargs="+", help="run directories written by `run`, or their results.csv files")
    compare.add_argument("--output", default=None,
                         help="also write the table here (default: comparison.md beside the run directories)")
    compare.add_argument("--digits", type=int, default=1, help="decimals of the percentages (default 1)")

    commands.add_parser("list", help="the shipped suites and tasks")
    return parser


def _run(args: argparse.Namespace) -> None:
    from lit_tokensel_eval.compare import comparison_table
    from lit_tokensel_eval.runner import evaluate

    if not args.tasks and not args.suite:
        raise SystemExit("lit-tokensel-eval run: give --tasks and/or --suite (see `lit-tokensel-eval list`)")
    run = evaluate(args.model, tasks=args.tasks, suite=args.suite, limit=args.limit, num_fewshot=args.num_fewshot,
                   apply_chat_template=args.apply_chat_template, batch_size=args.batch_size, device=args.device,
                   output_dir=args.output_dir, run_name=args.name, log_samples=args.log_samples,
                   bootstrap_iters=args.bootstrap_iters)
    print(comparison_table([(str(run.output_dir), run.rows)]))
    print(f"Results: {run.output_dir}")


def _list() -> None:
    from lit_tokensel_eval.registry import TASKS_DIR, shipped_names
    from lit_tokensel_eval.suites import load_suite, suite_names

    print("Suites (lit-tokensel-eval run --suite NAME):")
    for name in suite_names():
        suite = load_suite(name)
        tasks = ", ".join(f"{t.task}" + (f" ({t.num_fewshot}-shot)" if t.num_fewshot else "") for t in suite.tasks)
        print(f"  {name}: {suite.description}\n    {tasks}")
    print(f"\nTasks shipped here (also for `lm_eval --include_path {TASKS_DIR}`):")
    print("  " + ", ".join(sorted(shipped_names())))
    print("\nAny other lm-eval task name works too (`lm_eval ls tasks`).")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lit_tokensel_eval.offline import DatasetUnavailableError
    from lit_tokensel_eval.registry import UnknownTaskError

    try:
        if args.command == "run":
            _run(args)
        elif args.command == "compare":
            from lit_tokensel_eval.compare import compare, default_output

            output = Path(args.output) if args.output else default_output(args.runs)
            print(compare(args.runs, output=output, digits=args.digits))
            print(f"Written to {output}")
        else:
            _list()
    except (DatasetUnavailableError, UnknownTaskError, FileNotFoundError, ValueError) as err:
        print(f"lit-tokensel-eval {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
