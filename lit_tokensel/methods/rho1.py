"""Rho-1 selective language modeling (arXiv 2404.07965): train on the tokens with the largest excess loss."""

from __future__ import annotations

from typing import Literal

import torch

from lit_tokensel.choices import check_choices
from lit_tokensel.distributed.topk import SelectionGroup, resolve_process_group
from lit_tokensel.methods.base import Batch, Selection, TokenSelectionModule
from lit_tokensel.reference import ReferenceModel, reference_from_config
from lit_tokensel.selection.selectors import check_ratio, select_top


class Rho1SFT(TokenSelectionModule):
    """Keep the top `ratio` of tokens by excess loss `L_theta - L_ref`.

    `L_theta` is the trained model's live loss (detached); `L_ref` comes from a frozen reference
    model, live (`FrozenModelReference`) or from a scoring pass's cache (`CachedReference`). Large
    excess loss = the reference, trained on clean data, already predicts the token and the current
    model does not yet: learnable and not learned. The paper ranks within the batch (default);
    `scope: sequence` is the per-sequence variant SFT papers often use. With several processes the
    batch is the global batch of all ranks (`selection_group: global`), so the selection is the one a
    single process would make on that batch; `rank` ranks each rank's micro-batch on its own.

    Args:
        reference: Where `L_ref` comes from.
        ratio: Fraction of response tokens kept (0.6 for 1B models in the paper, 0.7 for 7B).
        scope: `batch` (the paper) or `sequence` (`global` does not exist here: live losses change every step).
        selection_group: What `batch` spans under data parallelism: `global` (every rank's micro-batch,
            one all-gather of the scores per step) or `rank` (this rank's micro-batch only).
        **kwargs: Model, optimizer and schedule settings of `TokenSelectionModule`.
    """

    def __init__(
        self,
        reference: ReferenceModel,
        ratio: float = 0.6,
        scope: Literal["batch", "sequence"] = "batch",
        selection_group: SelectionGroup = "global",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_choices(Rho1SFT.__init__, locals())
        self.reference = reference_from_config(reference)  # a dict when loaded from a checkpoint
        self.hparams["reference"] = self.reference.config()  # plain data, never the loaded model
        self.ratio = check_ratio(ratio)
        self.scope = scope
        self.selection_group = selection_group

    def reference_models(self) -> list[ReferenceModel]:
        return [self.reference]

    def select_tokens(self, batch: Batch, token_losses: torch.Tensor, valid: torch.Tensor) -> Selection:
        reference_losses = self.reference.token_losses(self, batch)  # [B, T-1]
        excess = token_losses.detach() - reference_losses  # [B, T-1]
        group = resolve_process_group(self.selection_group) if self.scope == "batch" else None
        keep = select_top(excess, valid, self.ratio, self.scope, group=group)
        return Selection(keep=keep, scores={"excess_loss": excess, "reference_loss": reference_losses})
