"""Functions the bundled task YAMLs call (`!function lit_tokensel_eval.task_functions.<name>`).

`load_bundled_docs` is the tasks' `custom_dataset`: it reads a JSONL file shipped next to the YAMLs,
located through this module's own path, so the YAMLs need no absolute paths, work from any working
directory (also under the plain `lm_eval` CLI with `--include_path`), and never touch the network or
the datasets cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

BUNDLED_DATA_DIR = Path(__file__).parent / "tasks" / "quickstart"


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


def load_bundled_docs(data_file: str, split: str = "test", **_: Any) -> DatasetDict:
    """The bundled task's documents as a one-split `DatasetDict` (lm-eval passes its metadata as extra kwargs)."""
    path = BUNDLED_DATA_DIR / data_file
    if not path.is_file():
        raise FileNotFoundError(f"bundled task data {path} is missing; regenerate it with "
                                f"`python -m lit_tokensel_eval.bundled_data`")
    return DatasetDict({split: Dataset.from_list(read_jsonl(path))})
