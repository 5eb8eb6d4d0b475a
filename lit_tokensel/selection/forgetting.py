"""Forgetting (arXiv 2508.04329): a dataset-wide positive/negative token partition and signed loss weights.

The objective is `mean CE(positive) - lambda * mean CE(negative)` over the global batch. The shared
training step backpropagates `sum(weights * CE)` over kept tokens and divides by the window's normalizer,
so within one micro-batch the objective is these weights: 1 on positive tokens, `-lambda * N_pos / N_neg`
on negative tokens, with normalizer `N_pos`. Then `sum(w * CE) / N_pos = mean CE(pos) - lambda * mean
CE(neg)`. `ForgettingSFT` trains through the base's `LossTerm` instead (exact under accumulation too);
`forgetting_weights` is the same objective in closed form, the effective weights `inspect` shows.
"""

from __future__ import annotations

import math

import torch

from lit_tokensel.selection.finite import NonFiniteError, check_finite


def lambda_schedule(lambda_max: float, step: int, total_steps: int) -> float:
    """Linear ramp `lambda_max * step / total_steps`, clamped to `[0, lambda_max]`.

    `step` is the optimizer step about to be taken (Lightning's `global_step`, restored on resume), so
    the first step trains with lambda 0 and the last with `lambda_max * (total - 1) / total`.
    """
    if total_steps <= 0:
        return 0.0
    return lambda_max * min(max(step, 0), total_steps) / total_steps


def partition_tokens(
    scores: torch.Tensor, valid: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive tokens (`score >= threshold`) and negative tokens (every other response token), `[B, T-1]` each.

    Non-finite scores or threshold are refused (`NonFiniteError`): `>=` would make a NaN token negative,
    i.e. a token to unlearn."""
    if not math.isfinite(threshold):
        raise NonFiniteError(f"partition_tokens: the threshold is {threshold}; it must be finite")
    check_finite(
        scores, what="Forgetting scores at response positions", source="the token-loss caches", mask=valid
    )
    positive = (scores >= threshold) & valid  # [B, T-1]
    return positive, valid & ~positive


def forgetting_weights(
    positive: torch.Tensor,
    negative: torch.Tensor,
    lam: float,
    n_positive: float,
    n_negative: float,
    token_losses: torch.Tensor | None = None,
    negative_loss_cap: float | None = None,
) -> torch.Tensor:
    """Signed per-token weights `[B, T-1]`: 1 on positives, `-lam * n_positive / n_negative` on negatives.

    `n_positive` and `n_negative` are the counts the means run over (this micro-batch, summed over
    ranks). Without negatives the ascent weight is 0 (nothing to forget); without positives it is 0 too,
    since the ascent term is scaled to the positive count (see `ForgettingSFT`).

    With `negative_loss_cap`, a negative token whose (detached) loss is above the cap gets weight 0:
    the gradient of `clamp(CE, max=cap)`. The ascent can push a token's loss to the cap but no further,
    and a token past the cap no longer contributes gradient.
    """
    ascent = lam * n_positive / n_negative if n_negative > 0 and n_positive > 0 else 0.0
    weights = positive.float() - ascent * negative.float()  # [B, T-1]
    if negative_loss_cap is not None:
        if token_losses is None:
            raise ValueError("negative_loss_cap needs the token losses")
        over = negative & (token_losses.detach() > negative_loss_cap)  # [B, T-1]
        weights = weights.masked_fill(over, 0.0)
    return weights
