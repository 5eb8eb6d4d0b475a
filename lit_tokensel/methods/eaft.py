"""EAFT, entropy-adaptive fine-tuning (arXiv 2601.02151): down-weight the tokens the model is sure about."""

from __future__ import annotations

import torch

from lit_tokensel.methods.base import Batch, Selection, TokenSelectionModule
from lit_tokensel.selection.weighting import DEFAULT_CHUNK, ResponseLogits, eaft_weights


class EAFTSFT(TokenSelectionModule):
    """Per-token loss `w_t * CE_t`, `w_t = (H_k / ln k) ** alpha`, detached, with `H_k` the entropy of the
    softmax over the `k` largest logits at that position (the top-k renormalised distribution).

    A confidently predicted token that the data contradicts (a "confident conflict") gets a small
    weight, which the paper finds limits forgetting. Defaults `k = 20`, `alpha = 1` are the paper's and
    the authors' code's (PRIS-CV/EAFT, merged into LLaMA-Factory as `use_eaft_loss`, `eaft_alpha=1.0`).

    Normalisation: we divide by `ln k` exactly, as the paper writes it and axolotl's `use_eaft` does.
    The authors' LLaMA-Factory and ms-swift code divides by the constant 3.0 (about `ln 20 = 2.9957`),
    which makes every weight 0.14% smaller for `alpha = 1`; the mean still runs over the token count.
    With `chunked_loss` the top-k comes from projecting the last hidden state chunk by chunk (no grad),
    so neither path builds a second `[B, T, V]` tensor.

    Args:
        k: Size of the top-k distribution (>= 2).
        alpha: Exponent of the normalised entropy (> 0).
        chunk_size: Response positions per projection chunk on the `chunked_loss` path.
        **kwargs: Model, optimizer and schedule settings of `TokenSelectionModule`.
    """

    needs_logits = True

    def __init__(self, k: int = 20, alpha: float = 1.0, chunk_size: int = DEFAULT_CHUNK, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"k={k!r} must be an integer >= 2")
        if not float(alpha) > 0:
            raise ValueError(f"alpha={alpha!r} must be > 0")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        self.k, self.alpha, self.chunk_size = k, float(alpha), chunk_size

    def select_tokens(
        self,
        batch: Batch,
        token_losses: torch.Tensor,
        valid: torch.Tensor,
        logits: ResponseLogits | None = None,
    ) -> Selection:
        if logits is None:
            raise ValueError("EAFTSFT.select_tokens needs the training forward's logits (needs_logits)")
        weights, entropy = eaft_weights(logits, self.k, self.alpha, self.chunk_size)  # [B, T-1] each
        return Selection(keep=valid, weights=weights, scores={"topk_entropy": entropy})
