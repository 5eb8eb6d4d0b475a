"""A line per task on stderr while a run goes: which task starts, and when it ends, its time and headline.

A suite can run for hours on a CPU, and lm-eval itself prints little between its per-request bars;
these lines say where the run is and how long the rest may take (the mean time of the finished tasks
times the tasks left: a rough ETA, since tasks differ in size).
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console


class TaskProgress:
    """Prints `[i/n] task ...` when a task starts and `... done in Xs: metric = v (ETA)` when it ends."""

    def __init__(self, total: int, *, enabled: bool = True, console: Console | None = None) -> None:
        self.total = total
        self.enabled = enabled
        self.console = console or Console(stderr=True, highlight=False)
        self.done = 0
        self.elapsed = 0.0
        self._started = 0.0

    def start(self, request: Any) -> None:
        self._started = time.perf_counter()
        if self.enabled:
            settings = ", ".join(
                s
                for s in (
                    f"{request.num_fewshot}-shot" if request.num_fewshot is not None else "",
                    f"limit {request.limit}" if request.limit is not None else "",
                    "chat template" if request.apply_chat_template else "",
                )
                if s
            )
            self.console.print(
                f"[bold][{self.done + 1}/{self.total}][/bold] {request.task}"
                + (f" ({settings})" if settings else "")
                + " ..."
            )

    def finish(self, request: Any, results: dict | None) -> None:
        seconds = time.perf_counter() - self._started
        self.done += 1
        self.elapsed += seconds
        if not self.enabled:
            return
        headline = _headline(results or {}, request.task, request.metric)
        left = self.total - self.done
        eta = f"; about {self.elapsed / self.done * left / 60:.1f} min left" if left else ""
        self.console.print(
            f"[bold][{self.done}/{self.total}][/bold] {request.task} done in {seconds:.1f} s"
            + (f": {headline}" if headline else "")
            + eta
        )


def _headline(results: dict, task: str, metric: str | None) -> str:
    """`metric = value (n docs)` for `task` from one `simple_evaluate` result, or '' if not found."""
    row = (results.get("results") or {}).get(task) or {}
    for key, value in row.items():
        name = key.split(",")[0]
        if isinstance(value, float) and (metric is None or name == metric) and "stderr" not in name:
            samples = (results.get("n-samples") or {}).get(task, {}).get("effective")
            return f"{name} = {value:.4f}" + (f" ({samples} docs)" if samples else "")
    return ""
