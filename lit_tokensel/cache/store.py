"""On-disk token-loss cache: parquet shards plus a `manifest.json`, written atomically, read into memory.

Layout of a cache directory::

    manifest.json          fingerprint, split, shard_size, num_samples, num_shards, completed shards
    shard-00000.parquet    columns sample_id: int64, losses: list<float32>
    shard-00001.parquet    ...

Shard `i` holds the split's samples at positions `[i * shard_size, (i + 1) * shard_size)` in sample-id
order. A row's `losses` has `len(input_ids) - 1` entries in the `[T-1]` frame (entry `j` is the loss of
predicting token `j + 1`), 0 where `labels[j + 1] == -100`. Shards are written to a temporary file and
renamed; a shard counts as done only once the manifest (also written tmp + rename) lists it with its
size and sha256, so an interrupted pass leaves no half-written shard that looks finished. Temporary
names are unique per process, and a writer holds an exclusive lock (`.<dir name>.lock` next to the
directory) for its lifetime: a second `score` into the same directory waits for the first, then
resumes (finding every shard done, it only verifies them). A manifest whose structure is damaged
is a `CacheError` naming the field; a shard with NaN or inf losses is refused before it is written.

Reading loads every row into memory (`dict[sample_id, float32 array]`, views into one buffer per
shard): 4 bytes per token, e.g. 100k samples x 1k tokens = 400 MB. Parquet, never pickle.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lit_tokensel.cache.fingerprint import ALL_PARTS, DATA_PARTS, compare
from lit_tokensel.integrity import atomic_write_bytes, sha256_file, unique_tmp

MANIFEST = "manifest.json"
FORMAT = "lit_tokensel.token_losses"
VERSION = 1
SCHEMA = pa.schema([("sample_id", pa.int64()), ("losses", pa.list_(pa.float32()))])
RERUN = "re-run `lit-tokensel score` (or `score_to_cache`) with the same output dir to recompute it"


class CacheError(ValueError):
    """A token-loss cache is missing, incomplete, corrupted or does not cover the data."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


_sha256 = sha256_file
_INT = (int,)
_SHARD_FIELDS = {
    "index": _INT,
    "file": (str,),
    "rows": _INT,
    "bytes": _INT,
    "sha256": (str,),
    "first_sample_id": (int, type(None)),
    "last_sample_id": (int, type(None)),
}


def _damaged(file: Path, field: str, problem: str) -> CacheError:
    return CacheError(
        f"{file} is damaged: {field} {problem}. Delete the directory and re-run `lit-tokensel score`."
    )


