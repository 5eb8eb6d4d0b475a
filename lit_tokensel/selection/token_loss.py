"""Per-token cross-entropy in the `[B, T-1]` frame shared by every method.

Entry `j` of a per-token tensor is about predicting token `j+1` from tokens `<= j`, so it pairs with
`labels[:, 1:]`. This module is the only place that does the shift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and their valid mask in the `[B, T-1]` frame.

    Returns `(targets, valid)`: `targets = labels[:, 1:]` with ignored positions replaced by 0 (a
    safe index), and `valid = labels[:, 1:] != -100`.
    """
    targets = labels[:, 1:]  # [B, T-1]
    valid = targets != IGNORE_INDEX  # [B, T-1]
    return targets.masked_fill(~valid, 0), valid


def per_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss `-log p(x_{j+1} | x_<=j)` and the valid mask, both `[B, T-1]`.

    `logits` is `[B, T, V]` from a causal LM, `labels` `[B, T]` with -100 on untrained positions.
    Computed in float32; invalid positions hold exactly 0.
    """
    targets, valid = shift_labels(labels)
    shifted = logits[:, :-1, :].float()  # [B, T-1, V]
    losses = F.cross_entropy(shifted.flatten(0, 1), targets.flatten(), reduction="none")  # [B*(T-1)]
    return losses.view_as(targets) * valid, valid


def per_token_cross_entropy_chunked(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as `per_token_cross_entropy(lm_head(hidden), labels)` without materializing `[B, T, V]`.

    `hidden` is the decoder's last hidden state `[B, T, H]`; the projection to the vocabulary and the
    cross-entropy run in chunks through `torch.nn.functional.linear_cross_entropy`. Only response
    positions are projected at all.
    """
    targets, valid = shift_labels(labels)
    rows = hidden[:, :-1, :][valid]  # [N, H], N = response tokens in the batch
    losses = torch.zeros(valid.shape, dtype=torch.float32, device=hidden.device)  # [B, T-1]
    if rows.shape[0] == 0:
        return losses + 0.0 * hidden.sum(), valid  # keep the graph for an all-prompt batch
    per_row = F.linear_cross_entropy(
        rows,
        lm_head_weight,
        targets[valid],
        linear_bias=lm_head_bias,
        reduction="none",
        options=torch.nn.LinearCrossEntropyOptions(),
    )  # [N]
    return losses.masked_scatter(valid, per_row.float()), valid


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of `values` where `mask` is set. Stays in the autograd graph when the mask is empty,
    so a batch with no selected token contributes a zero gradient instead of NaN."""
    return (values * mask.to(values.dtype)).sum()
