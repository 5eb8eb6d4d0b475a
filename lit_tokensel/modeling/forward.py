"""Per-token losses of a causal LM that project only the response positions onto the vocabulary."""

from __future__ import annotations

import torch

from lit_tokensel.selection.token_loss import per_token_cross_entropy_chunked


def response_token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses and response mask, `[B, T-1]`, without materializing `[B, T, V]` logits.

    Runs the decoder for the last hidden state and sends only response positions through the output
    projection and cross-entropy (chunked `linear_cross_entropy`). With large vocabularies the
    projection dominates the forward, so skipping prompt positions saves both time and memory.
    Works for plain and peft-wrapped HF causal LMs.
    """
    hidden, head = decoder_hidden_and_head(model, batch)  # [B, T, H], the output projection
    return per_token_cross_entropy_chunked(hidden, head.weight, batch["labels"], head.bias)


def decoder_hidden_and_head(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.nn.Module]:
    """The decoder's last hidden state `[B, T, H]` and the output projection, for plain and peft models.

    Callers project only the positions they need instead of taking the model's `[B, T, V]` logits.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state  # [B, T, H]
    return hidden, causal_lm.get_output_embeddings()
