"""Functions the bundled task YAMLs call (`!function lit_tokensel_eval.task_functions.<name>`).

`load_bundled_docs` is the tasks' `custom_dataset`: it reads a JSONL file shipped next to the YAMLs
(in `tasks/<task_dir>/`, `quickstart` unless the YAML's `dataset_kwargs` name another folder), located
through this module's own path, so the YAMLs need no absolute paths, work from any working directory
(also under the plain `lm_eval` CLI with `--include_path`), and never touch the network or the datasets
cache. `answer_nll` is the `process_results` of the log-likelihood tasks (`noisy_sft_nll`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

TASKS_DIR = Path(__file__).parent / "tasks"
BUNDLED_DATA_DIR = TASKS_DIR / "quickstart"  # the default `task_dir`
REGENERATE = {
    "quickstart": "python -m lit_tokensel_eval.bundled_data",
    "noisy_sft": "python -m lit_tokensel_bench.noisy_sft.data --write-tasks (from the repository root)",
}


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON Lines file; errors name the file and line."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
    return rows


def load_bundled_docs(
    data_file: str, split: str = "test", task_dir: str = "quickstart", **_: Any
) -> DatasetDict:
    """The bundled task's documents, `tasks/<task_dir>/<data_file>`, as a one-split `DatasetDict` (lm-eval
    passes its metadata as extra kwargs)."""
    path = TASKS_DIR / task_dir / data_file
    if not path.is_file():
        how = REGENERATE.get(task_dir, "the generator that wrote it")
        raise FileNotFoundError(f"bundled task data {path} is missing; regenerate it with `{how}`")
    return DatasetDict({split: Dataset.from_list(read_jsonl(path))})


def answer_nll(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """`{"nll": -log-likelihood}` of a loglikelihood task's one continuation (the answer), summed over its tokens."""
    ((loglikelihood, _is_greedy),) = results
    return {"nll": -float(loglikelihood)}
