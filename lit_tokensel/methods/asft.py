"""ASFT, anchored supervised fine-tuning (arXiv 2509.23753): DFT plus a KL anchor to the base model."""

from __future__ import annotations

import torch

from lit_tokensel.methods.base import Batch, LossTerm, Selection, TokenSelectionModule
from lit_tokensel.reference import (
    AdapterDisabledReference,
    FrozenModelReference,
    ReferenceModel,
    reference_from_config,
)
from lit_tokensel.selection.weighting import DEFAULT_CHUNK, ResponseLogits, dft_weights, kl_to_reference


class ASFTSFT(TokenSelectionModule):
    """Per-token loss `sg(p_t) * CE_t + alpha * KL(p_ref || p_theta)`, both over the response tokens and
    averaged over their count, as in the authors' code (zhuchichi56/ASFT `train_v2.py`, mode `asft`) and
    LLaMA-Factory's `use_asft_loss`.

    `p_ref` is the frozen base model's next-token distribution at the same position: with `lora:` the
    trained model with its adapter switched off (no second copy, `AdapterDisabledReference`), otherwise a
    second frozen copy of `model` (`FrozenModelReference`). Unlike the authors' code, the reference runs in
    eval mode (no dropout). The KL runs over the whole vocabulary in chunks of `chunk_size` response
    positions, from the reference's last hidden state, so no second `[B, T, V]` tensor is built; its
    backward recomputes each chunk. The KL is a named term (`train/kl` is its mean) normalised over the
    same tokens as the DFT term, so gradient accumulation costs nothing extra.

    Args:
        alpha: Weight of the KL anchor (0.1, the authors' `kl_weight` and LLaMA-Factory's `asft_alpha`).
        reference: Where `p_ref` comes from; default the base model as above.
        chunk_size: Response positions per vocabulary chunk of the KL.
        **kwargs: Model, optimizer and schedule settings of `TokenSelectionModule`.
    """

    needs_logits = True

    def __init__(
        self,
        alpha: float = 0.1,
        reference: ReferenceModel | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(alpha, bool) or not float(alpha) >= 0:
            raise ValueError(f"alpha={alpha!r} must be >= 0")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        if reference is None:
            reference = (
                AdapterDisabledReference()
                if self.lora is not None
                else FrozenModelReference(
                    model=self.model_name_or_path,
                    gguf_file=self.gguf_file,
                    dtype=self.weights_dtype,
                    attn_implementation=self.attn_implementation,
                )
            )
        self.reference = reference_from_config(reference)  # a dict when loaded from a checkpoint
        self.hparams["reference"] = self.reference.config()  # plain data, never the loaded model
        self.alpha, self.chunk_size = float(alpha), chunk_size

    def reference_models(self) -> list[ReferenceModel]:
        return [self.reference]

    def select_tokens(
        self,
        batch: Batch,
        token_losses: torch.Tensor,
        valid: torch.Tensor,
        logits: ResponseLogits | None = None,
    ) -> Selection:
        if logits is None:
            raise ValueError("ASFTSFT.select_tokens needs the training forward's logits (needs_logits)")
        hidden, weight, bias = self.reference.hidden_and_head(self, batch)  # [B, T, H], [V, H], [V]
        kl = kl_to_reference(logits, hidden, weight, bias, self.chunk_size)  # [B, T-1], with the graph
        anchor = LossTerm(mask=valid, losses=kl, coefficient=self.alpha, shares_main_count=True)
        probability = dft_weights(token_losses)  # [B, T-1]
        return Selection(
            keep=valid,
            weights=probability,
            scores={"probability": probability, "kl": kl.detach()},
            terms={"kl": anchor},
        )
