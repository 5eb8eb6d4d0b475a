"""sha256 checksums and atomic writes for what lit_tokensel writes: checkpoints, exports, caches.

A flipped bit in a weight file loads without complaint; a checksum recorded when the file was written
turns that into an error naming the file. Checkpoints get a sidecar `X.ckpt.sha256` in `sha256sum`
format (so `sha256sum -c X.ckpt.sha256` also checks it); an export directory lists its files' sizes
and digests in `export_manifest.json`. Every write goes to a temporary name unique to the process
and is renamed into place, so a reader never sees half a file and two processes never share a
temporary file. Only the standard library: any subpackage may use it.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

SIDECAR_SUFFIX = ".sha256"


class IntegrityError(ValueError):
    """A file does not match the checksum recorded when it was written (bit rot, truncation, tampering)."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def unique_tmp(path: Path) -> Path:
    """A hidden sibling of `path` no other process or call will pick: `.<name>.tmp-<pid>-<random>`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a unique temporary sibling, fsync, rename; readers see old or new."""
    path = Path(path)
    tmp = unique_tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | os.PathLike, digest: str | None = None) -> Path:
    """Record `path`'s sha256 in `path.sha256` (`sha256sum` format), atomically; return the sidecar."""
    path = Path(path)
    digest = digest or sha256_file(path)
    sidecar = sidecar_path(path)
    atomic_write_bytes(sidecar, f"{digest}  {path.name}\n".encode())
    return sidecar


def verify_sidecar(path: str | os.PathLike) -> bool:
    """Check `path` against `path.sha256` when that exists; return whether a checksum was checked.

    Raises `IntegrityError` naming the file on a mismatch or an unreadable sidecar.
    """
    path = Path(path)
    sidecar = sidecar_path(path)
    if not path.is_file() or not sidecar.is_file():
        return False
    fields = sidecar.read_text(encoding="utf-8", errors="replace").split()
    if not fields or len(fields[0]) != 64:
        raise IntegrityError(f"{sidecar} is not a sha256 checksum file; delete it to load {path} unchecked.")
    actual = sha256_file(path)
    if actual != fields[0].lower():
        raise IntegrityError(
            f"{path} is corrupted: its sha256 is {actual[:16]}..., but {sidecar.name} recorded "
            f"{fields[0][:16]}... when it was written (bit rot, truncation, or an edit). Use another "
            f"checkpoint; if you changed the file on purpose, delete {sidecar.name}."
        )
    return True


def verify_files(directory: str | os.PathLike, expected: dict[str, dict[str, object]], manifest: str) -> None:
    """Check each `name -> {bytes, sha256}` of `expected` under `directory`; errors name the file."""
    directory = Path(directory)
    for name, entry in expected.items():
        file = directory / name
        if not file.is_file():
            raise IntegrityError(f"{file} is listed in {directory / manifest} but is missing.")
        size = file.stat().st_size
        if size != entry.get("bytes") or sha256_file(file) != entry.get("sha256"):
            raise IntegrityError(
                f"{file} is corrupted: it does not match the size and sha256 recorded in {manifest} when it "
                f"was written ({size} bytes now, {entry.get('bytes')} recorded). Re-create it."
            )
