"""ProFit (arXiv 2601.09195): train only on the tokens the model already gives some probability."""

from __future__ import annotations

import torch

from lit_tokensel.methods.base import Batch, Selection, TokenSelectionModule


class ProFitSFT(TokenSelectionModule):
    """Keep response token i when its detached probability `P_theta(x_i) = exp(-CE_i)` is above `tau`.

    The probability comes free from the training forward's own per-token losses: no softmax over
    the vocabulary, no extra pass. Tokens the model finds very unlikely (often label noise, or
    phrasings it will not adopt) are left out; the threshold is absolute, so the kept fraction changes
    as training goes on (logged as `select/kept_fraction`).

    Args:
        tau: Probability threshold in [0, 1) (0.1 in the paper).
        **kwargs: Model, optimizer and schedule settings of `TokenSelectionModule`.
    """

    def __init__(self, tau: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(tau, bool) or not 0.0 <= float(tau) < 1.0:
            raise ValueError(f"tau={tau!r} must be a probability in [0, 1)")
        self.tau = float(tau)

    def select_tokens(self, batch: Batch, token_losses: torch.Tensor, valid: torch.Tensor) -> Selection:
        probability = torch.exp(-token_losses.detach().float())  # [B, T-1]
        keep = (probability > self.tau) & valid  # [B, T-1]
        return Selection(keep=keep, scores={"probability": probability})
