"""Per-token scores built from losses and attention: pure torch, `[B, T-1]` in and out."""

from __future__ import annotations

from typing import Literal

import torch

RelForm = Literal["difference", "relative", "inverted"]
Combine = Literal["minmax", "rank"]


def retrospective_excess(
    history_losses: torch.Tensor, losses: torch.Tensor, form: RelForm = "difference", eps: float = 1e-6
) -> torch.Tensor:
    """ssToken's loss gap in one of three forms, `[B, T-1]` in and out.

    - `difference`: `L_his - L_theta`, the paper's REL (keep the tokens the model improved on most).
    - `relative`: `(L_his - L_theta) / L_his`, the share of the history's loss removed; it does not
      grow with the history's loss, so tokens new to the history (high `L_his`) do not lead by size alone.
    - `inverted`: `L_theta - L_his`, keep the tokens the model improved on *least*.
    """
    gap = history_losses.float() - losses.float()  # [B, T-1]
    if form == "difference":
        return gap
    if form == "relative":
        return gap / history_losses.float().clamp_min(eps)
    if form == "inverted":
        return -gap
    raise ValueError(f"rel_form={form!r}: use 'difference', 'relative' or 'inverted'")


def rank_per_sequence(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Each response token's rank within its sequence, scaled to [0, 1] (lowest 0, highest 1); 0 off them.

    Ties take the order of their position (earlier first), so the result is deterministic. A sequence
    with one response token maps it to 1.
    """
    values = scores.float().masked_fill(~valid, -torch.inf)  # [B, T-1]
    order = torch.argsort(values, dim=1, stable=True)  # [B, T-1], ascending, padding first
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(values.shape[1], device=values.device).expand_as(order))
    n = valid.sum(dim=1, keepdim=True)  # [B, 1]
    ranks = ranks - (values.shape[1] - n)  # [B, T-1]: 0 .. n-1 on the response tokens
    scaled = ranks.float() / (n - 1).clamp_min(1).float()  # [B, T-1]
    scaled = torch.where(n == 1, torch.ones_like(scaled), scaled)
    return torch.where(valid, scaled, torch.zeros_like(scaled))


def minmax_per_sequence(scores: torch.Tensor, valid: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`(s - min) / (max - min + eps)` over each sequence's response tokens; 0 off them.

    ssToken normalizes its loss gap this way so that it mixes with the attention score, which
    already lies in [0, 1]. A sequence whose scores are all equal maps to 0.
    """
    values = scores.float()
    lowest = values.masked_fill(~valid, torch.inf).amin(dim=1, keepdim=True)  # [B, 1]
    highest = values.masked_fill(~valid, -torch.inf).amax(dim=1, keepdim=True)  # [B, 1]
    span = (highest - lowest).clamp_min(0.0)  # [B, 1]; inf - inf rows (no response) are NaN
    normalized = (values - lowest) / (span + eps)  # [B, T-1]
    return torch.where(valid, normalized, torch.zeros_like(normalized))


def sstoken_scores(
    retrospective_excess: torch.Tensor | None,
    attention: torch.Tensor | None,
    valid: torch.Tensor,
    gamma: float,
    combine: Combine = "minmax",
) -> torch.Tensor:
    """ssToken's combined score `gamma * minmax_seq(REL) + (1 - gamma) * attention`, `[B, T-1]`.

    Either signal may be None when its weight is zero (`gamma=0`: attention only; `gamma=1`: REL only).
    `combine="rank"` mixes the per-sequence ranks of both signals instead (`rank_per_sequence`), so that
    one extreme token cannot squeeze the rest of its sequence's REL towards 0.
    """
    if combine not in ("minmax", "rank"):
        raise ValueError(f"combine={combine!r}: use 'minmax' or 'rank'")
    combined = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    if gamma > 0.0:
        if retrospective_excess is None:
            raise ValueError("gamma > 0 needs the retrospective excess loss")
        normalize = minmax_per_sequence if combine == "minmax" else rank_per_sequence
        combined = combined + gamma * normalize(retrospective_excess, valid)
    if gamma < 1.0:
        if attention is None:
            raise ValueError("gamma < 1 needs the attention score")
        semantic = attention.float() if combine == "minmax" else rank_per_sequence(attention, valid)
        combined = combined + (1.0 - gamma) * semantic
    return torch.where(valid, combined, torch.zeros_like(combined))
