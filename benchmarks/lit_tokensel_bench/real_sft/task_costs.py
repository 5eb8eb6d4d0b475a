r"""What a suite document costs to score, per task: the numbers behind the study's per-task limits.

    python -m lit_tokensel_bench.real_sft.task_costs                      # the CPU budget's model and settings
    python -m lit_tokensel_bench.real_sft.task_costs --docs 20 --tasks boolq piqa

Scores the base model (`StudySettings.model`, loaded as the study's jobs load a merged export: bf16, eval
mode) on each suite task's first `--docs` documents (MMLU: `--mmlu-per-subject` per subject), one task at a
time with the study's batch size for it (`jobs.task_batch_size`), after one untimed warm-up task (lm-eval's
first call indexes its task registry). Prints documents, seconds and seconds per document per task, and what
a run of the given limits (default: the CPU budget's) would cost. Run it on an otherwise idle machine: the
figures scale with load.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from rich.console import Console
from rich.table import Table

from lit_tokensel_bench.real_sft.jobs import eval_suite, load_for_eval, score_suite, task_batch_size
from lit_tokensel_bench.real_sft.plan import CPU, TASKS, StudySettings

console = Console(highlight=False)


def time_task(
    model: torch.nn.Module, tokenizer: object, settings: StudySettings, task: str, limit: int
) -> dict:
    """Score `task` on its first `limit` documents; documents, seconds, seconds per document, the score."""
    suite = eval_suite(dataclasses.replace(settings, limits={task: limit}))
    started = time.perf_counter()
    docs = score_suite(model, tokenizer, suite, task_batch_size(settings, task), "base")[task]
    seconds = time.perf_counter() - started
    return {
        "docs": len(docs),
        "seconds": seconds,
        "per_doc": seconds / len(docs),
        "score": sum(docs.values()) / len(docs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lit_tokensel_bench.real_sft.task_costs", description=__doc__
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--docs", type=int, default=20, help="documents per task (default 20)")
    parser.add_argument(
        "--mmlu-per-subject", type=int, default=1, help="MMLU documents per subject (57 subjects)"
    )
    parser.add_argument("--threads", type=int, default=CPU.threads)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = CPU
    model, tokenizer = load_for_eval(settings.model, settings)
    time_task(model, tokenizer, settings, "arc_easy", 2)  # warm-up: lm-eval's first call indexes its tasks
    table = Table(
        title=f"scoring cost per task: {settings.model}, {args.threads} threads, {settings.eval_dtype}"
    )
    for column in ("task", "batch", "docs", "seconds", "s/doc", "score", "CPU budget docs", "CPU budget s"):
        table.add_column(column, justify="left" if column == "task" else "right")
    total = 0.0
    for task in args.tasks:
        limit = args.mmlu_per_subject if task == "mmlu" else args.docs
        cost = time_task(model, tokenizer, settings, task, limit)
        budget_docs = settings.limits.get(task, 0) * (cost["docs"] // limit if task == "mmlu" else 1)
        total += budget_docs * cost["per_doc"]
        table.add_row(
            task,
            str(task_batch_size(settings, task)),
            str(cost["docs"]),
            f"{cost['seconds']:.1f}",
            f"{cost['per_doc']:.3f}",
            f"{100 * cost['score']:.1f}",
            str(budget_docs),
            f"{budget_docs * cost['per_doc']:.0f}",
        )
        console.print(f"{task}: {cost['docs']} docs in {cost['seconds']:.1f} s", style="dim")
    console.print(table)
    console.print(f"the CPU budget's limits cost about {total:.0f} s of scoring per run on these tasks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
