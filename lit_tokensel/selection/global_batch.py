"""Selection over the global batch: all-gather the ranks' scores, rank them as one batch, keep the local part.

`global_top_k_per_batch` gives exactly the keep-mask that single-process `top_k_per_batch` gives on
the concatenation of every rank's micro-batch (rank 0's rows first), ties included: the ranks may
pad to different widths and hold different numbers of rows, but padding sits at the end of each row
and is never valid, so the row-major order of the valid positions, which breaks ties, is the same.
Every rank computes the same global selection from the same gathered tensor, so they agree without
a broadcast. The gathered tensor is one float per token of the global batch: small next to a forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from lit_tokensel.selection.selectors import top_k_per_batch


def all_gather_padded(
    tensor: torch.Tensor, group: Any | None = None, fill: float = math.nan
) -> list[torch.Tensor]:
    """Every rank's 2-D `tensor`, which may differ in shape between ranks; returned in rank order, unpadded.

    Two collectives: the shapes, then the data padded to the largest shape with `fill`.
    """
    if tensor.dim() != 2:
        raise ValueError(f"all_gather_padded takes a 2-D tensor, got shape {tuple(tensor.shape)}")
    world = dist.get_world_size(group)
    shape = torch.tensor(tensor.shape, device=tensor.device, dtype=torch.long)  # [2]
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    sizes = [tuple(int(v) for v in s.tolist()) for s in shapes]
    rows, cols = max(s[0] for s in sizes), max(s[1] for s in sizes)
    padded = tensor.new_full((rows, cols), fill)
    padded[: tensor.shape[0], : tensor.shape[1]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous(), group=group)
    return [g[:r, :c] for g, (r, c) in zip(gathered, sizes, strict=True)]


def encode_scores(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`[B, T-1]` float32 payload with NaN at invalid positions: scores and mask in one tensor to gather.

    NaN scores at valid positions are therefore an error, as in the single-process selectors.
    """
    if torch.isnan(scores[valid]).any():
        raise ValueError("selection scores contain NaN at response positions")
    return scores.float().masked_fill(~valid, math.nan)


def top_k_from_parts(parts: list[torch.Tensor], rank: int, ratio: float) -> torch.Tensor:
    """Rank `parts` (every rank's `encode_scores` payload, in rank order) as one batch; `rank`'s keep-mask.

    The global batch is the parts stacked in rank order, padded to the widest with invalid positions.
    """
    width = max(p.shape[1] for p in parts)
    full = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=math.nan) for p in parts])
    global_valid = ~torch.isnan(full)  # [sum B_r, width]
    keep = top_k_per_batch(full.masked_fill(~global_valid, -math.inf), global_valid, ratio)
    start = sum(p.shape[0] for p in parts[:rank])
    local = parts[rank]
    return keep[start : start + local.shape[0], : local.shape[1]]  # [B, T-1] of this rank


def global_top_k_per_batch(
    scores: torch.Tensor, valid: torch.Tensor, ratio: float, group: Any | None = None
) -> torch.Tensor:
    """Top `ceil(ratio * n)` of the global batch's `n` response tokens; this rank's keep-mask `[B, T-1]`.

    One process (no process group initialized, or a group of one) gives `top_k_per_batch`.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return top_k_per_batch(scores, valid, ratio)
    parts = all_gather_padded(encode_scores(scores, valid), group)
    return top_k_from_parts(parts, dist.get_rank(group), ratio) & valid
