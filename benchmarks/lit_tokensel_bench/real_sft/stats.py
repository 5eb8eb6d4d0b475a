"""Differences to full SFT that account for which documents were drawn: a paired bootstrap over documents,
and the minimum detectable difference (MDD) at the study's document counts.

Every run of the study scores the same documents, so a method and full SFT are compared document by
document: per document, each side's score is first averaged over its seeds, then the mean of the paired
differences is the effect. Resampling documents (with replacement, the same draw for both sides) gives
its interval; this is the noise of having evaluated these documents and not others. Seed-to-seed noise
is reported separately (mean ± std over seeds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

Z_ALPHA = 1.959963984540054  # two-sided 5%
Z_POWER = 0.8416212335729143  # 80% power
MDD_FACTOR = Z_ALPHA + Z_POWER


def seed_mean(per_seed: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per document: the mean of its score over seeds (documents present in every seed only)."""
    if not per_seed:
        raise ValueError("no seeds")
    common = set(per_seed[0]).intersection(*per_seed[1:])
    return {doc: float(np.mean([s[doc] for s in per_seed])) for doc in sorted(common)}


def paired_differences(method: Mapping[str, float], baseline: Mapping[str, float]) -> np.ndarray:
    """method - baseline per document, over the documents both scored, in sorted document order."""
    docs = sorted(set(method) & set(baseline))
    if not docs:
        raise ValueError("no document scored by both sides")
    return np.array([method[d] - baseline[d] for d in docs], dtype=np.float64)  # [D]


def paired_bootstrap(
    differences: Sequence[np.ndarray], *, iters: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean paired difference and its percentile interval, resampling documents within each group.

    `differences` holds one array of per-document differences per task; the statistic is the mean over
    tasks of each task's mean difference (one task: the plain mean). Documents are resampled within their
    task, so every task keeps its weight. Returns `{"diff", "low", "high", "se"}` (se: bootstrap std).
    """
    groups = [np.asarray(d, dtype=np.float64) for d in differences]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("every task needs at least one document")
    rng = np.random.default_rng(seed)
    draws = np.zeros(iters)
    for g in groups:
        index = rng.integers(0, g.size, size=(iters, g.size))  # [iters, D]
        draws += g[index].mean(axis=1)
    draws /= len(groups)
    alpha = (1 - level) / 2
    return {
        "diff": float(np.mean([g.mean() for g in groups])),
        "low": float(np.quantile(draws, alpha)),
        "high": float(np.quantile(draws, 1 - alpha)),
        "se": float(draws.std(ddof=1)),
    }


def mdd_paired(differences: np.ndarray) -> float:
    """Smallest true mean difference a two-sided 5% test detects with 80% power at this document count:
    (z_0.975 + z_0.8) * sd(differences) / sqrt(n)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.size < 2:
        return math.nan
    return float(MDD_FACTOR * d.std(ddof=1) / math.sqrt(d.size))


def mdd_binomial(accuracy: float, n: int) -> float:
    """The MDD of two independent accuracies near `accuracy` on `n` documents each (no pairing):
    (z_0.975 + z_0.8) * sqrt(2 p (1 - p) / n); an upper bound on the paired MDD."""
    return float(MDD_FACTOR * math.sqrt(2 * accuracy * (1 - accuracy) / n))


def verdict(interval: Mapping[str, float], higher_is_better: bool) -> str:
    """`better`, `worse` or `same` (the interval holds 0) for a difference method - full SFT."""
    if interval["low"] > 0:
        return "better" if higher_is_better else "worse"
    if interval["high"] < 0:
        return "worse" if higher_is_better else "better"
    return "same"
