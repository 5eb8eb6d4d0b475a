"""The checks an exported model directory carries: a manifest of file checksums, and finite weights.

`export_manifest.json` lists each file of the export with its size and sha256 (plus the `source`
that wrote it: a run id or a checkpoint path). `verify_export_dir` checks them before a model is
loaded; `check_finite` refuses weights holding NaN or inf, naming the tensor. Kept apart from
`lit_tokensel.export` so that model loading can use it without importing the exporter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from lit_tokensel.integrity import IntegrityError, atomic_write_bytes, sha256_file, verify_files

EXPORT_MANIFEST = "export_manifest.json"
EXPORT_FORMAT = "lit_tokensel.export"


class NonFiniteWeightsError(ValueError):
    """A model's weights hold NaN or inf; exporting or evaluating it would give meaningless numbers."""


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Raise `NonFiniteWeightsError` naming the first floating-point tensor with a NaN or inf."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteWeightsError(
                f"{where}: tensor {name!r} {tuple(tensor.shape)} holds {bad} non-finite value(s) (NaN/inf); "
                f"the training diverged. Refusing to use it: take an earlier checkpoint or lower the learning rate."
            )


def write_export_manifest(directory: Path, source: str | None) -> Path:
    """Record every file under `directory` with its size and sha256 in `export_manifest.json`."""
    files = {
        str(file.relative_to(directory)): {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
        for file in sorted(directory.rglob("*"))
        if file.is_file() and file.name != EXPORT_MANIFEST
    }
    manifest = {"format": EXPORT_FORMAT, "version": 1, "source": source, "files": files}
    target = directory / EXPORT_MANIFEST
    atomic_write_bytes(target, (json.dumps(manifest, indent=2) + "\n").encode())
    return target


def read_export_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The export manifest of `directory`, None when it has none; a damaged one is an `IntegrityError`."""
    file = Path(directory) / EXPORT_MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{file} is corrupted ({e}); re-export the model.") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        manifest.get("format") != EXPORT_FORMAT
        or not isinstance(files, dict)
        or not all(isinstance(v, dict) for v in files.values())
    ):
        raise IntegrityError(f"{file} is not a lit_tokensel export manifest (damaged); re-export the model.")
    return manifest


def verify_export_dir(directory: str | os.PathLike) -> bool:
    """Check every file listed in `directory`'s export manifest; return whether there was one to check."""
    manifest = read_export_manifest(directory)
    if manifest is None:
        return False
    verify_files(directory, manifest["files"], EXPORT_MANIFEST)
    return True


def check_finite_dir(directory: str | os.PathLike) -> None:
    """Refuse a saved model directory whose safetensors weights hold NaN or inf (reads one tensor at a time)."""
    from safetensors import safe_open

    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            check_finite(((key, handle.get_tensor(key)) for key in handle.keys()), str(file))
