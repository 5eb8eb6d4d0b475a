"""Q-Tuning (arXiv 2509.23873): drop whole samples by their place on the error-uncertainty plane, then
prune tokens inside the kept misconception samples."""

from __future__ import annotations

from typing import ClassVar

import torch

from lit_tokensel.methods.base import Batch, Selection, TokenSelectionModule
from lit_tokensel.modeling.forward import decoder_hidden_and_head
from lit_tokensel.reference.base import eval_mode
from lit_tokensel.renamed_settings import refuse_renamed
from lit_tokensel.selection.entropy import response_nll_and_entropy
from lit_tokensel.selection.qtuning import prune_tokens, sample_perplexity_entropy, triage_samples
from lit_tokensel.selection.selectors import check_ratio


class QTuningSFT(TokenSelectionModule):
    """Two-stage pruning: keep the batch's Q2 (high PPL, low entropy) and Q4 (low PPL, high entropy)
    samples, then train only the `ratio` lowest-score tokens of the Q2 ones.

    Stage 1 (`select_samples`): a no-grad forward of the current model, in eval mode (no dropout), gives
    each sample's perplexity `exp(mean NLL)` and mean full-vocabulary entropy over its response tokens;
    the entropy is computed from the last hidden state in chunks of `entropy_chunk_size` response
    positions, never as a second `[B, T, V]` tensor. `lit_tokensel.selection.qtuning` assigns quadrants
    with the bisected threshold and keeps exactly `ceil(sample_ratio * B)` samples (topping up or
    trimming by `|PPL_rank - Ent_rank|`, see there). The base then drops the other samples before the
    training forward, so they cost no forward or backward work: that is the method's speedup.

    Stage 2 (`select_tokens`): in kept Q2 samples, token score `s_i = (1 - lam) * PPL_i + lam *
    mean(PPL_{i-1}, PPL_{i+1})` with `PPL_i = exp(CE_i)` from the training forward (detached) and
    neighbours inside the response; keep the `ceil(ratio * n)` tokens with the LOWEST score (the
    paper's text and ablations; its algorithm box says "top"). Q4 samples keep every token.

    Args:
        sample_ratio: Fraction of each batch's samples trained on (`r_sample`, 0.25 in the paper).
        ratio: Fraction of a Q2 sample's response tokens kept (the paper's `r_token`, 0.5).
        neighbor_weight: `lam`, the weight of the neighbours' perplexity in the token score (0.5).
        entropy_chunk_size: Response positions projected onto the vocabulary at once when scoring.
        **kwargs: Model, optimizer and schedule settings of `TokenSelectionModule`.
    """

    renamed_settings: ClassVar[dict[str, str]] = {"token_ratio": "ratio"}

    def __init__(
        self,
        sample_ratio: float = 0.25,
        ratio: float = 0.5,
        neighbor_weight: float = 0.5,
        entropy_chunk_size: int = 1024,
        **kwargs,
    ) -> None:
        refuse_renamed(type(self), kwargs)
        super().__init__(**kwargs)
        if not 0.0 <= neighbor_weight <= 1.0:
            raise ValueError(f"neighbor_weight={neighbor_weight} must lie in [0, 1]")
        if entropy_chunk_size < 1:
            raise ValueError(f"entropy_chunk_size={entropy_chunk_size} must be >= 1")
        self.sample_ratio = check_ratio(sample_ratio, "sample_ratio")
        self.ratio = check_ratio(ratio)
        self.neighbor_weight = float(neighbor_weight)
        self.entropy_chunk_size = entropy_chunk_size
        # Stage 1's decision for the micro-batch in flight, aligned with the rows the base keeps.
        self._prune_rows: torch.Tensor | None = None
        self._sample_diagnostics: dict[str, float] = {}

    @torch.no_grad()
    def sample_statistics(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample perplexity and mean entropy over response tokens, `[B]` each, from the current model."""
        with eval_mode(self.model):
            hidden, head = decoder_hidden_and_head(self.model, batch)  # [B, T, H], output projection
            nll, entropy, valid = response_nll_and_entropy(
                hidden, head.weight, batch["labels"], head.bias, self.entropy_chunk_size
            )  # [B, T-1] each
        return sample_perplexity_entropy(nll, entropy, valid)

    def select_samples(self, batch: Batch) -> torch.Tensor:
        ppl, entropy = (x.cpu() for x in self.sample_statistics(batch))  # [B] each; one device sync
        triage = triage_samples(ppl, entropy, self.sample_ratio)
        self._prune_rows = triage.prune_tokens[triage.keep].to(self.device)  # [B_kept]
        kept, n = triage.keep, triage.keep.numel()
        self._sample_diagnostics = {
            "alpha": triage.alpha,
            "sample_kept_fraction": float(kept.sum()) / n,
            "sample_q2_fraction": float(triage.prune_tokens.sum()) / n,
            "sample_topped_up": float(triage.topped_up),
            "sample_log_ppl_kept": float(ppl[kept].log().mean()),
            "sample_entropy_kept": float(entropy[kept].mean()),
        }
        if not kept.all():
            self._sample_diagnostics["sample_log_ppl_dropped"] = float(ppl[~kept].log().mean())
            self._sample_diagnostics["sample_entropy_dropped"] = float(entropy[~kept].mean())
        return kept.to(self.device)

    def select_tokens(self, batch: Batch, token_losses: torch.Tensor, valid: torch.Tensor) -> Selection:
        prune_rows = self._prune_rows
        if prune_rows is None or prune_rows.shape[0] != valid.shape[0]:
            raise RuntimeError("QTuningSFT.select_tokens needs select_samples' decision for this micro-batch")
        self._prune_rows = None  # one use: the decision belongs to this micro-batch only
        keep, score = prune_tokens(token_losses, valid, prune_rows, self.ratio, self.neighbor_weight)
        return Selection(
            keep=keep, scores={"smoothed_ppl": score.float()}, diagnostics=self._sample_diagnostics
        )