def check_manifest_structure(manifest: Any, file: Path) -> None:
    """Every field a reader uses is present with the right type; a shard's `file` is its own name (no path)."""
    if not isinstance(manifest, dict):
        raise _damaged(file, "the top level", f"is a {type(manifest).__name__}, not an object")
    fingerprint = manifest.get("fingerprint")
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("model"), str):
        raise _damaged(file, "'fingerprint'", "is not an object with a 'model' string")
    if manifest.get("split") not in ("train", "val"):
        raise _damaged(file, "'split'", f"is {manifest.get('split')!r}, not 'train' or 'val'")
    for key, minimum in (("shard_size", 1), ("num_samples", 0), ("num_shards", 0)):
        value = manifest.get(key)
        if type(value) is not int or value < minimum:
            raise _damaged(file, repr(key), f"is {value!r}, not an integer >= {minimum}")
    if manifest["num_shards"] != -(-manifest["num_samples"] // manifest["shard_size"]):
        raise _damaged(file, "'num_shards'", "does not match num_samples / shard_size")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise _damaged(file, "'shards'", f"is {type(shards).__name__}, not a list")
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise _damaged(file, f"shards[{i}]", "is not an object")
        for key, types in _SHARD_FIELDS.items():
            if key not in entry or type(entry[key]) not in types:
                raise _damaged(
                    file, f"shards[{i}].{key}", f"is {entry.get(key)!r} (missing or of the wrong type)"
                )
        if not 0 <= entry["index"] < manifest["num_shards"] or entry["file"] != shard_name(entry["index"]):
            raise _damaged(file, f"shards[{i}]", f"has index {entry['index']} and file {entry['file']!r}")
    if len({e["index"] for e in shards}) != len(shards):
        raise _damaged(file, "'shards'", "lists a shard twice")


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of cache directory `path`, with a clear error when it is absent or unreadable."""
    file = path / MANIFEST
    if not file.is_file():
        raise CacheError(
            f"{path} is not a token-loss cache: {MANIFEST} is missing. Create it with `lit-tokensel score`."
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(
            f"{file} is corrupted ({e}); delete the directory and re-run `lit-tokensel score`."
        ) from e
    if not isinstance(manifest, dict):
        raise _damaged(file, "the top level", f"is a {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheError(
            f"{file}: not a version-{VERSION} token-loss cache (format={manifest.get('format')!r}, "
            f"version={manifest.get('version')!r}); re-create it with `lit-tokensel score`."
        )
    check_manifest_structure(manifest, file)
    return manifest


def read_shard(path: Path, entry: Mapping[str, Any]) -> pa.Table:
    """Read one completed shard, checking it against its manifest entry (size, sha256, schema, rows)."""
    file = path / entry["file"]
    fix = f"Delete {file} and {RERUN}."
    if not file.is_file():
        raise CacheError(f"shard {file} is listed as complete in {path / MANIFEST} but is missing. {RERUN}.")
    size = file.stat().st_size
    if size != entry["bytes"] or _sha256(file) != entry["sha256"]:
        raise CacheError(
            f"shard {file} is corrupted or truncated ({size} bytes, manifest says {entry['bytes']} bytes "
            f"with sha256 {entry['sha256'][:12]}...). {fix}"
        )
    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError) as e:
        raise CacheError(f"shard {file} is not a readable parquet file ({e}). {fix}") from e
    if not table.schema.equals(SCHEMA) or table.num_rows != entry["rows"]:
        raise CacheError(
            f"shard {file} has schema {table.schema} and {table.num_rows} rows; expected {SCHEMA} and "
            f"{entry['rows']} rows. {fix}"
        )
    return table


class TokenLossCache:
    """A token-loss cache directory opened for reading.

    `rows` (loaded on first access) maps sample_id -> float32 losses `[len(input_ids) - 1]`;
    `cache[sample_id]` raises a `CacheError` naming the id and the directory when it is absent.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._rows: dict[int, np.ndarray] | None = None

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.manifest["fingerprint"])

    @property
    def model_fingerprint(self) -> str:
        """Identity of the model that produced the losses: `<name_or_path>@<sha256>`."""
        return self.manifest["fingerprint"]["model"]

    @property
    def split(self) -> str:
        return self.manifest["split"]

    @property
    def complete(self) -> bool:
        return len(self.manifest["shards"]) == self.manifest["num_shards"]

    def verify(self, current: Mapping[str, Any], split: str) -> None:
        """Check the split and the data parts of the fingerprint against `current`; require completeness."""
        if self.split != split:
            raise CacheError(f"token-loss cache {self.path} holds the {self.split!r} split, not {split!r}.")
        compare(
            str(self.path),
            self.fingerprint,
            current,
            DATA_PARTS,
            "Re-run `lit-tokensel score` with this data config into a new output dir.",
        )
        if not self.complete:
            raise CacheError(
                f"token-loss cache {self.path} is incomplete: {len(self.manifest['shards'])} of "
                f"{self.manifest['num_shards']} shards done. Re-run `lit-tokensel score` with the same "
                f"output dir to finish it."
            )

    @property
    def rows(self) -> dict[int, np.ndarray]:
        if self._rows is None:
            self._rows = dict(self._iter_rows())
        return self._rows

    def _iter_rows(self) -> Iterator[tuple[int, np.ndarray]]:
        for entry in self.manifest["shards"]:
            table = read_shard(self.path, entry)
            ids = table.column("sample_id").to_numpy()
            losses = table.column("losses").combine_chunks()
            offsets = losses.offsets.to_numpy()
            values = losses.values.to_numpy(zero_copy_only=False)
            _check_finite(self.path / entry["file"], self.path, ids, offsets, values)
            for i, sample_id in enumerate(ids.tolist()):
                yield sample_id, values[offsets[i] : offsets[i + 1]]

    def __getitem__(self, sample_id: int) -> np.ndarray:
        row = self.rows.get(int(sample_id))
        if row is None:
            raise CacheError(
                f"sample_id {int(sample_id)} is not in token-loss cache {self.path}; the cache was scored "
                f"on other rows. Re-run `lit-tokensel score` with this data config."
            )
        return row

    def check_covers(self, sample_ids: Sequence[int], num_tokens: Sequence[int]) -> None:
        """Every sample is present with `num_tokens - 1` losses; errors name the first offender."""
        for sample_id, n in zip(sample_ids, num_tokens, strict=True):
            row = self[sample_id]
            if len(row) != n - 1:
                raise CacheError(
                    f"sample_id {sample_id}: token-loss cache {self.path} has {len(row)} losses, but the "
                    f"sample has {n} tokens (expected {n - 1}). The cache was made with another "
                    f"tokenization; re-run `lit-tokensel score`."
                )


def _check_finite(file: Path, path: Path, ids: np.ndarray, offsets: np.ndarray, values: np.ndarray) -> None:
    """Refuse a shard holding NaN/inf losses, naming the file and the first affected sample and position."""
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size == 0:
        return
    row = int(np.searchsorted(offsets, bad[0], side="right")) - 1
    raise CacheError(
        f"token-loss cache shard {file} holds {bad.size} non-finite losses (first: {values[bad[0]]} at "
        f"sample_id {int(ids[row])}, position {int(bad[0] - offsets[row])}): the scored model produced NaN/inf. "
        f"Check that model, then delete {path} and re-run `lit-tokensel score`."
    )


