"""Selection quality from `lit-tokensel inspect` records, and mean/spread over seeds.

A token counts as *learned* when the method trains on it with a positive weight: kept, and for
Forgetting not one of its negative (gradient-ascent) tokens. "Dropped" is the complement, so the
corrupted-dropped fraction is the share of corrupted tokens the model is not fitted to.
The AUC is the probability that a random clean token outranks a random corrupted one on the score the
method keeps by (oriented so that high = keep); 0.5 is chance. Tokens without a score (samples a
method dropped whole, or outside a self-evolving round's chunk) are left out of the AUC.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torchmetrics.functional.classification import binary_auroc


def selection_quality(
    records: Iterable[dict[str, Any]], labels: Sequence[Sequence[int]], score: tuple[str, int] | None
) -> dict[str, float | None]:
    """`drop_corrupted`, `drop_clean`, `auc` and `corrupted_share` over the inspected samples.

    `labels[sample_id]` holds the 0/1 corruption label of each response token, aligned with a record's
    `tokens`. `score` is `(score name, sign)`, or None for a method without a ranking.
    """
    dropped_corrupt = dropped_clean = n_corrupt = n_clean = 0
    values: list[float] = []
    targets: list[int] = []
    for record in records:
        corrupt = list(labels[record["sample_id"]])
        if len(corrupt) != len(record["tokens"]):
            raise ValueError(
                f"sample {record['sample_id']}: {len(corrupt)} labels for {len(record['tokens'])} "
                "inspected tokens; the labels belong to other data"
            )
        weights = record.get("weight") or [1.0] * len(corrupt)
        for label, keep, weight in zip(corrupt, record["keep"], weights, strict=True):
            learned = bool(keep) and weight > 0
            if label:
                n_corrupt += 1
                dropped_corrupt += not learned
            else:
                n_clean += 1
                dropped_clean += not learned
        if score is not None and record.get("scores") and score[0] in record["scores"]:
            values += [score[1] * v for v in record["scores"][score[0]]]
            targets += [1 - c for c in corrupt]
    return {
        "drop_corrupted": dropped_corrupt / n_corrupt if n_corrupt else None,
        "drop_clean": dropped_clean / n_clean if n_clean else None,
        "auc": ranking_auc(
            [v for v, t in zip(values, targets) if t], [v for v, t in zip(values, targets) if not t]
        ),
        "corrupted_share": n_corrupt / max(n_corrupt + n_clean, 1),
    }


def ranking_auc(high: Sequence[float], low: Sequence[float]) -> float | None:
    """ROC AUC: the probability that a random `high` value outranks a random `low` one (ties count half);
    None unless both are non-empty. Non-finite values are left out."""
    high = [v for v in high if math.isfinite(v)]
    low = [v for v in low if math.isfinite(v)]
    if not high or not low:
        return None
    values = torch.tensor([*high, *low], dtype=torch.float64)
    return float(binary_auroc(values, torch.tensor([1] * len(high) + [0] * len(low))))


def stat(values: Sequence[float | None]) -> dict[str, Any] | None:
    """`{"mean", "std", "values"}` over seeds (sample standard deviation; 0 with one value); None if no value."""
    present = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not present:
        return None
    return {
        "mean": statistics.fmean(present),
        "std": statistics.stdev(present) if len(present) > 1 else 0.0,
        "values": present,
    }
