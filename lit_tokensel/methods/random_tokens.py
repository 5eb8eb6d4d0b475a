"""Random token selection: the control for every scored method (same keep ratio, no signal)."""

from __future__ import annotations

import torch

from lit_tokensel.methods.base import Batch, Selection, TokenSelectionModule
from lit_tokensel.selection.selectors import check_ratio, top_k_per_sequence


class RandomTokenSFT(TokenSelectionModule):
    """Keep a uniformly random `ceil(ratio * n_response)` tokens of each sequence.

    The draw depends only on (seed, sample_id, position), so it is the same whatever the batch
    composition, shuffling or resume point, and differs between samples and epochs' batches alike.

    Args:
        ratio: Fraction of each sequence's response tokens kept.
        selection_seed: Seed of the random scores.
        **kwargs: Model, optimizer and schedule settings of `TokenSelectionModule`.
    """

    def __init__(self, ratio: float = 0.6, selection_seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ratio = check_ratio(ratio)
        self.selection_seed = selection_seed

    def select_tokens(self, batch: Batch, token_losses: torch.Tensor, valid: torch.Tensor) -> Selection:
        scores = uniform_scores(batch["sample_id"], valid.shape[1], self.selection_seed + self.current_epoch)
        return Selection(
            keep=top_k_per_sequence(scores.to(valid.device), valid, self.ratio), scores={"random": scores}
        )


def uniform_scores(sample_ids: torch.Tensor, width: int, seed: int) -> torch.Tensor:
    """`[B, width]` uniform scores in [0, 1), a pure function of (seed, sample id, position)."""
    rows = []
    for sample_id in sample_ids.tolist():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(sample_id))
        rows.append(torch.rand(width, generator=generator))
    return torch.stack(rows)  # [B, T-1]
