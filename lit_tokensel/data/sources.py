"""Read raw rows from local files (.jsonl, .json, .parquet) or a hub dataset, one Python object per row.

Local files are parsed here with the `json` module rather than pyarrow's JSON reader: pyarrow fails
on the first column with mixed types (a `content` that is a number in one row) before we could name
the row. Every row keeps its 0-based index in its file or split, which becomes its `sample_id`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_tokensel.data.real_sources import is_real_name
from lit_tokensel.data.real_sources import resolve_builtin as resolve_real_builtin

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
BUILTIN_PREFIX = "builtin:"
UTF8_BOM = b"\xef\xbb\xbf"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
"""`builtin:<relative path>` names a data file shipped in the package, e.g. `builtin:quickstart/train.jsonl`."""


@dataclass(frozen=True)
class RawRow:
    """One row as read: `value` is the parsed object, or the line's text when `error` is set."""

    index: int
    value: Any
    error: str | None = None


@dataclass(frozen=True)
class Source:
    """Where a split's rows come from: a local file, or a split of a `datasets.load_dataset` dataset."""

    path: str | None = None
    dataset_name: str | None = None
    dataset_config: str | None = None
    split: str | None = None
    cache_dir: str | None = None

    @property
    def display(self) -> str:
        """The name used in error messages: the path as given, or `name[config]:split`."""
        if self.path is not None:
            return self.path
        config = f"[{self.dataset_config}]" if self.dataset_config else ""
        return f"{self.dataset_name}{config}:{self.split}"

    def as_kwargs(self) -> dict[str, Any]:
        """Plain-dict form, for `datasets.Dataset.from_generator(gen_kwargs=...)`."""
        return dict(
            path=self.path,
            dataset_name=self.dataset_name,
            dataset_config=self.dataset_config,
            split=self.split,
            cache_dir=self.cache_dir,
        )


def file_hash(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, so an edited file is read again instead of served from the cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def local_path(path: str, setting: str | None = None) -> Path:
    """The file behind a local data path, checked to exist, to be a file and to have a supported suffix.

    `builtin:<relative path>` resolves into the package's `assets/` folder; `builtin:<name>` of a real
    dataset (`alpaca_en_demo`, `natural_instructions[-n<rows>][-seed<seed>]`) to its prepared cache file
    (`lit_tokensel.data.real_sources`). `setting` (e.g.
    `--data.train_file`) starts the error messages, so the user knows which option to fix.
    """
    name = path.removeprefix(BUILTIN_PREFIX)
    if path.startswith(BUILTIN_PREFIX) and is_real_name(name):
        return resolve_real_builtin(name)
    p = ASSETS / name if path.startswith(BUILTIN_PREFIX) else Path(path)
    where = f"{setting}: " if setting else ""
    shown = path + (f" ({p})" if str(p) != path else "")
    if p.is_dir():
        found = sorted(f.name for f in p.iterdir() if f.suffix in LOCAL_SUFFIXES)[:5]
        raise IsADirectoryError(
            f"{where}{shown} is a directory, not a data file; pass one .jsonl, .json or .parquet file"
            + (f" (this directory has: {', '.join(found)})" if found else "")
        )
    if not p.is_file():
        raise FileNotFoundError(f"{where}data file not found: {shown}")
    if p.suffix not in LOCAL_SUFFIXES:
        raise ValueError(
            f"{where}{path}: unsupported file type {p.suffix!r}; expected one of {', '.join(LOCAL_SUFFIXES)}"
        )
    return p


def _iter_jsonl_lines(lines: Iterator[bytes]) -> Iterator[RawRow]:
    """Rows of JSON Lines; blank lines are not rows. Bad lines become rows with `error` set."""
    index = 0
    for line_no, line in enumerate(lines, start=1):
        if line_no == 1:
            line = line.removeprefix(UTF8_BOM)  # editors on Windows start UTF-8 files with one
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield RawRow(
                index,
                line.decode("utf-8", errors="replace").rstrip("\r\n"),
                f"line {line_no}: not UTF-8 ({e})",
            )
        else:
            try:
                yield RawRow(index, json.loads(text))
            except json.JSONDecodeError as e:
                yield RawRow(
                    index, text.rstrip("\r\n"), f"invalid JSON on line {line_no}: {e.msg} (column {e.colno})"
                )
        index += 1


def _iter_json(path: Path) -> Iterator[RawRow]:
    """Rows of a .json file holding a list of objects (or, leniently, JSON Lines named .json)."""
    data = path.read_bytes().removeprefix(UTF8_BOM)
    try:
        value = json.loads(data)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON Lines under a .json name
            yield from _iter_jsonl_lines(iter(data.splitlines()))
            return
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(value, list):
        raise ValueError(
            f"{path}: expected a JSON list of row objects (or JSON Lines), got a top-level {type(value).__name__}"
        )
    for index, row in enumerate(value):
        yield RawRow(index, row)


def _iter_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield RawRow(index, row)
            index += 1


def iter_rows(source: Source) -> Iterator[RawRow]:
    """All rows of `source`, in order, with their 0-based indices."""
    if source.path is not None:
        path = local_path(source.path)
        if path.suffix == ".jsonl":
            with open(path, "rb") as f:
                yield from _iter_jsonl_lines(iter(f))
        elif path.suffix == ".json":
            yield from _iter_json(path)
        else:
            yield from _iter_parquet(path)
        return
    for index, row in enumerate(load_hub_split(source)):
        yield RawRow(index, row)


def load_hub_split(source: Source) -> Any:
    """`datasets.load_dataset(name, config, split=...)`; cached by `datasets` after the first call."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    try:
        return datasets.load_dataset(
            source.dataset_name, source.dataset_config, split=source.split, cache_dir=source.cache_dir
        )
    except DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise ValueError(
            f"{source.display}: datasets.load_dataset could not read the data ({type(cause).__name__}: "
            f"{str(cause)[:300]}). For local JSON files (where mixed types across rows break the loader), "
            f"pass --data.train_file/--data.val_file instead: those are validated row by row with errors naming the row."
        ) from e


def first_keys(source: Source) -> list[str]:
    """Keys of the first object row (local files) or the column names (hub), for format detection."""
    if source.path is None:
        return list(load_hub_split(source).column_names)
    for row in iter_rows(source):
        if row.error is None and isinstance(row.value, Mapping):
            return list(row.value)
    raise ValueError(f"{source.display}: no JSON object rows found, so the row format cannot be detected")
