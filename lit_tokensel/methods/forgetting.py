"""Forgetting (arXiv 2508.04329): learn the positive tokens, push the model away from the negative ones.

Influence `L_theta0 - L_ref` per response token (the TokenCleaning score), from two cached scoring
passes joined into batches by `sample_id`. One threshold over the whole training set, computed once
when fit starts (`prepare_selection`), splits the tokens: the top `rho` are positive, the rest negative.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_tokensel.methods.base import Batch, Selection, TokenSelectionModule
from lit_tokensel.methods.token_cleaning import dataset_scores
from lit_tokensel.reference import CachedReference
from lit_tokensel.selection.forgetting import forgetting_weights, lambda_schedule, partition_tokens
from lit_tokensel.selection.selectors import check_ratio, global_threshold


class ForgettingSFT(TokenSelectionModule):
    """Loss `mean CE(positive) - lambda(step) * mean CE(negative)`, each mean over its own tokens.

    `lambda` ramps linearly from 0 to `lambda_max` over training: `lambda_max * global_step /
    total_steps`, with `total_steps = trainer.estimated_stepping_batches` (optimizer steps, so it
    accounts for epochs and gradient accumulation). `global_step` is restored from a checkpoint, so a
    resumed run follows the same schedule as an uninterrupted one.

    Normalization with the shared step: every response token is kept, with weight 1 on positives and
    `-lambda * N_pos / N_neg` on negatives, where `N_pos` and `N_neg` are the micro-batch's counts
    summed over all ranks; each rank adds its own positive count to the window's divisor (the base
    sums the divisor over ranks, so it is `N_pos` again, not `world_size * N_pos`). So with
    `accumulate_grad_batches=1` the update is exactly that of `mean CE(pos) - lambda * mean CE(neg)`
    over the global batch, on any number of ranks. With accumulation the positive mean is over the
    whole window, and the negative mean is the average of the micro-batch negative means weighted by
    their positive counts. A micro-batch with no negative token is plain SFT on its positives; one
    with no positive token contributes nothing (the ascent is scaled to the positive count).

    The ascent term is unbounded, as in the paper: a negative token's loss can be pushed up without
    limit. `negative_loss_cap` bounds it: a negative token whose loss is above the cap gets weight 0,
    the gradient of `clamp(CE, max=cap)`. Once past the cap it stops contributing gradient (and
    leaves the logged loss), so the ascent cannot run away on it.

    Args:
        base_cache: Name under `data.cached_losses` of the base model's (theta_0) losses.
        reference_cache: Name under `data.cached_losses` of the reference model's losses.
        rho: Fraction of the dataset's response tokens that are positive (0.7 in the paper).
        lambda_max: Final weight of the ascent term (0.25 in the paper).
        negative_loss_cap: Bound on a negative token's loss in nats; None (default) for the paper's
            unbounded ascent.
        **kwargs: Model, optimizer and schedule settings of `TokenSelectionModule`.
    """

    def __init__(
        self, base_cache: str = "base", reference_cache: str = "reference", rho: float = 0.7,
        lambda_max: float = 0.25, negative_loss_cap: float | None = None, **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if lambda_max < 0:
            raise ValueError(f"lambda_max={lambda_max} must be >= 0")
        if negative_loss_cap is not None and negative_loss_cap <= 0:
            raise ValueError(f"negative_loss_cap={negative_loss_cap} must be > 0 (nats) or None")
        self.base = CachedReference(base_cache)
        self.reference = CachedReference(reference_cache)
        self.rho = check_ratio(rho, "rho")
        self.lambda_max = float(lambda_max)
        self.negative_loss_cap = negative_loss_cap
        self.threshold: float | None = None
        self.total_steps: int | None = None

    def prepare_selection(self, datamodule) -> None:
        """The dataset-wide threshold: one pass over the two caches (at fit start, and for `inspect`)."""
        scores = dataset_scores(datamodule, self.base.name, self.reference.name, "ForgettingSFT")  # [N]
        self.threshold = global_threshold(scores, self.rho)
        rank_zero_info(
            f"ForgettingSFT: threshold {self.threshold:.4f} makes the top {self.rho:.0%} of {scores.numel()} "
            "response tokens positive"
        )

    def on_fit_start(self) -> None:
        super().on_fit_start()  # prepare_selection
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("ForgettingSFT ramps lambda over training: set trainer.max_steps or max_epochs")
        self.total_steps = int(total)
        rank_zero_info(f"ForgettingSFT: lambda ramps from 0 to {self.lambda_max} over {self.total_steps} steps")

    def current_lambda(self) -> float:
        """The ascent weight of the optimizer step being accumulated. Outside fit (`inspect`, no Trainer)
        there is no step, and the weights show the final `lambda_max`."""
        if self._trainer is None or self.total_steps is None:
            return self.lambda_max
        return lambda_schedule(self.lambda_max, self.trainer.global_step, self.total_steps)

    def select_tokens(self, batch: Batch, token_losses: torch.Tensor, valid: torch.Tensor) -> Selection:
        if self.threshold is None:
            raise RuntimeError("ForgettingSFT.select_tokens before prepare_selection computed the threshold")
        score = self.base.token_losses(self, batch) - self.reference.token_losses(self, batch)  # [B, T-1]
        positive, negative = partition_tokens(score, valid, self.threshold)  # [B, T-1] each
        counts = torch.stack([positive.sum(), negative.sum()]).float()  # [2]
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        n_pos, n_neg = counts.tolist()
        lam = self.current_lambda()
        weights = forgetting_weights(positive, negative, lam, n_pos, n_neg, token_losses, self.negative_loss_cap)
        losses = token_losses.detach()
        n_response = max(int(valid.sum()), 1)
        diagnostics = {"lambda": lam, "positive_fraction": float(positive.sum()) / n_response,
                       "negative_fraction": float(negative.sum()) / n_response}
        if positive.any():
            diagnostics["loss_positive"] = float(losses[positive].mean())
        if negative.any():
            diagnostics["loss_negative"] = float(losses[negative].mean())
        if self.negative_loss_cap is not None:
            diagnostics["negative_capped"] = float((negative & (losses > self.negative_loss_cap)).sum())
        return Selection(keep=positive | negative, scores={"influence": score}, weights=weights,
                         normalizer=positive.sum(), diagnostics=diagnostics)
