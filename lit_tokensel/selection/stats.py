"""Per-step selection statistics: what was kept, how its scores spread, how hard kept vs dropped tokens are."""

from __future__ import annotations

import torch

QUANTILES = (0.1, 0.5, 0.9)


def selection_statistics(
    keep: torch.Tensor, valid: torch.Tensor, token_losses: torch.Tensor, scores: torch.Tensor | None = None
) -> dict[str, float]:
    """Kept fraction, mean loss of kept and dropped tokens, score quantiles. Inputs `[B, T-1]`."""
    keep = keep & valid
    dropped = valid & ~keep
    losses = token_losses.detach().float()
    stats = {"kept_fraction": float(keep.sum()) / max(int(valid.sum()), 1)}
    if keep.any():
        stats["loss_kept"] = float(losses[keep].mean())
    if dropped.any():
        stats["loss_dropped"] = float(losses[dropped].mean())
    if scores is not None and valid.any():
        values = scores.detach().float()[valid]
        for q, v in zip(QUANTILES, torch.quantile(values, torch.tensor(QUANTILES, device=values.device))):
            stats[f"score_q{int(q * 100)}"] = float(v)
    return stats
