"""Forgetting (arXiv 2508.04329): learn the positive tokens, push the model away from the negative ones.

Influence `L_theta0 - L_ref` per response token (the TokenCleaning score), from two cached scoring
passes joined into batches by `sample_id`. One threshold over the whole training set, computed once
when fit starts (`prepare_selection`), splits the tokens: the top `rho` are positive, the rest negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_tokensel.methods.base import Batch, Selection, TokenSelectionModule
from lit_tokensel.methods.token_cleaning import dataset_scores
from lit_tokensel.reference import CachedReference
from lit_tokensel.selection.forgetting import forgetting_weights, lambda_schedule, partition_tokens
from lit_tokensel.selection.selectors import check_ratio, global_threshold
from lit_tokensel.selection.token_loss import masked_sum


def check_accumulation_support(strategy: Any, device_mesh: Any, precision_plugin: Any) -> None:
    """Refuse the settings under which ForgettingSFT cannot accumulate its ascent gradient exactly.

    With `accumulate_grad_batches > 1` the gradient of the negative term is taken per micro-batch with
    `torch.autograd.grad` with respect to the trainable parameters and added to their `.grad` at the step.
    That needs whole (unsharded) parameters, and a gradient that fp16 loss scaling does not have to check.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if device_mesh is not None or isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        name = "FSDP2 (ModelParallelStrategy)" if device_mesh is not None else type(strategy).__name__
        raise ValueError(
            f"ForgettingSFT with trainer.accumulate_grad_batches > 1 is not supported under {name}: its "
            "ascent gradient is accumulated on whole parameters, which FSDP shards. Set "
            "`trainer.accumulate_grad_batches: 1` (raise data.batch_size or the number of devices instead), "
            "or train with DDP."
        )
    if getattr(precision_plugin, "scaler", None) is not None:
        raise ValueError(
            "ForgettingSFT with trainer.accumulate_grad_batches > 1 does not support fp16 loss scaling "
            "(precision 16-mixed): the scaler would not check the separately accumulated ascent gradient "
            "for overflow. Use precision bf16-mixed or 32-true, or `trainer.accumulate_grad_batches: 1`."
        )


@dataclass
class _AscentWindow:
    """This rank's negative term over the micro-batches of one accumulation window so far."""

    lam: float
    loss_sum: torch.Tensor  # scalar: sum of the negative tokens' CE (over-cap tokens excluded)
    count: torch.Tensor  # scalar: the negative tokens (over-cap tokens included: the mean runs over them)


