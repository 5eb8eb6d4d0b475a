"""Evaluate a model on lm-eval tasks, suites and the bundled offline tasks; write JSON and CSV.

Tasks may differ in few-shot count, chat formatting and limit (a suite runs MMLU 5-shot next to 0-shot
tasks; the bundled tasks need the chat template), while one `lm_eval.simple_evaluate` call takes one
of each. So the requests are grouped by those settings, each group is one `simple_evaluate` call on the
same loaded model, and the results are merged into one lm-eval results dict. Before any model is
loaded, every task is checked to exist and to have its data reachable (`offline.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_tokensel_eval.models import ModelLike, model_name, open_model
from lit_tokensel_eval.offline import check_datasets_available
from lit_tokensel_eval.registry import bundled_task_names, is_tag, leaf_configs, manager_for
from lit_tokensel_eval.results import ResultRow, result_rows, write_run
from lit_tokensel_eval.suites import Suite, TaskSpec, load_suite

log = logging.getLogger(__name__)
_MERGED_KEYS = ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
                "samples")


class _DropCustomDatasetNotice(logging.Filter):
    """lm-eval warns on every task with a `custom_dataset` (ours); the notice is about CLI metadata, not us."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_DropCustomDatasetNotice())


@dataclass(frozen=True)
class TaskRequest:
    """One task as it will run: settings resolved from the call, the suite and the task's defaults."""

    task: str
    num_fewshot: int | None
    apply_chat_template: bool
    limit: int | float | None
    metric: str | None


@dataclass
class EvalRun:
    """A finished evaluation: lm-eval's merged results dict and its flat rows."""

    name: str
    results: dict
    rows: list[ResultRow]
    output_dir: Path | None = None
    requests: list[TaskRequest] = field(default_factory=list)

    def primary(self) -> dict[str, float]:
        """`{task: headline value}` of the requested tasks."""
        return {r.task: r.value for r in self.rows if r.primary}


def _split_names(tasks: str | Sequence[str] | None) -> list[str]:
    if tasks is None:
        return []
    if isinstance(tasks, str):
        tasks = [tasks]
    return [name.strip() for item in tasks for name in item.split(",") if name.strip()]


def resolve_requests(
    tasks: str | Sequence[str] | None = None,
    suite: str | Path | Suite | None = None,
    *,
    num_fewshot: int | None = None,
    apply_chat_template: bool | None = None,
    limit: int | float | None = None,
) -> list[TaskRequest]:
    """The tasks of `suite` then `tasks` (comma-separated names allowed), with their settings.

    Explicit arguments win over the suite's per-task settings. `apply_chat_template=None` means: the
    suite's setting, True for the bundled tasks (written for chat models), else False.
    """
    specs: list[TaskSpec] = []
    if suite is not None:
        specs += (suite if isinstance(suite, Suite) else load_suite(suite)).tasks
    specs += [TaskSpec(task=name) for name in _split_names(tasks)]
    if not specs:
        raise ValueError("nothing to evaluate: give tasks (lm-eval task names) and/or a suite")
    names = [s.task for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"tasks requested twice: {duplicates}")
    bundled = set(bundled_task_names())
    requests = []
    for spec in specs:
        chat = apply_chat_template
        if chat is None:
            chat = spec.apply_chat_template if spec.apply_chat_template is not None else spec.task in bundled
        requests.append(TaskRequest(
            task=spec.task,
            num_fewshot=num_fewshot if num_fewshot is not None else spec.num_fewshot,
            apply_chat_template=chat,
            limit=limit if limit is not None else spec.limit,
            metric=spec.metric,
        ))
    return requests


def merge_results(parts: Sequence[dict]) -> dict:
    """One lm-eval results dict from several `simple_evaluate` outputs over disjoint tasks."""
    merged = dict(parts[0])
    for key in _MERGED_KEYS:
        combined: dict = {}
        for part in parts:
            combined.update(part.get(key) or {})
        if combined or key in merged:
            merged[key] = combined
    return merged


def _groups(requests: Sequence[TaskRequest]) -> dict[tuple, list[TaskRequest]]:
    groups: dict[tuple, list[TaskRequest]] = {}
    for request in requests:
        groups.setdefault((request.num_fewshot, request.apply_chat_template, request.limit), []).append(request)
    return groups


