"""Callback states that hold DTensor shards (the EMA history) in distributed checkpoints.

Lightning's `ModelParallelStrategy` writes model and optimizer states with torch.distributed.checkpoint
(DCP, one shard per rank) but pickles everything else, callback states included, from rank 0 alone
(`meta.pt`): a sharded EMA history would keep rank 0's shard only. These helpers move every DTensor
of the callback states into the DCP state, leaving a plain-data marker in its place, and put the
tensors back on load.
"""

from __future__ import annotations

from typing import Any

import torch

MARKER = "__lit_tokensel_dcp__"
DCP_KEY = "callback_tensors"  # top-level key of the moved tensors in the DCP state


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _walk(value: Any, path: str, visit) -> Any:
    """Rebuild nested dicts/lists/tuples with `visit(path, leaf)` applied to every leaf."""
    if isinstance(value, dict):
        return {k: _walk(v, f"{path}/{k}", visit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_walk(v, f"{path}/{i}", visit) for i, v in enumerate(value)]
        return type(value)(items) if isinstance(value, tuple) else items
    return visit(path, value)


def extract_dtensors(callbacks: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Replace each DTensor in `checkpoint["callbacks"]` with a marker; return (states, {key: DTensor})."""
    moved: dict[str, torch.Tensor] = {}

    def visit(path: str, leaf: Any) -> Any:
        if _is_dtensor(leaf):
            moved[path] = leaf
            return {MARKER: path}
        return leaf

    return _walk(callbacks, "", visit), moved


def gather_dtensors(callbacks: dict[str, Any]) -> dict[str, Any]:
    """The callback states with every DTensor all-gathered to a full CPU tensor (collective on all ranks)."""
    return _walk(callbacks, "", lambda _, leaf: leaf.full_tensor().cpu() if _is_dtensor(leaf) else leaf)


def marker_paths(callbacks: dict[str, Any]) -> list[str]:
    """The DCP keys of the markers left by `extract_dtensors`."""
    paths: list[str] = []

    def find(value: Any) -> None:
        if isinstance(value, dict):
            if MARKER in value and len(value) == 1:
                paths.append(value[MARKER])
                return
            for v in value.values():
                find(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                find(v)

    find(callbacks)
    return paths


def fill_markers(callbacks: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Put `tensors[key]` where `extract_dtensors` left the marker `key`."""

    def rebuild(value: Any) -> Any:
        if isinstance(value, dict):
            if MARKER in value and len(value) == 1:
                return tensors[value[MARKER]]
            return {k: rebuild(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [rebuild(v) for v in value]
            return type(value)(items) if isinstance(value, tuple) else items
        return value

    return rebuild(callbacks)


def live_dtensors(callbacks: list[Any]) -> dict[str, torch.Tensor]:
    """The DTensors in the live callbacks' `state_dict()`s, keyed like `extract_dtensors` keys them.

    They are the load targets: DCP reads each rank's shard straight into them.
    """
    states = {cb.state_key: cb.state_dict() for cb in callbacks}
    return extract_dtensors(states)[1]