class TokenLossCacheWriter:
    """Writes a cache directory shard by shard; resumes a directory with the same fingerprint and layout.

    An existing directory whose manifest differs in any fingerprint part, the split, the shard size
    or the sample count is refused and left untouched, as is a non-empty directory without a manifest.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprint: Mapping[str, Any],
        split: str,
        shard_size: int,
        num_samples: int,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.path = Path(path)
        wanted = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": dict(fingerprint),
            "split": split,
            "shard_size": shard_size,
            "num_samples": num_samples,
            "num_shards": -(-num_samples // shard_size),
            "shards": [],
        }
        self._lock = _DirectoryLock(self.path)
        try:
            if (self.path / MANIFEST).exists():
                self.manifest = self._resume(read_manifest(self.path), wanted)
            elif self.path.exists() and any(self.path.iterdir()):
                raise CacheError(
                    f"{self.path} exists and is not empty but has no {MANIFEST}; refusing to write a token-loss "
                    f"cache into it. Pick a new output dir."
                )
            else:
                self.path.mkdir(parents=True, exist_ok=True)
                self.manifest = wanted
                self._save_manifest()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the directory lock (also done when the process exits)."""
        self._lock.release()

    def __enter__(self) -> TokenLossCacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _resume(self, existing: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
        hint = "Refusing to overwrite it: pick a new output dir, or delete this one to re-score."
        compare(str(self.path), existing["fingerprint"], wanted["fingerprint"], ALL_PARTS, hint)
        for key in ("split", "shard_size", "num_samples"):
            if existing[key] != wanted[key]:
                raise CacheError(
                    f"token-loss cache {self.path} was written with {key}={existing[key]!r}, now "
                    f"{key}={wanted[key]!r}. {hint}"
                )
        kept = []
        for entry in existing["shards"]:  # a completed shard deleted by hand is scored again
            if (self.path / entry["file"]).is_file():
                read_shard(self.path, entry)  # a corrupted one is an error naming the file
                kept.append(entry)
        existing["shards"] = kept
        return existing

    @property
    def num_shards(self) -> int:
        return self.manifest["num_shards"]

    @property
    def shard_size(self) -> int:
        return self.manifest["shard_size"]

    def is_complete(self, index: int) -> bool:
        return any(entry["index"] == index for entry in self.manifest["shards"])

    def write_shard(self, index: int, sample_ids: Sequence[int], losses: Sequence[np.ndarray]) -> Path:
        """Write shard `index` (tmp file + rename), then record it in the manifest.

        Rows holding NaN or inf are refused (a `CacheError` naming their sample ids) and nothing is written.
        """
        bad = [int(i) for i, row in zip(sample_ids, losses, strict=True) if not np.isfinite(row).all()]
        if bad:
            raise CacheError(
                f"refusing to write shard {index} of token-loss cache {self.path}: the losses of "
                f"{len(bad)} sample(s) are NaN or inf (sample_id {', '.join(map(str, bad[:10]))}"
                f"{', ...' if len(bad) > 10 else ''}). The scored model is broken (diverged or NaN weights); "
                f"the cache stays incomplete, so nothing will use it."
            )
        lengths = np.fromiter((len(row) for row in losses), dtype=np.int64, count=len(losses))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        values = (
            np.concatenate([np.asarray(r, dtype=np.float32) for r in losses]) if len(losses) else np.zeros(0)
        )
        table = pa.table(
            {
                "sample_id": pa.array(np.asarray(sample_ids, dtype=np.int64)),
                "losses": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.float32))),
            },
            schema=SCHEMA,
        )
        file = self.path / shard_name(index)
        tmp = unique_tmp(file)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, file)
        finally:
            tmp.unlink(missing_ok=True)
        entry = {
            "index": index,
            "file": file.name,
            "rows": len(sample_ids),
            "bytes": file.stat().st_size,
            "sha256": _sha256(file),
            "first_sample_id": int(sample_ids[0]) if len(sample_ids) else None,
            "last_sample_id": int(sample_ids[-1]) if len(sample_ids) else None,
        }
        shards = [e for e in self.manifest["shards"] if e["index"] != index] + [entry]
        self.manifest["shards"] = sorted(shards, key=lambda e: e["index"])
        self._save_manifest()
        return file

    def _save_manifest(self) -> None:
        atomic_write_bytes(self.path / MANIFEST, (json.dumps(self.manifest, indent=2) + "\n").encode("utf-8"))


_HELD: set[Path] = set()  # directories this process holds a writer lock on


class _DirectoryLock:
    """An exclusive `flock` on `.<name>.lock` next to `path`; waits (saying so) while another process holds it."""

    handle = None

    def __init__(self, path: Path) -> None:
        self.key = path.absolute()
        if self.key in _HELD:
            raise CacheError(
                f"token-loss cache {path} is already open for writing in this process; close that "
                f"writer first."
            )
        self.key.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.key.with_name(f".{self.key.name}.lock"), "a+")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"lit-tokensel: another process is writing the token-loss cache {path}; waiting for it to "
                f"finish, then resuming it.",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        _HELD.add(self.key)

    def release(self) -> None:
        if self.handle is not None and not self.handle.closed:
            _HELD.discard(self.key)
            self.handle.close()  # closing the file releases the flock

    def __del__(self) -> None:
        self.release()
