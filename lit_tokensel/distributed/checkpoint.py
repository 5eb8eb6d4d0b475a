"""Sharded (DCP) checkpoints of `FSDP2Strategy` as one ordinary Lightning checkpoint.

A DCP folder holds each rank's shards of the model, optimizer and callback DTensors plus `meta.pt`
(everything else). Consolidation reads every shard in one process, no process group needed, and
rebuilds the dict that a single-process run would have saved: `state_dict` (full tensors, the same
keys), `optimizer_states`, and callback states with their tensors back in place.

    python -m lit_tokensel.distributed.consolidate runs/.../last.ckpt consolidated.ckpt
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lit_tokensel.checkpoint_io import check_sharded_checkpoint, load_checkpoint_file
from lit_tokensel.distributed.callback_state import DCP_KEY, fill_markers
from lit_tokensel.integrity import write_sidecar
from lit_tokensel.trusted_classes import check_checkpoint_classes

METADATA_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a DCP checkpoint


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A DCP folder written by Lightning's ModelParallelStrategy/FSDPStrategy (has `.metadata`)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def load_checkpoint_dict(path: str | Path) -> dict[str, Any]:
    """A checkpoint as one dict of full CPU tensors, from a `.ckpt` file or a DCP folder.

    Read safely either way: plain data only, every class it names on the allow-list, and a `.ckpt`'s
    recorded sha256 verified (`lit_tokensel.checkpoint_io.load_checkpoint_file`).
    """
    if is_sharded_checkpoint(path):
        return consolidate_checkpoint(path)
    return load_checkpoint_file(path, mmap=True)


def consolidate_checkpoint(path: str | Path, output_file: str | Path | None = None) -> dict[str, Any]:
    """Read the DCP folder `path` into one checkpoint dict; also `torch.save` it to `output_file` if given.

    Needs the whole checkpoint to fit in CPU memory.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(f"{path} is not a distributed (DCP) checkpoint folder: it has no .metadata file")
    check_sharded_checkpoint(path)  # torch unpickles .metadata with plain pickle: check it first
    tensors: dict[str, Any] = {}
    _load_state_dict(
        tensors,
        storage_reader=FileSystemReader(str(path)),
        planner=_EmptyStateDictLoadPlanner(),
        no_dist=True,
    )
    meta_file = path / METADATA_FILE
    checkpoint = load_checkpoint_file(meta_file) if meta_file.is_file() else {}
    # Lightning's pytorch ModelParallelStrategy saves the weights as "state_dict", Fabric as "model".
    checkpoint["state_dict"] = tensors.pop("state_dict", None) or tensors.pop("model", {})
    optimizers = sorted((k for k in tensors if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k[10:]))
    if optimizers:
        checkpoint["optimizer_states"] = [tensors.pop(k) for k in optimizers]
    if DCP_KEY in tensors:
        checkpoint["callbacks"] = fill_markers(checkpoint.get("callbacks", {}), tensors.pop(DCP_KEY))
    checkpoint.update(tensors)  # anything else saved by a custom strategy
    check_checkpoint_classes(checkpoint, str(path))
    if output_file is not None:
        Path(output_file).parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, output_file)
        write_sidecar(output_file)
    return checkpoint