def _primary(manager: Any, requests: Sequence[TaskRequest]) -> dict[str, str | None]:
    """Requested task -> headline metric; a tag stands for its member tasks (lm-eval reports no tag row)."""
    primary: dict[str, str | None] = {}
    for request in requests:
        members = [t for t, _ in leaf_configs(manager, request.task)] if is_tag(manager, request.task) else [
            request.task]
        primary.update(dict.fromkeys(members, request.metric))
    return primary


def run_requests(lm: Any, manager: Any, requests: Sequence[TaskRequest], *, log_samples: bool = False,
                 bootstrap_iters: int = 100_000, **simple_evaluate_kwargs: Any) -> dict:
    """`simple_evaluate` once per (num_fewshot, chat template, limit) group on an open `HFLM`; merged results."""
    from lm_eval import simple_evaluate

    parts = []
    groups = _groups(requests)
    for index, ((shots, chat, limit), members) in enumerate(groups.items(), start=1):
        names = [r.task for r in members]
        log.info("Evaluation group %d/%d: %s (num_fewshot=%s, apply_chat_template=%s, limit=%s)",
                 index, len(groups), ", ".join(names), shots, chat, limit)
        parts.append(simple_evaluate(
            lm, tasks=names, num_fewshot=shots, apply_chat_template=chat, fewshot_as_multiturn=chat,
            limit=limit, task_manager=manager, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
            **simple_evaluate_kwargs,
        ))
    merged = merge_results(parts)
    merged["lit_tokensel_eval"] = {
        "requests": [vars(r) for r in requests],
        "primary": _primary(manager, requests),
    }
    return merged


def prepare(requests: Sequence[TaskRequest]) -> Any:
    """The task manager for `requests`, after checking every task exists and its data can be loaded."""
    names = [r.task for r in requests]
    manager = manager_for(names)
    check_datasets_available(manager, names)
    return manager


def evaluate(
    model: ModelLike,
    tasks: str | Sequence[str] | None = None,
    suite: str | Path | Suite | None = None,
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool | None = None,
    batch_size: int | str = 8,
    device: str | None = None,
    output_dir: str | Path | None = None,
    run_name: str | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 100_000,
) -> EvalRun:
    """Evaluate `model` (exported directory, `.ckpt`, `builtin:<name>`, or `InMemoryModel`) and write the run.

    Args:
        model: What to evaluate; see `lit_tokensel_eval.models`.
        tasks: lm-eval task, group or tag names (ours included), a list or comma-separated.
        suite: A shipped suite name (`lit-tokensel-eval list`) or a suite YAML path.
        limit: Documents per task (a fraction below 1 is a share); overrides the suite's limits.
        num_fewshot: Few-shot examples for every task; overrides the suite's counts.
        apply_chat_template: Render prompts with the tokenizer's chat template; None: per suite/task default.
        batch_size: lm-eval batch size (an int, or "auto").
        device: Torch device for a model loaded from disk; default cuda when available, else cpu.
        output_dir: Write `<output_dir>/<run_name>/results.{json,csv}` when given.
        run_name: Name of the run in CSV rows and tables; default derived from `model`.
        log_samples: Keep lm-eval's per-document records (written as `samples_<task>.jsonl`).
        bootstrap_iters: lm-eval's bootstrap iterations for standard errors (0 skips them).
    """
    requests = resolve_requests(tasks, suite, num_fewshot=num_fewshot, apply_chat_template=apply_chat_template,
                                limit=limit)
    manager = prepare(requests)
    name = run_name or model_name(model)
    needs_chat = any(r.apply_chat_template for r in requests)
    with open_model(model, batch_size=batch_size, device=device, needs_chat_template=needs_chat) as lm:
        results = run_requests(lm, manager, requests, log_samples=log_samples, bootstrap_iters=bootstrap_iters)
    results["lit_tokensel_eval"]["run"] = name
    results["lit_tokensel_eval"]["model"] = str(getattr(model, "name", model))
    rows = result_rows(results, name, results["lit_tokensel_eval"]["primary"])
    written = write_run(Path(output_dir) / name, results, rows) if output_dir is not None else None
    if written is not None:
        log.info("Wrote %s", written)
    return EvalRun(name=name, results=results, rows=rows, output_dir=written, requests=list(requests))
