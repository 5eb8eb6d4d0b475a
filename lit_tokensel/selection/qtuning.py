"""Q-Tuning (arXiv 2509.23873): sample triage on the error-uncertainty plane, then token pruning.

Samples are placed by perplexity (error) and mean predictive entropy (uncertainty), both turned into
quantile ranks in [0, 1] within the batch. With one threshold `alpha` (= beta) in [0, 0.5], a rank is
*high* above `1 - alpha` and *low* below `alpha`:

    Q1 high PPL, high Ent: noise            -> drop
    Q2 high PPL, low Ent:  misconception    -> keep, prune its tokens
    Q3 low PPL,  low Ent:  redundant        -> drop
    Q4 low PPL,  high Ent: calibration      -> keep whole
    anything else (the middle band)         -> drop

Q2 and Q4 only grow as `alpha` grows, so bisection finds the smallest `alpha` keeping at least
`ceil(ratio * B)` samples. When that overshoots (several samples enter at the same `alpha`: only
those are trimmed) or falls short (even `alpha = 0.5` keeps too few: PPL and entropy are usually
positively correlated), the kept set is trimmed or topped up by `|PPL_rank - Ent_rank|`, largest
first: the distance from the diagonal, i.e. how clearly a sample leans to Q2 or Q4. Ties go to the
earlier sample. A topped-up
sample is treated as the kept quadrant whose corner it is nearer to: as Q2 (tokens pruned) when its
PPL rank exceeds its entropy rank, else as Q4 (kept whole). Exactly `ceil(ratio * B)` samples stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_tokensel.selection.selectors import keep_count, top_k_per_sequence

NOISE, MISCONCEPTION, REDUNDANT, CALIBRATION = 1, 2, 3, 4
"""Quadrant codes Q1..Q4; 0 is the middle band."""


@dataclass
class SampleTriage:
    """The sample-level decision for one batch.

    Attributes:
        keep: `[B]` bool, the samples trained on (exactly `ceil(ratio * B)`).
        prune_tokens: `[B]` bool, kept samples treated as Q2: only their lowest-score tokens are trained.
        quadrant: `[B]` long, Q1..Q4 codes at `alpha` (0 = middle band).
        alpha: The bisected threshold.
        topped_up: How many kept samples were outside Q2 and Q4.
    """

    keep: torch.Tensor
    prune_tokens: torch.Tensor
    quadrant: torch.Tensor
    alpha: float
    topped_up: int


def sample_perplexity_entropy(
    nll: torch.Tensor, entropy: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample `exp(mean NLL)` and mean entropy over response tokens, `[B]` each, from `[B, T-1]` inputs."""
    n = valid.sum(dim=1).clamp(min=1).double()  # [B]
    mean_nll = (nll.double() * valid).sum(dim=1) / n  # [B]
    return mean_nll.exp(), (entropy.double() * valid).sum(dim=1) / n


