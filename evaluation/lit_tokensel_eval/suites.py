"""Benchmark suites: named lists of lm-eval tasks with their few-shot count and headline metric.

Suites are data (`suites/<name>.yaml`), not code, so adding one is adding a file. A suite file holds:

    name: token_cleaning
    description: one line, shown by `lit-tokensel-eval suites`
    source: where the settings come from (paper, script)
    apply_chat_template: false      # default for its tasks
    tasks:
      - {task: mmlu, num_fewshot: 5, metric: acc}
      - {task: tydiqa_goldp_oi, num_fewshot: 1, limit: 100, metric: f1}

`metric` picks the number shown for the task in comparison tables (every metric lands in the CSV).
`limit` caps the documents per (sub)task; a `limit` given to the run overrides it.
A path to a YAML file of the same shape works wherever a suite name does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SUITES_DIR = Path(__file__).parent / "suites"
_SUITE_KEYS = {"name", "description", "source", "apply_chat_template", "tasks"}
_TASK_KEYS = {"task", "num_fewshot", "metric", "apply_chat_template", "limit"}


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite (or of a command line): lm-eval name, few-shot count, headline metric, limit."""

    task: str
    num_fewshot: int | None = None
    metric: str | None = None
    apply_chat_template: bool | None = None
    limit: int | None = None


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: list[TaskSpec]
    description: str = ""
    source: str = ""
    apply_chat_template: bool = False
    path: Path | None = field(default=None, compare=False)


def suite_names() -> list[str]:
    """Names of the suites shipped in the package."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def _suite_path(name_or_path: str | Path) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    shipped = SUITES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ValueError(
        f"unknown suite {str(name_or_path)!r}: shipped suites are {suite_names()}, "
        f"or pass the path of a suite YAML file"
    )


def _task_spec(raw: Any, path: Path, index: int, default_chat: bool) -> TaskSpec:
    where = f"{path}: tasks[{index}]"
    if isinstance(raw, str):
        raw = {"task": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("task"), str):
        raise ValueError(f"{where}: expected a task name or a mapping with a 'task' name, got {raw!r}")
    unknown = set(raw) - _TASK_KEYS
    if unknown:
        raise ValueError(
            f"{where} ({raw['task']}): unknown keys {sorted(unknown)}; allowed: {sorted(_TASK_KEYS)}"
        )
    shots = raw.get("num_fewshot")
    if shots is not None and (not isinstance(shots, int) or shots < 0):
        raise ValueError(
            f"{where} ({raw['task']}): num_fewshot must be a non-negative integer, got {shots!r}"
        )
    limit = raw.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{where} ({raw['task']}): limit must be a positive integer, got {limit!r}")
    chat = raw.get("apply_chat_template", default_chat)
    if not isinstance(chat, bool):
        raise ValueError(f"{where} ({raw['task']}): apply_chat_template must be true or false, got {chat!r}")
    return TaskSpec(
        task=raw["task"], num_fewshot=shots, metric=raw.get("metric"), apply_chat_template=chat, limit=limit
    )


def load_suite(name_or_path: str | Path) -> Suite:
    """A shipped suite by name, or a suite YAML file by path; errors name the file and field."""
    path = _suite_path(name_or_path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with 'name' and 'tasks'")
    unknown = set(raw) - _SUITE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(_SUITE_KEYS)}")
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ValueError(f"{path}: 'tasks' must be a non-empty list")
    default_chat = raw.get("apply_chat_template", False)
    if not isinstance(default_chat, bool):
        raise ValueError(f"{path}: apply_chat_template must be true or false, got {default_chat!r}")
    specs = [_task_spec(t, path, i, default_chat) for i, t in enumerate(tasks)]
    names = [s.task for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: tasks listed twice: {duplicates}")
    return Suite(
        name=str(raw.get("name", path.stem)),
        tasks=specs,
        description=str(raw.get("description", "")),
        source=str(raw.get("source", "")),
        apply_chat_template=default_chat,
        path=path,
    )
