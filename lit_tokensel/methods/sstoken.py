"""ssToken (arXiv 2510.18250): self-modulated token selection by history loss gap and attention to the prompt."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.functional import spearman_corrcoef

from lit_tokensel.choices import check_choices
from lit_tokensel.methods.base import Batch, Selection, TokenSelectionModule
from lit_tokensel.reference import HistoryReference, ReferenceModel, reference_from_config
from lit_tokensel.renamed_settings import refuse_renamed
from lit_tokensel.selection.scorers import Combine, RelForm, retrospective_excess, sstoken_scores
from lit_tokensel.selection.segments import to_sample_frame
from lit_tokensel.selection.selectors import check_ratio, top_k_per_sequence, turn_ends

if TYPE_CHECKING:
    from lit_tokensel.modeling.attention_score import PromptAttentionScore


class SsTokenSFT(TokenSelectionModule):
    """Keep, per sequence, the top `ceil(ratio * n_response)` tokens by `gamma * minmax(REL) + (1 - gamma) * attn`.

    - REL, the retrospective excess loss, is `L_his - L_theta` (keep the largest: tokens the current
      model improved on relative to its history; the opposite orientation of Rho-1). The history is
      an EMA of the trained weights (default, the paper's definition) or the frozen base theta_0:
      `AdapterDisabledReference` with LoRA, `FrozenModelReference` for full fine-tuning, or
      `CachedReference` for a scoring pass's losses (the released code's choice).
    - attn is the attention mass each response position puts on the prompt in one layer (default the
      last), averaged over query heads. Entry j of the `[B, T-1]` frame (predicting token j+1) takes
      the attention row of position j+1, the query at the scored token itself, as the paper and its
      code pair them. Computed for that layer only, under no grad; every layer keeps SDPA.
    - Warm-up: at step 0 the history equals the model, so REL is noise. For the first `warmup` of
      training only the attention score selects (with `gamma=1` there is no attention score, and the
      warm-up trains on every response token). The default, 20% of the first epoch's optimizer
      steps, is the released recipe's first 20% of its single epoch. An epoch is counted in optimizer
      steps as run: `ceil(batches / accumulate_grad_batches)`, cut short by `max_steps` when that ends
      training inside the first epoch; `max_steps` beyond the first epoch does not lengthen it.
    - `warmup_every_epoch`: the released code restarts its warm-up at the start of every epoch; this
      module warms up once unless the option is on. The paper's published runs train one epoch, where
      both behaviours are the same step for step, so its numbers cannot tell them apart and the paper
      preset leaves the option off; turn it on to mirror the released code over several epochs.

    Args:
        history: Where `L_his` comes from; default `HistoryReference(mode="ema", decay=0.99)`.
        ratio: Fraction of each sequence's (ranked) response tokens kept (the paper's rho: 0.6, 0.8 for large models).
        gamma: Weight of REL; `1` is REL only, `0` attention only.
        attention_layer: Decoder layer whose attention is scored (negative counts from the end), or
            `"middle"` for layer `num_hidden_layers // 2`.
        exclude_sink: Leave the sequence's first token out of the prompt mass. Off for parity with the
            paper; on trained models that attention sink takes most of each row's mass.
        warmup: Fraction of `warmup_unit` spent selecting by attention only.
        warmup_unit: `epoch` (fraction of the first epoch's optimizer steps) or `training` (of all).
        warmup_every_epoch: Repeat the warm-up at the start of every epoch, as the released code does
            (only with `warmup_unit="epoch"`).
        rel_form: The loss gap's form (`selection.scorers.retrospective_excess`): `difference` (the
            paper's), `relative` or `inverted`. The last two are variants of this project's search beyond
            ssToken (docs/beyond-sstoken.md), not the paper's method.
        combine: `minmax` (the paper's: min-max REL plus raw attention) or `rank` (per-sequence ranks of both).
        keep_end_of_turn: Always keep each turn's last response token (its end-of-turn token) and rank only
            the others (a search variant: the paper ranks every response token).
        **kwargs: Model, optimizer and schedule settings of `TokenSelectionModule`.
    """

    renamed_settings: ClassVar[dict[str, str]] = {"rho": "ratio"}

    def __init__(
        self,
        history: ReferenceModel | None = None,
        ratio: float = 0.6,
        gamma: float = 0.5,
        attention_layer: int | Literal["middle"] = -1,
        exclude_sink: bool = False,
        warmup: float = 0.2,
        warmup_unit: Literal["epoch", "training"] = "epoch",
        warmup_every_epoch: bool = False,
        rel_form: RelForm = "difference",
        combine: Combine = "minmax",
        keep_end_of_turn: bool = False,
        **kwargs: Any,
    ) -> None:
        refuse_renamed(type(self), kwargs)
        super().__init__(**kwargs)
        check_choices(SsTokenSFT.__init__, locals())
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma={gamma} must lie in [0, 1] (1: loss gap only, 0: attention only)")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup={warmup} must lie in [0, 1)")
        if warmup_every_epoch and warmup_unit != "epoch":
            raise ValueError(
                "--model.init_args.warmup_every_epoch true needs --model.init_args.warmup_unit epoch "
                "(a warm-up per epoch)"
            )
        self.history = reference_from_config(
            history if history is not None else HistoryReference("ema", 0.99)
        )
        self.hparams["history"] = self.history.config()  # plain data, never a loaded model
        self.ratio = check_ratio(ratio)
        self.gamma = float(gamma)
        if isinstance(attention_layer, str) and attention_layer != "middle":
            raise ValueError(f"attention_layer={attention_layer!r}: use a layer index or 'middle'")
        self.attention_layer, self.exclude_sink = attention_layer, exclude_sink
        self.rel_form, self.combine, self.keep_end_of_turn = rel_form, combine, keep_end_of_turn
        self.warmup, self.warmup_unit, self.warmup_every_epoch = warmup, warmup_unit, warmup_every_epoch
        self.warmup_steps = 0
        self.epoch_steps = 0  # optimizer steps per epoch, set at fit start
        self.attention: PromptAttentionScore | None = None

    # ------------------------------------------------------------------ setup
    def reference_models(self) -> list[ReferenceModel]:
        return [self.history] if self.gamma > 0.0 else []  # attention only: no history to keep

    def configure_model(self) -> None:
        super().configure_model()
        if self.gamma < 1.0 and self.attention is None:
            from lit_tokensel.modeling.attention_score import PromptAttentionScore

            layer = self.attention_layer
            if layer == "middle":
                layer = int(self.model.config.num_hidden_layers) // 2
            self.attention = PromptAttentionScore(self.model, layer=layer, exclude_sink=self.exclude_sink)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        trainer = self.trainer
        if trainer.train_dataloader is None:  # `max_epochs=-1` skips the loader in the estimate below
            trainer.fit_loop.setup_data()
        total = trainer.estimated_stepping_batches
        if math.isinf(total) and (self.warmup_unit == "training" or math.isinf(trainer.num_training_batches)):
            raise ValueError(
                "SsTokenSFT's warm-up needs a known training length: set --trainer.max_steps, or "
                "--trainer.max_epochs with a dataset of known length"
            )
        total = int(total)
        self.epoch_steps = optimizer_steps_per_epoch(
            trainer.num_training_batches, trainer.accumulate_grad_batches
        )
        self.warmup_steps = warmup_length(self.warmup, self.warmup_unit, total, self.epoch_steps)
        every = " of every epoch" if self.warmup_every_epoch else ""
        rank_zero_info(
            f"SsTokenSFT: attention-only warm-up for the first {self.warmup_steps} steps{every} "
            f"({total} optimizer steps in all, {self.epoch_steps} per epoch)"
        )

    def in_warmup(self) -> bool:
        """True while training is in the attention-only warm-up (never outside `fit`)."""
        if self._trainer is None or not self.trainer.training:
            return False
        step = self.trainer.global_step
        if self.warmup_every_epoch and self.epoch_steps > 0:
            step -= self.trainer.current_epoch * self.epoch_steps  # steps into the current epoch
        return step < self.warmup_steps

    # ------------------------------------------------------------------ selection
    def forward_context(self, batch: Batch) -> AbstractContextManager[Any]:
        return self.attention.capture(batch) if self.attention is not None else nullcontext()

    def select_tokens(self, batch: Batch, token_losses: torch.Tensor, valid: torch.Tensor) -> Selection:
        attention = self.attention.scores if self.attention is not None else None  # [B, T-1] or None
        attention = to_sample_frame(batch, attention)  # scored on packed rows: into the sample frame
        protected = turn_ends(valid) if self.keep_end_of_turn else torch.zeros_like(valid)  # [B, T-1]
        ranked = valid & ~protected  # [B, T-1]: the tokens the ratio applies to
        if self.in_warmup():
            if attention is None:  # gamma == 1: nothing to select by yet
                return Selection(keep=valid)
            keep = top_k_per_sequence(attention, ranked, self.ratio) | protected
            return Selection(keep=keep, scores={"attention": attention})
        losses = token_losses.detach().float()  # [B, T-1]
        scores: dict[str, torch.Tensor] = {}
        diagnostics: dict[str, torch.Tensor | float] = {}
        rel = None
        if self.gamma > 0.0:
            history_losses = self.history.token_losses(self, batch)  # [B, T-1]
            rel = retrospective_excess(history_losses, losses, self.rel_form)  # [B, T-1]
            scores.update(rel=rel, history_loss=history_losses)
            diagnostics = rel_diagnostics(rel, losses, valid)
        combined = sstoken_scores(rel, attention, ranked, self.gamma, self.combine)  # [B, T-1]
        if attention is not None:
            scores["attention"] = attention
        keep = top_k_per_sequence(combined, ranked, self.ratio) | protected
        combined = torch.where(
            protected, torch.full_like(combined, 2.0), combined
        )  # above every ranked score
        return Selection(keep=keep, scores={"sstoken": combined, **scores}, diagnostics=diagnostics)


def rel_diagnostics(rel: torch.Tensor, losses: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """REL's premise checks: its mean (positive once training has started) and its rank correlation
    with `-L_theta` (near 1 means REL only picks the tokens the model already finds easy)."""
    values, negative_losses = rel[valid], -losses[valid]  # [N]
    out = {"rel_mean": values.mean()} if values.numel() else {}
    if values.numel() > 1:
        out["rel_spearman_neg_loss"] = spearman_corrcoef(values, negative_losses)
    return out


def optimizer_steps_per_epoch(num_batches: float, accumulate: int) -> int:
    """Optimizer steps in one epoch of `num_batches` micro-batches: Lightning also steps on an
    epoch's last, incomplete accumulation window. 0 when the epoch length is unknown (`inf`)."""
    return 0 if math.isinf(num_batches) else math.ceil(int(num_batches) / accumulate)


def warmup_length(
    fraction: float, unit: Literal["epoch", "training"], total_steps: int, epoch_steps: int
) -> int:
    """Warm-up optimizer steps: `fraction` of all `total_steps` (`unit="training"`) or of the first
    epoch as it runs, `min(epoch_steps, total_steps)` (`unit="epoch"`; all training when the epoch
    length is unknown)."""
    span = total_steps if unit == "training" or epoch_steps == 0 else min(epoch_steps, total_steps)
    return math.ceil(round(fraction * span, 9))
