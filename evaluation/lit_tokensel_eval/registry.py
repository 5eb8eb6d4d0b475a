"""Which tasks exist: lm-eval's own index plus the task YAMLs shipped here, and what a request expands to.

`TASKS_DIR` is the `--include_path` for the plain `lm_eval` CLI too. Building lm-eval's full index
takes a few seconds (thousands of YAML files), so a run that asks only for tasks shipped here indexes
just `TASKS_DIR`, and each index is built once per process.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).parent / "tasks"
BUNDLED_DIR = TASKS_DIR / "quickstart"
BUNDLED_DIRS = (BUNDLED_DIR, TASKS_DIR / "noisy_sft")
"""The folders of the offline, chat-formatted tasks (data shipped here; the chat template applies by default)."""


class UnknownTaskError(KeyError):
    """A task, group or tag name neither lm-eval nor this package knows."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


def task_manager(include_defaults: bool = True, include_paths: tuple[str, ...] = ()) -> Any:
    """An lm-eval `TaskManager` over our task YAMLs, with lm-eval's own tasks when `include_defaults`.

    `include_paths` are scanned after ours, so a task there overrides one of the same name (a user's
    `--include_path` folder, or the offline tasks' generated YAMLs). Built once per process and arguments.
    """
    return _task_manager(bool(include_defaults), tuple(include_paths))


@functools.lru_cache(maxsize=4)
def _task_manager(include_defaults: bool, include_paths: tuple[str, ...]) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *include_paths], include_defaults=include_defaults)


@functools.lru_cache(maxsize=1)
def shipped_names() -> frozenset[str]:
    """Every task, group and tag name defined by the YAMLs shipped in this package."""
    return frozenset(task_manager(include_defaults=False).all_tasks)


def bundled_task_names() -> list[str]:
    """The offline tasks (local data, no network): the task names defined in `BUNDLED_DIRS`
    (`tasks/quickstart/`, `tasks/noisy_sft/`)."""
    index = task_manager(include_defaults=False).task_index
    return sorted(
        name
        for name, entry in index.items()
        if entry.yaml_path is not None and Path(entry.yaml_path).parent in BUNDLED_DIRS
    )


def manager_for(
    names: Iterable[str], include_paths: Iterable[str | Path] = (), *, need_defaults: bool = False
) -> Any:
    """The cheapest `TaskManager` that knows all `names`; raises `UnknownTaskError` naming the unknown ones.

    Without lm-eval's own index when every name is defined here or in `include_paths` (and not
    `need_defaults`: the offline YAMLs include lm-eval's stock groups by name).
    """
    names = list(names)
    paths = tuple(str(Path(p).expanduser().resolve()) for p in include_paths)
    for path in paths:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"include path {path} is not a folder of lm-eval task YAMLs")
    if not need_defaults:
        local = task_manager(include_defaults=False, include_paths=paths) if paths else None
        if set(names) <= (set(local.task_index) if local is not None else shipped_names()):
            return local if local is not None else task_manager(include_defaults=False)
    manager = task_manager(include_defaults=True, include_paths=paths)
    unknown = [n for n in names if n not in manager.task_index]
    if unknown:
        where = ", ".join([str(TASKS_DIR), *paths])
        raise UnknownTaskError(
            f"unknown lm-eval task(s) {unknown}: not in lm-eval's index nor in {where}. "
            f"List them with `lm_eval ls tasks` or `lit-tokensel-eval list`."
        )
    return manager


def leaf_configs(manager: Any, name: str, overrides: dict | None = None) -> Iterator[tuple[str, dict]]:
    """(task name, raw config) of every leaf task `name` expands to, without building any task.

    Raw configs come from the index (includes merged, `!function` unresolved), so no dataset is loaded.
    Group members given inline (a dict with its own config) are yielded with that config.
    """
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(name)
    if entry is None:  # an inline member of a group: its overrides are the whole config
        yield name, dict(overrides or {})
        return
    if entry.kind == Kind.TAG:
        for member in sorted(entry.tags):
            yield from leaf_configs(manager, member, overrides)
    elif entry.kind == Kind.GROUP:
        for member in (entry.cfg or {}).get("task", []):
            if isinstance(member, str):
                yield from leaf_configs(manager, member)
            elif isinstance(member, dict) and isinstance(member.get("task"), str):
                yield from leaf_configs(manager, member["task"], member)
            elif isinstance(member, dict) and isinstance(member.get("group"), str):
                yield from leaf_configs(manager, member["group"], member)
    else:
        yield name, {**(entry.cfg or {}), **(overrides or {})}


def is_tag(manager: Any, name: str) -> bool:
    from lm_eval.tasks._index import Kind

    entry = manager.task_index.get(name)
    return entry is not None and entry.kind == Kind.TAG
