"""Safe checkpoint files: read as plain data only, classes checked against the allow-list, sha256 recorded.

Every place lit_tokensel reads a `.ckpt` (export, inspect, eval, `fit --ckpt_path`) goes through
`load_checkpoint_file`: the sidecar checksum is verified when present, `torch.load` runs with
`weights_only=True` (tensors and plain containers, never arbitrary pickled objects), and each class
the file names must be on the allow-list (`lit_tokensel.trusted_classes`).

`ChecksummedCheckpointIO` is the Trainer plugin that writes checkpoints atomically and records their
sha256 next to them (`last.ckpt.sha256`); `lit-tokensel fit` installs it (`use_checksummed_checkpoints`).
With a plain `Trainer`, pass `plugins=[ChecksummedCheckpointIO()]`.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lit_tokensel.integrity import atomic_write_bytes, sidecar_path, verify_sidecar, write_sidecar
from lit_tokensel.trusted_classes import check_checkpoint_classes, trust_config_classes


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled Python objects beyond tensors and plain data; it was not loaded."""


def load_checkpoint_file(
    path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False, also_trusted: Iterable[str] = ()
) -> dict[str, Any]:
    """A checkpoint dict read safely: checksum verified (if recorded), plain data only, classes allowed.

    `also_trusted`: class names allowed for this file only, besides the allow-list.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    verify_sidecar(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the file holds pickled Python objects beyond tensors and plain data "
            f"(torch.load weights_only=True: {first_line}). lit_tokensel never unpickles code from a "
            f"checkpoint; re-save it as plain data from a trusted environment."
        ) from None
    if not isinstance(checkpoint, dict):
        raise UnsafeCheckpointError(
            f"{path}: not a Lightning checkpoint (a {type(checkpoint).__name__}, not a dict)"
        )
    check_checkpoint_classes(checkpoint, str(path), also_trusted)
    return checkpoint


class ChecksummedCheckpointIO(TorchCheckpointIO):
    """Write `.ckpt` files atomically with a `sha256sum`-format sidecar; load them through `load_checkpoint_file`.

    Remote paths (`s3://...`) fall back to Lightning's writer without a sidecar.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        sidecar_path(path).unlink(missing_ok=True)  # a stale sidecar must never vouch for new bytes
        atomic_write_bytes(path, data)
        write_sidecar(path, hashlib.sha256(data).hexdigest())

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint_file(path, map_location=map_location or "cpu")

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if "://" not in str(path):
            sidecar_path(path).unlink(missing_ok=True)


def use_checksummed_checkpoints(trainer: L.Trainer) -> bool:
    """Install `ChecksummedCheckpointIO` on `trainer` when its strategy writes single files with the default IO.

    Returns whether it was installed (a custom CheckpointIO or a sharded strategy is left as it is).
    """
    strategy = trainer.strategy
    try:
        current = strategy.checkpoint_io
    except (AttributeError, NotImplementedError):
        return False
    if type(current) is not TorchCheckpointIO:
        return isinstance(current, ChecksummedCheckpointIO)
    try:
        strategy.checkpoint_io = ChecksummedCheckpointIO()
    except (AttributeError, NotImplementedError):
        return False
    return True


def check_cli_checkpoint(config: Any) -> None:
    """Before LightningCLI reads `--ckpt_path`'s hyper-parameters into the config, check that file.

    The classes the user's own config names (`--model.class_path`, a reference's `class_path`) are
    trusted; the checkpoint may name only those and lit_tokensel's (`load_checkpoint_file`).
    """
    subcommand = config.get("subcommand")
    section = config.get(subcommand) if subcommand else config
    if section is None:
        return
    model = section.get("model")
    if model is not None:
        trust_config_classes(model.as_dict() if hasattr(model, "as_dict") else model)
    ckpt_path = section.get("ckpt_path")
    if ckpt_path and Path(ckpt_path).is_file():
        load_checkpoint_file(ckpt_path)
    elif ckpt_path and (Path(ckpt_path) / ".metadata").is_file():
        check_sharded_checkpoint(ckpt_path)


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file allowing only its dataclasses, enums and torch's dtypes/Size.

    torch's own `FileSystemReader.read_metadata` uses plain `pickle.load`, so a crafted `.metadata`
    would run code the moment a sharded checkpoint folder is opened.
    """

    def find_class(self, module: str, name: str) -> Any:
        import dataclasses
        import enum

        if module.startswith("torch.distributed.checkpoint."):
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        elif module == "torch" and (
            name == "Size"
            or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
        ):
            return getattr(torch, name)
        elif (module, name) == (
            "torch.serialization",
            "_get_layout",
        ):  # str -> torch.layout, as torch pickles it
            return super().find_class(module, name)
        elif (module, name) in (
            ("collections", "OrderedDict"),
            ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"),
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in DCP metadata")


def check_sharded_checkpoint(path: str | os.PathLike) -> None:
    """Refuse a sharded (DCP) checkpoint folder whose `.metadata` or `meta.pt` holds anything but plain data."""
    path = Path(path)
    metadata = path / ".metadata"
    try:
        with open(metadata, "rb") as handle:
            _DcpMetadataUnpickler(handle).load()
    except (pickle.UnpicklingError, AttributeError, EOFError, ImportError, TypeError, ValueError) as e:
        raise UnsafeCheckpointError(
            f"{metadata}: refused to load the sharded checkpoint {path}: its metadata is not plain DCP "
            f"metadata ({e}). lit_tokensel never unpickles code from a checkpoint."
        ) from None
    if (path / "meta.pt").is_file():
        load_checkpoint_file(path / "meta.pt")
