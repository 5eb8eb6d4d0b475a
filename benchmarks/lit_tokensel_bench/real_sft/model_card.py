r"""SmolLM2-135M-Instruct on the full offline sets of the tasks its model card reports, beside the card.

    python -m lit_tokensel_bench.real_sft.model_card --out runs/model_card             # full sets
    python -m lit_tokensel_bench.real_sft.model_card --out /tmp/model_card --limit 20  # a smoke run

The card (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct, "Instruction model" table) publishes zero-shot
scores from lighteval on the full sets: HellaSwag 40.9, ARC (the average of Challenge and Easy) 37.3, PIQA
66.3. This scores the real-data study's base model as the study does (`builtin:smollm2-135m-instruct`, the
Q4_1 GGUF de-quantized, in bf16 unless `--dtype float32`; lm-eval's stock 0-shot tasks on packaged data,
acc_norm) one task at a time. Each finished task is kept in `<out>/scores.json` and skipped when the
command runs again; the table gives ours, the card's, the gap and our binomial standard error. On a 2-core
AVX2 CPU in fp32, ARC-E, ARC-C and PIQA took 27 min together and HellaSwag's 10,042 documents take well
over an hour (`--limit` scores a first-N subset).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lit_tokensel_bench.noisy_sft.jobs import write_json
from lit_tokensel_bench.real_sft.jobs import eval_suite, load_for_eval, score_suite, task_batch_size
from lit_tokensel_bench.real_sft.plan import CPU

console = Console(highlight=False)

CARD_URL = "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
CARD_SCORES: dict[str, float] = {"ARC (average)": 37.3, "PIQA": 66.3, "HellaSwag": 40.9}
"""The card's "Instruction model" table, in %, for the rows our offline tasks cover."""
CARD_TASKS: dict[str, tuple[str, ...]] = {
    "ARC (average)": ("arc_easy", "arc_challenge"),
    "PIQA": ("piqa",),
    "HellaSwag": ("hellaswag",),
}
"""The lm-eval tasks behind each card row (scored in this order, the long HellaSwag last); a row of several
is the mean of their accuracies."""
NOTABLE_GAP = 3.0
"""Gaps above this many points get an explanation in docs/offline-benchmarks.md (the issue's threshold)."""


@dataclasses.dataclass(frozen=True)
class CardRow:
    """One card row: our accuracy and its standard error (%), the card's, and the gap (ours - card)."""

    name: str
    ours: float
    standard_error: float
    card: float
    docs: int

    @property
    def gap(self) -> float:
        return self.ours - self.card


def compare_with_card(scores: dict[str, dict[str, float]]) -> list[CardRow]:
    """Card rows from per-task `{"accuracy": p, "docs": n}`; rows whose tasks are not all scored are left
    out. A several-task row averages the tasks' accuracies (as the card's ARC average does) and combines
    their binomial standard errors, sqrt(sum se_i^2) / k."""
    rows = []
    for name, tasks in CARD_TASKS.items():
        if not all(task in scores for task in tasks):
            continue
        accuracies = [scores[task]["accuracy"] for task in tasks]
        variances = [p * (1 - p) / scores[task]["docs"] for p, task in zip(accuracies, tasks)]
        rows.append(
            CardRow(
                name=name,
                ours=100 * sum(accuracies) / len(tasks),
                standard_error=100 * math.sqrt(sum(variances)) / len(tasks),
                card=CARD_SCORES[name],
                docs=sum(int(scores[task]["docs"]) for task in tasks),
            )
        )
    return rows


def score_task(model: torch.nn.Module, tokenizer: object, task: str, limit: int | None) -> dict[str, float]:
    """Score `task` (the offline suite's settings for it) on its first `limit` documents, all when None."""
    suite = eval_suite(dataclasses.replace(CPU, limits={task: limit}))
    started = time.perf_counter()
    docs = score_suite(model, tokenizer, suite, task_batch_size(CPU, task), "smollm2-135m-instruct")[task]
    return {
        "accuracy": sum(docs.values()) / len(docs),
        "docs": len(docs),
        "seconds": time.perf_counter() - started,
        "metric": suite.tasks[0].metric,
    }


def print_table(rows: list[CardRow], scores: dict[str, dict[str, float]], dtype: str) -> None:
    table = Table(title=f"SmolLM2-135M-Instruct (Q4_1 GGUF, {dtype}, lm-eval) against its card ({CARD_URL})")
    for column in ("row", "documents", "ours", "± se", "card", "gap"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for row in rows:
        flag = " *" if abs(row.gap) > NOTABLE_GAP else ""
        table.add_row(
            row.name,
            str(row.docs),
            f"{row.ours:.1f}",
            f"{row.standard_error:.1f}",
            f"{row.card:.1f}",
            f"{row.gap:+.1f}{flag}",
        )
    console.print(table)
    for task, score in scores.items():
        console.print(
            f"{task}: {score['metric']} {100 * score['accuracy']:.1f}% on {score['docs']} documents "
            f"in {score['seconds']:.0f} s"
        )
    console.print(f"* gap above {NOTABLE_GAP:.0f} points")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lit_tokensel_bench.real_sft.model_card", description=__doc__
    )
    parser.add_argument("--out", type=Path, default=Path("runs/model_card"), help="keeps scores.json")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: the full set)")
    parser.add_argument("--threads", type=int, default=CPU.threads)
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=CPU.eval_dtype,
        help="scoring dtype (default: the study's; float32 on a CPU without AMX/AVX512-BF16, see dtype_speed)",
    )
    every_task = [task for tasks in CARD_TASKS.values() for task in tasks]
    parser.add_argument("--tasks", nargs="+", choices=every_task, default=every_task, help="default: all")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    scores_file = args.out / "scores.json"
    scores = json.loads(scores_file.read_text()) if scores_file.is_file() else {}
    for key in ("limit", "dtype"):
        if scores.get(key, getattr(args, key)) != getattr(args, key):
            raise SystemExit(
                f"{scores_file}: scored with --{key} {scores[key]}, not {getattr(args, key)}; use another --out"
            )
        scores[key] = getattr(args, key)
    tasks = [task for task in every_task if task in args.tasks]
    model, tokenizer = load_for_eval(CPU.model, dataclasses.replace(CPU, eval_dtype=args.dtype))
    for index, task in enumerate(tasks, start=1):
        if task in scores:
            console.print(f"[{index}/{len(tasks)}] {task}: kept from {scores_file}")
            continue
        console.print(f"[{index}/{len(tasks)}] {task}: scoring {args.limit or 'every'} document(s)...")
        scores[task] = score_task(model, tokenizer, task, args.limit)
        write_json(scores_file, scores)  # atomically: an interrupted write keeps the tasks already scored
        console.print(f"  {100 * scores[task]['accuracy']:.1f}% in {scores[task]['seconds']:.0f} s")
    task_scores = {task: scores[task] for task in every_task if task in scores}
    print_table(compare_with_card(task_scores), task_scores, args.dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