def quantile_ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of each of `B` values scaled to [0, 1] (smallest 0, largest 1); ties share their mean rank."""
    v = values.double().flatten()  # [B]
    if v.numel() == 1:
        return torch.full_like(v, 0.5)
    less = (v[None, :] < v[:, None]).sum(dim=1).double()  # [B]
    equal = (v[None, :] == v[:, None]).sum(dim=1).double()  # [B]
    return (less + (equal - 1) / 2) / (v.numel() - 1)


def quadrants(ppl_rank: torch.Tensor, ent_rank: torch.Tensor, alpha: float) -> torch.Tensor:
    """Quadrant code per sample `[B]` (Q1..Q4, 0 for the middle band) for threshold `alpha` in [0, 0.5]."""
    high_p, low_p = ppl_rank > 1 - alpha, ppl_rank < alpha  # [B] each
    high_e, low_e = ent_rank > 1 - alpha, ent_rank < alpha
    code = torch.zeros(ppl_rank.shape, dtype=torch.long, device=ppl_rank.device)
    code[high_p & high_e] = NOISE
    code[high_p & low_e] = MISCONCEPTION
    code[low_p & low_e] = REDUNDANT
    code[low_p & high_e] = CALIBRATION
    return code


def _kept(ppl_rank: torch.Tensor, ent_rank: torch.Tensor, alpha: float) -> torch.Tensor:
    code = quadrants(ppl_rank, ent_rank, alpha)
    return (code == MISCONCEPTION) | (code == CALIBRATION)  # [B]


def bisect_alpha(
    ppl_rank: torch.Tensor, ent_rank: torch.Tensor, k: int, iterations: int = 40
) -> tuple[float, float]:
    """Bracket `(lo, hi)` around the smallest `alpha` in [0, 0.5] with at least `k` samples in Q2 or Q4.

    Fewer than `k` are kept at `lo`, at least `k` at `hi`, and `hi - lo = 0.5 / 2**iterations`, far
    below the spacing of quantile ranks, so the samples kept at `hi` but not at `lo` are the ones that
    enter at the same threshold. `(0.5, 0.5)` when even 0.5 keeps fewer than `k` (the caller tops up).
    """
    lo, hi = 0.0, 0.5
    if int(_kept(ppl_rank, ent_rank, hi).sum()) < k:
        return hi, hi
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if int(_kept(ppl_rank, ent_rank, mid).sum()) >= k:
            hi = mid
        else:
            lo = mid
    return lo, hi


def triage_samples(ppl: torch.Tensor, entropy: torch.Tensor, ratio: float) -> SampleTriage:
    """Keep exactly `ceil(ratio * B)` samples (at least 1) of Q2 and Q4, trimmed or topped up as the module
    docstring says. `ppl` and `entropy` are `[B]`; pass CPU tensors on a GPU (the bisection reads counts)."""
    ppl_rank, ent_rank = quantile_ranks(ppl), quantile_ranks(entropy)  # [B] each
    k = max(int(keep_count(torch.tensor(ppl_rank.numel()), ratio)), 1)
    lo, hi = bisect_alpha(ppl_rank, ent_rank, k)
    code = quadrants(ppl_rank, ent_rank, hi)
    sure = _kept(ppl_rank, ent_rank, lo)  # [B]
    candidate = (code == MISCONCEPTION) | (code == CALIBRATION)  # [B], `sure` plus the last ones to enter
    # Priority: kept before the threshold's last step, then the samples entering at that step, then the
    # rest; within each group the distance from the diagonal (largest first), then the position.
    group = (~sure).long() + (~candidate).long()  # [B]: 0 sure, 1 entering at hi, 2 outside Q2/Q4
    # The distance in rank units (multiples of 1/2) is exact, so equal distances tie exactly.
    distance = ((ppl_rank - ent_rank) * max(ppl_rank.numel() - 1, 1)).round(decimals=6).abs()  # [B]
    order = torch.sort(-distance, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    keep = torch.zeros_like(candidate)
    keep[order[:k]] = True
    leans_q2 = (code == MISCONCEPTION) | (~candidate & (ppl_rank > ent_rank))
    return SampleTriage(
        keep=keep,
        prune_tokens=keep & leans_q2,
        quadrant=code,
        alpha=hi,
        topped_up=int((keep & ~candidate).sum()),
    )


def neighbour_smoothed_ppl(token_ppl: torch.Tensor, valid: torch.Tensor, lam: float) -> torch.Tensor:
    """`s_i = (1 - lam) * PPL_i + lam * mean(PPL_{i-1}, PPL_{i+1})`, `[B, T-1]` in and out (0 off the response).

    Neighbours count only when they are response tokens themselves (adjacent positions of the same
    assistant turn): with one neighbour its value is the mean; with none (a one-token turn) `s_i = PPL_i`.
    """
    ppl = token_ppl.double().masked_fill(~valid, 0.0)  # [B, T-1]
    zero, no = ppl[:, :1] * 0, valid[:, :1] & False  # [B, 1]
    prev, prev_ok = torch.cat([zero, ppl[:, :-1]], 1), torch.cat([no, valid[:, :-1]], 1)  # [B, T-1]
    nxt, next_ok = torch.cat([ppl[:, 1:], zero], 1), torch.cat([valid[:, 1:], no], 1)
    count = prev_ok.double() + next_ok.double()  # [B, T-1]
    neighbour = (prev * prev_ok + nxt * next_ok) / count.clamp(min=1)
    neighbour = torch.where(count == 0, ppl, neighbour)
    return ((1 - lam) * ppl + lam * neighbour).masked_fill(~valid, 0.0)


def prune_tokens(
    token_losses: torch.Tensor, valid: torch.Tensor, prune_rows: torch.Tensor, ratio: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-mask `[B, T-1]` and token scores: rows in `prune_rows` `[B]` keep their `ceil(ratio * n)`
    LOWEST-score tokens, the other rows keep every response token. Scores from `exp(CE)` of `token_losses`."""
    # Clamped so exp() stays finite in the float32 ranking; a loss of 80 nats is far past any real token.
    score = neighbour_smoothed_ppl(
        token_losses.detach().double().clamp(max=80.0).exp(), valid, lam
    )  # [B, T-1]
    lowest = top_k_per_sequence(-score, valid, ratio)  # [B, T-1]
    return torch.where(prune_rows[:, None], lowest, valid), score
