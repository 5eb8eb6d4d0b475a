"""Refuse non-finite values (NaN, +-inf) in losses and scores, with an error that says where they came from.

A NaN in a token loss or a selection score is never a usable signal: ranking puts NaN first (`topk`),
`>=` puts it last, and one NaN in a loss makes every weight NaN after the update. So the first one
stops the run with the step, the samples and the source named, instead of training on garbage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class NonFiniteError(ValueError):
    """A loss, gradient or score is NaN or infinite (a `ValueError`: bad values, like other input errors)."""


def describe_nonfinite(values: torch.Tensor) -> str:
    """`"3 NaN, 1 inf"`: what kind of non-finite values `values` holds."""
    nan = int(torch.isnan(values).sum())
    inf = int(torch.isinf(values).sum())
    return ", ".join(part for part in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if part)


def check_finite(
    values: torch.Tensor,
    *,
    what: str,
    source: str,
    mask: torch.Tensor | None = None,
    sample_ids: torch.Tensor | Sequence[int] | None = None,
    step: int | None = None,
) -> None:
    """Raise `NonFiniteError` if `values` (only where `mask`, if given) holds NaN or inf.

    `values` and `mask` are `[B, ...]` when `sample_ids` (`[B]`) is given: the message then names the
    samples whose rows are affected. `what` is the quantity ("reference token losses"), `source` where it
    came from ("FrozenModelReference(model='...')"), `step` the optimizer step.
    """
    checked = values.detach() if mask is None else values.detach()[mask]
    if bool(torch.isfinite(checked).all()):
        return
    where = f" at optimizer step {step}" if step is not None else ""
    samples = ""
    if sample_ids is not None:
        bad = ~torch.isfinite(values.detach())
        if mask is not None:
            bad &= mask
        rows = bad.reshape(bad.shape[0], -1).any(dim=1) if bad.dim() > 0 else bad.reshape(1)
        ids = [int(i) for i, b in zip(torch.as_tensor(sample_ids).tolist(), rows.tolist(), strict=True) if b]
        samples = f" in sample_id {ids}"
    raise NonFiniteError(
        f"non-finite {what} ({describe_nonfinite(checked)}){where}{samples}; source: {source}."
    )
