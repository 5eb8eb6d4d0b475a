"""Rho-1 selective language modeling (arXiv 2404.07965): train on the tokens with the largest excess loss."""

from __future__ import annotations

import torch

from lit_tokensel.methods.base import Batch, Selection, TokenSelectionModule
from lit_tokensel.reference import ReferenceModel, reference_from_config
from lit_tokensel.selection.selectors import check_ratio, check_scope, select_top


class Rho1SFT(TokenSelectionModule):
    """Keep the top `ratio` of tokens by excess loss `L_theta - L_ref`.

    `L_theta` is the trained model's live loss (detached); `L_ref` comes from a frozen reference
    model, live (`FrozenModelReference`) or from a scoring pass's cache (`CachedReference`). Large
    excess loss = the reference, trained on clean data, already predicts the token and the current
    model does not yet: learnable and not learned. The paper ranks within the batch (default);
    `scope: sequence` is the per-sequence variant SFT papers often use.

    Args:
        reference: Where `L_ref` comes from.
        ratio: Fraction of response tokens kept (0.6 for 1B models in the paper, 0.7 for 7B).
        scope: `batch` (the paper) or `sequence`.
        **kwargs: Model, optimizer and schedule settings of `TokenSelectionModule`.
    """

    def __init__(self, reference: ReferenceModel, ratio: float = 0.6, scope: str = "batch", **kwargs) -> None:
        super().__init__(**kwargs)
        if check_scope(scope) == "global":
            raise ValueError("Rho1SFT ranks live losses: scope must be 'batch' or 'sequence'")
        self.reference = reference_from_config(reference)  # a dict when loaded from a checkpoint
        self.hparams["reference"] = self.reference.config()  # plain data, never the loaded model
        self.ratio = check_ratio(ratio)
        self.scope = scope

    def reference_models(self) -> list[ReferenceModel]:
        return [self.reference]

    def select_tokens(self, batch: Batch, token_losses: torch.Tensor, valid: torch.Tensor) -> Selection:
        reference_losses = self.reference.token_losses(self, batch)  # [B, T-1]
        excess = token_losses.detach() - reference_losses  # [B, T-1]
        keep = select_top(excess, valid, self.ratio, self.scope)
        return Selection(keep=keep, scores={"excess_loss": excess, "reference_loss": reference_losses})
