"""Forgetting (arXiv 2508.04329): learn the positive tokens, push the model away from the negative ones.

Influence `L_theta0 - L_ref` per response token (the TokenCleaning score), from two cached scoring
passes joined into batches by `sample_id`. One threshold over the whole training set, computed once
when fit starts (`prepare_selection`), splits the tokens: the top `ratio` are positive, the rest negative.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_tokensel.methods.base import (  # noqa: F401 - check_accumulation_support: the public name stays here
    Batch,
    LossTerm,
    Selection,
    TokenSelectionModule,
    check_accumulation_support,
)
from lit_tokensel.reference import CachedReference
from lit_tokensel.renamed_settings import refuse_renamed
from lit_tokensel.selection.forgetting import lambda_schedule, partition_tokens
from lit_tokensel.selection.influence import dataset_scores
from lit_tokensel.selection.selectors import check_ratio, global_threshold


class ForgettingSFT(TokenSelectionModule):
    """Loss `mean CE(positive) - lambda(step) * mean CE(negative)`, each mean over its own tokens of the whole
    global batch: every micro-batch of the accumulation window, every rank.

    `lambda` ramps linearly from 0 to `lambda_max` over training: `lambda_max * global_step /
    total_steps`, with `total_steps = trainer.estimated_stepping_batches` (optimizer steps, so it
    accounts for epochs and gradient accumulation). `global_step` is restored from a checkpoint, so a
    resumed run follows the same schedule as an uninterrupted one.

    On the shared signed-weight contract (`lit_tokensel.methods.base`): the positives are the main term
    (weight 1, normalised by their count), the negatives a `LossTerm` named `ascent` with coefficient
    `-lambda`, normalised by its own count and gated on the window having positives. The base makes both
    means exact over the whole window and all ranks: without accumulation at no extra cost (one
    all-reduce of two counts), with `accumulate_grad_batches > 1` at the cost of one extra backward per
    micro-batch and one gradient buffer the size of the trainable parameters (only while lambda > 0, so
    never in the first step). Sharded parameters (FSDP, FSDP2, DeepSpeed) and fp16 loss scaling are
    refused with accumulation (`check_accumulation_support`).

    In both cases the logged `train/loss` is the objective's value over the window, `mean CE(pos) -
    lambda * mean CE(neg)`. A window without negative tokens is plain SFT on its positives; one without
    positive tokens contributes nothing (the ascent is scaled to the positive count: no update, logged
    loss 0). With accumulation, a micro-batch without positives (or negatives) still adds its other tokens
    to the window's means.

    The ascent term is unbounded, as in the paper: a negative token's loss can be pushed up without
    limit. `negative_loss_cap` bounds it: a negative token whose loss is above the cap gets weight 0,
    the gradient of `clamp(CE, max=cap)`. Once past the cap it stops contributing gradient (and
    leaves the logged loss, though it still counts in `N_neg`), so the ascent cannot run away on it.

    Args:
        base_cache: Name under `data.cached_losses` of the base model's (theta_0) losses.
        reference_cache: Name under `data.cached_losses` of the reference model's losses.
        ratio: Fraction of the dataset's response tokens that are positive (the paper's rho, 0.7).
        lambda_max: Final weight of the ascent term (0.25 in the paper).
        negative_loss_cap: Bound on a negative token's loss in nats; None (default) for the paper's
            unbounded ascent.
        **kwargs: Model, optimizer and schedule settings of `TokenSelectionModule`.
    """

    renamed_settings: ClassVar[dict[str, str]] = {"rho": "ratio"}

    def __init__(
        self,
        base_cache: str = "base",
        reference_cache: str = "reference",
        ratio: float = 0.7,
        lambda_max: float = 0.25,
        negative_loss_cap: float | None = None,
        **kwargs,
    ) -> None:
        refuse_renamed(type(self), kwargs)
        super().__init__(**kwargs)
        if lambda_max < 0:
            raise ValueError(f"lambda_max={lambda_max} must be >= 0")
        if negative_loss_cap is not None and negative_loss_cap <= 0:
            raise ValueError(f"negative_loss_cap={negative_loss_cap} must be > 0 (nats) or None")
        self.base = CachedReference(base_cache)
        self.reference = CachedReference(reference_cache)
        self.ratio = check_ratio(ratio)
        self.lambda_max = float(lambda_max)
        self.negative_loss_cap = negative_loss_cap
        self.threshold: float | None = None
        self.total_steps: int | None = None

    def prepare_selection(self, datamodule) -> None:
        """The dataset-wide threshold: one pass over the two caches (at fit start, and for `inspect`)."""
        scores = dataset_scores(datamodule, self.base.name, self.reference.name, "ForgettingSFT")  # [N]
        self.threshold = global_threshold(scores, self.ratio)
        rank_zero_info(
            f"ForgettingSFT: threshold {self.threshold:.4f} makes the top {self.ratio:.0%} of {scores.numel()} "
            "response tokens positive"
        )

    def on_fit_start(self) -> None:
        super().on_fit_start()  # prepare_selection
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("ForgettingSFT ramps lambda over training: set trainer.max_steps or max_epochs")
        self.total_steps = int(total)
        rank_zero_info(
            f"ForgettingSFT: lambda ramps from 0 to {self.lambda_max} over {self.total_steps} steps"
        )
        if self.trainer.accumulate_grad_batches > 1:
            check_accumulation_support(
                self.trainer.strategy, self.device_mesh, self.trainer.precision_plugin, "ForgettingSFT"
            )

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
        lam = self.current_lambda()
        ascended = None  # the gradient of clamp(CE, max=cap): an over-cap negative counts, with weight 0
        if self.negative_loss_cap is not None:
            ascended = (~(token_losses.detach() > self.negative_loss_cap)).float()  # [B, T-1]
        ascent = LossTerm(mask=negative, weights=ascended, coefficient=-lam, needs_main_tokens=True)
        losses = token_losses.detach()
        n_response = max(int(valid.sum()), 1)
        diagnostics = {
            "lambda": lam,
            "positive_fraction": float(positive.sum()) / n_response,
            "negative_fraction": float(negative.sum()) / n_response,
        }
        if positive.any():
            diagnostics["loss_positive"] = float(losses[positive].mean())
        if negative.any():
            diagnostics["loss_negative"] = float(losses[negative].mean())
        if self.negative_loss_cap is not None:
            diagnostics["negative_capped"] = float((negative & (losses > self.negative_loss_cap)).sum())
        return Selection(
            keep=positive | negative,
            scores={"influence": score},
            weights=positive.float(),
            normalizer=positive.sum(),
            terms={"ascent": ascent},
            diagnostics=diagnostics,
        )
