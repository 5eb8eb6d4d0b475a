"""Per-token scores built from losses and attention: pure torch, `[B, T-1]` in and out."""

from __future__ import annotations

import torch


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
) -> torch.Tensor:
    """ssToken's combined score `gamma * minmax_seq(REL) + (1 - gamma) * attention`, `[B, T-1]`.

    Either signal may be None when its weight is zero (`gamma=0`: attention only; `gamma=1`: REL only).
    """
    combined = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    if gamma > 0.0:
        if retrospective_excess is None:
            raise ValueError("gamma > 0 needs the retrospective excess loss")
        combined = combined + gamma * minmax_per_sequence(retrospective_excess, valid)
    if gamma < 1.0:
        if attention is None:
            raise ValueError("gamma < 1 needs the attention score")
        combined = combined + (1.0 - gamma) * attention.float()
    return torch.where(valid, combined, torch.zeros_like(combined))
