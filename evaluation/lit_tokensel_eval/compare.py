"""The papers' table: one row per run (method), one column per task, then the average.

Cells are each task's headline metric (the CSV rows marked `primary`) in percent. The average is the
unweighted mean over the table's tasks, shown only for runs that have all of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from lit_tokensel_eval.results import ResultRow, read_rows


def _label_runs(sources: Sequence[tuple[str, list[ResultRow]]]) -> list[tuple[str, list[ResultRow]]]:
    """(label, rows) per run, in order; a run name seen twice is labelled with its file as well."""
    runs: list[tuple[str, str, list[ResultRow]]] = []  # (name, source, rows)
    for source, rows in sources:
        for name in dict.fromkeys(r.run for r in rows):
            runs.append((name, source, [r for r in rows if r.run == name]))
    names = [name for name, _, _ in runs]
    return [(f"{name} ({source})" if names.count(name) > 1 else name, rows) for name, source, rows in runs]


def comparison_table(sources: Sequence[tuple[str, list[ResultRow]]], digits: int = 1) -> str:
    """Markdown table of runs by tasks with an average column, and a note of the metrics shown."""
    runs = _label_runs(sources)
    tasks: dict[str, str] = {}  # task -> metric shown (first seen)
    for _, rows in runs:
        for row in rows:
            if row.primary:
                tasks.setdefault(
                    row.task, row.metric if row.filter == "none" else f"{row.metric} ({row.filter})"
                )
    if not tasks:
        raise ValueError(
            "no primary results to compare: were these files written by `lit-tokensel-eval run`?"
        )
    header = ["run", *tasks, "avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, rows in runs:
        values = {r.task: r.value for r in rows if r.primary}
        cells = [f"{100 * values[t]:.{digits}f}" if t in values else "-" for t in tasks]
        average = (
            f"{100 * sum(values[t] for t in tasks) / len(tasks):.{digits}f}"
            if all(t in values for t in tasks)
            else "-"
        )
        lines.append("| " + " | ".join([label, *cells, average]) + " |")
    metrics = ", ".join(f"{task}: {metric}" for task, metric in tasks.items())
    return (
        "\n".join(lines)
        + f"\n\nValues in percent. Metrics: {metrics}. avg: unweighted mean over the tasks.\n"
    )


def compare(paths: Iterable[str | Path], output: str | Path | None = None, digits: int = 1) -> str:
    """The comparison table of run directories (or `results.csv` files); also written to `output`."""
    sources = [(str(p), read_rows(p)) for p in paths]
    table = comparison_table(sources, digits=digits)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(table, encoding="utf-8")
    return table


def default_output(paths: Iterable[str | Path]) -> Path:
    """Where `compare` writes without `--output`: `comparison.md` in the deepest directory that holds every
    run (a run is its directory; a `results.csv` stands for the directory it is in), never the cwd by accident."""
    runs = [Path(p).resolve() for p in paths]
    dirs = [p.parent if p.suffix == ".csv" else p for p in runs]
    parents = [d.parent for d in dirs]
    return Path(os.path.commonpath(parents)) / "comparison.md"
