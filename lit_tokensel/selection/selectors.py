"""Keep-masks from per-token scores: top-k per sequence, per batch, or above a dataset-wide threshold.

All selectors keep the *largest* scores (negate a score to keep the smallest) and only ever keep
valid (response) positions. Ties are broken deterministically: the earlier position wins (row-major
over the batch for the batch scope), so a selection never depends on the sort kernel.
"""

from __future__ import annotations

import math
import typing
from typing import Any, Literal

import torch

from lit_tokensel.selection.finite import NonFiniteError, check_finite, describe_nonfinite

Scope = Literal["sequence", "batch", "global"]
SCOPES: tuple[str, ...] = typing.get_args(Scope)


def check_ratio(ratio: float, name: str = "ratio") -> float:
    """Validate a keep ratio in (0, 1]; a config error otherwise."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(
            f"{name}={ratio!r} must be a number in (0, 1] (the fraction of response tokens kept)"
        )
    return float(ratio)


def keep_count(n: torch.Tensor, ratio: float) -> torch.Tensor:
    """`ceil(ratio * n)`, robust to float error (0.6 * 5 is 3.0000000000000004, which must give 3)."""
    return torch.ceil(torch.round(n.double() * ratio, decimals=9)).long()


def _ranks_descending(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim, largest first, earlier index first among ties."""
    order = torch.sort(-scores, dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return ranks.scatter_(-1, order, positions.contiguous())


def _masked_scores(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    check_finite(
        scores, what="selection scores at response positions", source="the method's token scores", mask=valid
    )
    return scores.float().masked_fill(~valid, -math.inf)


def top_k_per_sequence(scores: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the top `ceil(ratio * n_response)` tokens of each sequence. `[B, T-1]` in and out."""
    k = keep_count(valid.sum(dim=1), ratio)  # [B]
    ranks = _ranks_descending(_masked_scores(scores, valid))  # [B, T-1]
    return (ranks < k[:, None]) & valid


def turn_ends(valid: torch.Tensor) -> torch.Tensor:
    """The last response token of each contiguous response span (each assistant turn), `[B, T-1]` bool.

    With chat templates that label the end-of-turn token (the DataModule does), that is the end-of-turn token.
    """
    following = torch.zeros_like(valid)  # [B, T-1]
    following[:, :-1] = valid[:, 1:]
    return valid & ~following


def top_k_per_batch(
    scores: torch.Tensor, valid: torch.Tensor, ratio: float, group: Any | None = None
) -> torch.Tensor:
    """Keep the top `ceil(ratio * n_response)` tokens of the whole batch. `[B, T-1]` in and out.

    With a process `group`, the batch is the global one: every rank's micro-batch, ranked together
    (`lit_tokensel.selection.global_batch.global_top_k_per_batch`); each rank gets its own rows of the result.
    """
    if group is not None:
        from lit_tokensel.selection.global_batch import global_top_k_per_batch  # it builds on this function

        return global_top_k_per_batch(scores, valid, ratio, group)
    k = keep_count(valid.sum(), ratio)
    ranks = _ranks_descending(_masked_scores(scores, valid).flatten())  # [B*(T-1)]
    return (ranks < k).view_as(valid) & valid


def global_threshold(all_scores: torch.Tensor, ratio: float) -> float:
    """Score of the `ceil(ratio * N)`-th largest of the dataset's response-token scores (1-D input).

    Keeping `score >= threshold` then keeps the dataset's top `ratio` (plus any exact ties).
    """
    flat = all_scores.flatten().double()
    if flat.numel() == 0:
        raise ValueError("global_threshold needs at least one score")
    if not bool(
        torch.isfinite(flat).all()
    ):  # topk ranks NaN highest: the threshold would keep the wrong tokens
        raise NonFiniteError(
            f"global_threshold: {describe_nonfinite(flat)} among the dataset's {flat.numel()} token scores; "
            "the losses they come from (token-loss caches or models) must be finite."
        )
    k = int(keep_count(torch.tensor(flat.numel()), ratio))
    return float(torch.topk(flat, k).values[-1])


def above_threshold(scores: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep response tokens whose score is at least `threshold`. `[B, T-1]` in and out."""
    return (scores >= threshold) & valid


def select_top(
    scores: torch.Tensor,
    valid: torch.Tensor,
    ratio: float,
    scope: Scope,
    threshold: float | None = None,
    group: Any | None = None,
) -> torch.Tensor:
    """Dispatch on scope; `global` needs the threshold computed once from the whole dataset's scores.

    `group` (a process group, or None for this process alone) makes the `batch` scope span every
    rank's micro-batch; `sequence` and `global` are the same on every rank without communication.
    """
    if scope == "sequence":
        return top_k_per_sequence(scores, valid, ratio)
    if scope == "batch":
        return top_k_per_batch(scores, valid, ratio, group)
    if scope == "global":
        if threshold is None:
            raise ValueError("scope='global' needs a threshold from the dataset's cached scores")
        return above_threshold(scores, valid, threshold)
    raise ValueError(f"scope={scope!r}: use one of {', '.join(SCOPES)}")
