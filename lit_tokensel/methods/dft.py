"""DFT, Dynamic Fine-Tuning (arXiv 2508.05629): each response token's CE weighted by its own probability."""

from __future__ import annotations

import torch

from lit_tokensel.methods.base import Batch, Selection, TokenSelectionModule
from lit_tokensel.selection.weighting import dft_weights


class DFTSFT(TokenSelectionModule):
    """Per-token loss `sg(p_t) * CE_t`, `p_t = exp(-CE_t)` the model's probability of the target token
    from the training forward itself, detached; the mean runs over the response tokens, as for full SFT.

    This is TRL's `loss_type="dft"` and LLaMA-Factory's `use_dft_loss`: the weight costs one `exp` of
    the losses already computed, no pass over the vocabulary, so it works with `chunked_loss` too.
    The weight is also the method's score (`probability`), logged and written by `inspect`.

    Args:
        **kwargs: Model, optimizer and schedule settings of `TokenSelectionModule`.
    """

    def select_tokens(self, batch: Batch, token_losses: torch.Tensor, valid: torch.Tensor) -> Selection:
        probability = dft_weights(token_losses)  # [B, T-1]
        return Selection(keep=valid, weights=probability, scores={"probability": probability})
