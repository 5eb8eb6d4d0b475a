"""Which processes a batch-scope selection spans (`selection_group`); the global ranking itself lives in
`lit_tokensel.selection.global_batch` (torch.distributed only, no Lightning) and is re-exported here."""

from __future__ import annotations

import typing
from typing import Any, Literal

import torch.distributed as dist

from lit_tokensel.selection.global_batch import (
    all_gather_padded,
    encode_scores,
    global_top_k_per_batch,
    top_k_from_parts,
)

__all__ = [
    "SELECTION_GROUPS",
    "SelectionGroup",
    "all_gather_padded",
    "check_selection_group",
    "encode_scores",
    "global_top_k_per_batch",
    "resolve_process_group",
    "top_k_from_parts",
]

SelectionGroup = Literal["global", "rank"]
SELECTION_GROUPS: tuple[str, ...] = typing.get_args(SelectionGroup)


def check_selection_group(selection_group: str) -> str:
    """Validate a `selection_group` option: `global` (all ranks' batches as one) or `rank` (each rank alone)."""
    if selection_group not in SELECTION_GROUPS:
        raise ValueError(
            f"selection_group={selection_group!r}: use 'global' (rank over the global batch of all ranks, "
            "the same selection as one process) or 'rank' (each rank ranks its own micro-batch)"
        )
    return selection_group


def resolve_process_group(selection_group: str) -> Any | None:
    """The process group a batch-scope selection spans: None when it is local (one process, or `rank`)."""
    check_selection_group(selection_group)
    if selection_group == "rank" or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.group.WORLD if dist.get_world_size() > 1 else None