class ForgettingSFT(TokenSelectionModule):
    """Loss `mean CE(positive) - lambda(step) * mean CE(negative)`, each mean over its own tokens of the whole
    global batch: every micro-batch of the accumulation window, every rank.

    `lambda` ramps linearly from 0 to `lambda_max` over training: `lambda_max * global_step /
    total_steps`, with `total_steps = trainer.estimated_stepping_batches` (optimizer steps, so it
    accounts for epochs and gradient accumulation). `global_step` is restored from a checkpoint, so a
    resumed run follows the same schedule as an uninterrupted one.

    Without gradient accumulation the loss goes through the shared step's normalization at no extra
    cost: every response token is kept, with weight 1 on positives and `-lambda * N_pos / N_neg` on
    negatives, where `N_pos` and `N_neg` are the micro-batch's counts summed over all ranks (one
    all-reduce of two counts); each rank adds its own positive count to the window's divisor (the base
    sums the divisor over ranks, so it is `N_pos` again, not `world_size * N_pos`).

    With `accumulate_grad_batches > 1` the window's `N_neg` is not known until its last micro-batch, so
    the two terms are accumulated apart, and the update is still exactly that of the loss over the whole
    window. Each micro-batch's loss (backpropagated by Lightning) is the sum of the positives' CE, and the
    window's divisor is its positive count, as for any method. The negative term's gradient,
    `d sum CE(negative) / d theta`, is taken per micro-batch with `torch.autograd.grad` (the graph is
    retained for the main backward) and added into a flat buffer over the trainable parameters. At the
    optimizer step, after the base's rescaling, the buffer is summed over ranks (one all-reduce under
    DDP) and `lambda / N_neg` times it is subtracted from the gradients, `N_neg` being the window's count
    over all ranks. Cost, only while accumulating with lambda > 0 (so never in the first step): one
    extra backward pass per micro-batch (skipped for a micro-batch without negative tokens), one buffer
    the size of the trainable parameters kept for the run plus a transient copy while `autograd.grad`
    returns, and that buffer's all-reduce once per optimizer step. Sharded parameters (FSDP, FSDP2,
    DeepSpeed) and fp16 loss scaling are refused with accumulation (`check_accumulation_support`).

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
        # With gradient accumulation: the current micro-batch's negative term (set by select_tokens, used by
        # training_step), the window's totals, and the gradient buffer (parameters, their views, the flat buffer).
        self._pending_ascent: tuple[float, torch.Tensor, torch.Tensor, bool] | None = None
        self._ascent_window: _AscentWindow | None = None
        self._ascent_grad: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None

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
        if self.trainer.accumulate_grad_batches > 1:
            check_accumulation_support(self.trainer.strategy, self.device_mesh, self.trainer.precision_plugin)
        self._pending_ascent, self._ascent_window, self._ascent_grad = None, None, None

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
        if self._accumulating():
            # The window's negative count is not known yet: the positives go through the shared step, the
            # negative term is accumulated apart (training_step, on_before_optimizer_step).
            weights = positive.float()  # [B, T-1]
            if lam > 0:
                ascended = negative
                if self.negative_loss_cap is not None:  # the gradient of clamp(CE, max=cap), as forgetting_weights
                    ascended = negative & ~(token_losses.detach() > self.negative_loss_cap)
                self._pending_ascent = (lam, masked_sum(token_losses, ascended), negative.sum(), bool(ascended.any()))
        else:
            counts = torch.stack([positive.sum(), negative.sum()]).float()  # [2]
            if self._trainer is not None and self.trainer.world_size > 1:
                counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
            n_pos, n_neg = counts.tolist()
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

    # ------------------------------------------------------------------ exact means under gradient accumulation
    def _accumulating(self) -> bool:
        """Whether this training micro-batch is part of a multi-micro-batch accumulation window."""
        if self._trainer is None or not self.trainer.training or self.trainer.accumulate_grad_batches == 1:
            return False
        check_accumulation_support(self.trainer.strategy, self.device_mesh, self.trainer.precision_plugin)
        return True

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self._pending_ascent = None
        loss = super().training_step(batch, batch_idx)  # the positives' CE sum when accumulating
        if self._pending_ascent is not None:
            lam, negative_sum, negative_count, has_gradient = self._pending_ascent
            self._pending_ascent = None
            window = self._ascent_window
            if window is None:
                zero = torch.zeros((), device=negative_sum.device)
                window = self._ascent_window = _AscentWindow(lam, zero.clone(), zero.clone())
            window.loss_sum += negative_sum.detach()
            window.count += negative_count
            if has_gradient:
                params, views, _ = self._ascent_buffer()
                # Local gradient (not DDP-synchronized: autograd.grad does not fire DDP's hooks); the
                # graph stays for Lightning's backward of `loss`.
                grads = torch.autograd.grad(negative_sum, params, retain_graph=True, allow_unused=True)
                for view, grad in zip(views, grads, strict=True):
                    if grad is not None:
                        view.add_(grad)
        return loss

    def _ascent_buffer(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """The trainable parameters, and views shaped like them into one flat gradient buffer (zeros)."""
        if self._ascent_grad is None:
            params = [p for p in self.parameters() if p.requires_grad]
            dtypes = {p.dtype for p in params}
            dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
            sizes = [p.numel() for p in params]
            flat = torch.zeros(sum(sizes), dtype=dtype, device=params[0].device)
            views = [v.view_as(p) for v, p in zip(torch.split(flat, sizes), params, strict=True)]
            self._ascent_grad = (params, views, flat)
        return self._ascent_grad

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        window, self._ascent_window = self._ascent_window, None
        if window is None:  # no accumulation, or lambda 0
            super().on_before_optimizer_step(optimizer)
            return
        # The window's negative loss and count, and its positive count, over all ranks.
        totals = torch.stack([window.loss_sum, window.count.float(), self._window["normalizer"].float()])
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        negative_loss, n_neg, n_pos = totals.tolist()
        coefficient = window.lam / n_neg if n_neg > 0 and n_pos > 0 else 0.0
        if coefficient and self.global_rank == 0:
            # The base logs sum(loss_sum over ranks) / N_pos: subtract lambda * mean CE(neg) once.
            self._window["loss_sum"] = self._window["loss_sum"] - coefficient * negative_loss * n_pos
        super().on_before_optimizer_step(optimizer)  # scales the positives' gradient to their window mean
        if coefficient:
            params, views, flat = self._ascent_buffer()
            if self.trainer.world_size > 1:
                torch.distributed.all_reduce(flat)  # sum over ranks
            for param, view in zip(params, views, strict=True):
                if param.grad is not None:
                    param.grad.add_(view, alpha=-coefficient)
        if self._ascent_grad is not None:
            self._ascent_grad[2].zero_()

    def on_train_end(self) -> None:
        self._pending_ascent, self._ascent_window, self._ascent_grad = None, None, None
