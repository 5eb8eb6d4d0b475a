"""Results on disk: lm-eval's full JSON per run, and one flat CSV row per (run, task, metric).

A run directory holds `results.json` (lm-eval's results dict, as its CLI writes it, plus a
`lit_tokensel_eval` entry recording how the run was made), `results.csv` and, with `log_samples`,
`samples_<task>.jsonl`. CSV columns: run, task, metric, filter, value, stderr, n, primary.
`primary` marks the tasks that were asked for (not their subtasks) with their headline metric: the
cells of a comparison table. Values are lm-eval's (fractions, not percentages).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
METRIC_PREFERENCE = ("acc_norm", "acc", "exact_match", "f1")
_NOT_METRICS = {"alias", "name", "sample_len", "sample_count", " "}


@dataclass(frozen=True)
class ResultRow:
    run: str
    task: str
    metric: str
    filter: str
    value: float
    stderr: float | None
    n: int | None
    primary: bool


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" for stderrs it did not compute
        return None
    return None if math.isnan(number) else number


def task_metrics(task_results: dict) -> dict[tuple[str, str], tuple[float, float | None]]:
    """`{(metric, filter): (value, stderr)}` from one task's entry of lm-eval's `results`."""
    metrics = {}
    for key, value in task_results.items():
        if key in _NOT_METRICS or "," not in key or "_stderr," in key:
            continue
        metric, _, filter_name = key.partition(",")
        number = _number(value)
        if number is not None:
            stderr = _number(task_results.get(f"{metric}_stderr,{filter_name}"))
            metrics[(metric, filter_name)] = (number, stderr)
    return metrics


def headline_metric(metrics: dict[tuple[str, str], Any], wanted: str | None = None) -> tuple[str, str] | None:
    """The (metric, filter) a table shows: `wanted` if given, else the first of `METRIC_PREFERENCE` present."""
    for name in ([wanted] if wanted else []) + list(METRIC_PREFERENCE):
        for key in metrics:
            if key[0] == name:
                return key
    if wanted:
        raise KeyError(f"metric {wanted!r} not among {sorted({m for m, _ in metrics})}")
    return next(iter(metrics), None)


def sample_counts(results: dict) -> dict[str, int]:
    """Documents evaluated per task; a group counts those of all its leaf tasks."""
    counts = {task: int(n["effective"]) for task, n in results.get("n-samples", {}).items()}
    subtasks = results.get("group_subtasks", {})

    def count(name: str) -> int:
        if name in counts:
            return counts[name]
        return sum(count(child) for child in subtasks.get(name, []))

    return {name: count(name) for name in results.get("results", {})}


def result_rows(results: dict, run: str, primary: dict[str, str | None]) -> list[ResultRow]:
    """Flat rows of every task and metric in an lm-eval results dict.

    `primary` maps the requested tasks to their headline metric (None: by `METRIC_PREFERENCE`).
    """
    counts = sample_counts(results)
    rows = []
    for task, task_results in results.get("results", {}).items():
        metrics = task_metrics(task_results)
        headline = headline_metric(metrics, primary[task]) if task in primary else None
        for (metric, filter_name), (value, stderr) in metrics.items():
            rows.append(
                ResultRow(
                    run=run,
                    task=task,
                    metric=metric,
                    filter=filter_name,
                    value=value,
                    stderr=stderr,
                    n=counts.get(task),
                    primary=(metric, filter_name) == headline,
                )
            )
    return rows


def write_rows(path: Path, rows: list[ResultRow]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(ResultRow)])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})


def read_rows(path: str | Path) -> list[ResultRow]:
    """Rows of a `results.csv`, or of the `results.csv` inside a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_CSV
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such results file; pass a run directory written by "
            f"`lit-tokensel-eval run` or its {RESULTS_CSV}"
        )
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {f.name for f in fields(ResultRow)} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"{path}: not a lit-tokensel-eval results file (missing columns {sorted(missing)})"
            )
        for line, raw in enumerate(reader, start=2):
            try:
                rows.append(
                    ResultRow(
                        run=raw["run"],
                        task=raw["task"],
                        metric=raw["metric"],
                        filter=raw["filter"],
                        value=float(raw["value"]),
                        stderr=_number(raw["stderr"]) if raw["stderr"] else None,
                        n=int(raw["n"]) if raw["n"] else None,
                        primary=raw["primary"] == "True",
                    )
                )
            except ValueError as err:
                raise ValueError(f"{path}:{line}: {err}") from err
    return rows


def write_run(output_dir: str | Path, results: dict, rows: list[ResultRow]) -> Path:
    """Write `results.json` (without per-sample logs), `results.csv` and `samples_<task>.jsonl` files."""
    from lm_eval.utils import handle_non_serializable

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    samples = results.get("samples") or {}
    summary = {k: v for k, v in results.items() if k != "samples"}
    (output / RESULTS_JSON).write_text(
        json.dumps(summary, indent=2, default=handle_non_serializable, ensure_ascii=False), encoding="utf-8"
    )
    write_rows(output / RESULTS_CSV, rows)
    for task, task_samples in samples.items():
        with (output / f"samples_{task}.jsonl").open("w", encoding="utf-8") as f:
            for sample in task_samples:
                f.write(json.dumps(sample, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return output
