"""TokenCleaning, fixed-model variant (arXiv 2502.01968): keep the tokens a reference model learned.

Score = `L_theta0 - L_ref`, the loss drop from the base model to a reference fine-tuned on a small
high-quality set: large = informative. Both losses come from scoring passes (`lit-tokensel score`)
joined into batches by the DataModule, so training costs what full SFT costs. The paper ranks all
response tokens of the whole training set (`scope: global`), computed once when fit starts.
The self-evolving variant (reference = the model of the previous round, one data chunk per round)
is `SelfEvolvingTokenCleaningSFT` in `lit_tokensel.methods.self_evolving`; `lit-tokensel recipe
token-cleaning` runs either variant end to end, reference model and scoring passes included.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_tokensel.choices import check_choices
from lit_tokensel.distributed.topk import SelectionGroup, resolve_process_group
from lit_tokensel.methods.base import Batch, Selection, TokenSelectionModule
from lit_tokensel.reference import CachedReference
from lit_tokensel.selection.influence import dataset_scores
from lit_tokensel.selection.selectors import Scope, check_ratio, global_threshold, select_top


class TokenCleaningSFT(TokenSelectionModule):
    """Keep the top `ratio` of response tokens by `L_base - L_reference`, both from cached passes.

    Args:
        base_cache: Name under `data.cached_losses` of the base model's (theta_0) losses.
        reference_cache: Name under `data.cached_losses` of the reference model's losses.
        ratio: Fraction of response tokens kept (0.6 in the paper).
        scope: `global` (the paper: one threshold over the whole training set), `batch` or `sequence`.
        selection_group: What `batch` scope spans under data parallelism: `global` (all ranks'
            micro-batches, as one process would see them) or `rank`.
        **kwargs: Model, optimizer and schedule settings of `TokenSelectionModule`.
    """

    def __init__(
        self,
        base_cache: str = "base",
        reference_cache: str = "reference",
        ratio: float = 0.6,
        scope: Scope = "global",
        selection_group: SelectionGroup = "global",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_choices(TokenCleaningSFT.__init__, locals())
        self.base = CachedReference(base_cache)
        self.reference = CachedReference(reference_cache)
        self.ratio = check_ratio(ratio)
        self.scope = scope
        self.selection_group = selection_group
        self.threshold: float | None = None

    def prepare_selection(self, datamodule) -> None:
        if self.scope == "global":
            scores = dataset_scores(datamodule, self.base.name, self.reference.name)
            self.threshold = global_threshold(scores, self.ratio)
            rank_zero_info(
                f"TokenCleaningSFT: global threshold {self.threshold:.4f} keeps the top {self.ratio:.0%} "
                f"of {scores.numel()} response tokens"
            )

    def select_tokens(self, batch: Batch, token_losses: torch.Tensor, valid: torch.Tensor) -> Selection:
        score = self.base.token_losses(self, batch) - self.reference.token_losses(self, batch)  # [B, T-1]
        group = resolve_process_group(self.selection_group) if self.scope == "batch" else None
        keep = select_top(score, valid, self.ratio, self.scope, self.threshold, group=group)
        return Selection(keep=keep, scores={"influence": score})
