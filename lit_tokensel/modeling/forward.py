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
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state  # [B, T, H]
    head = causal_lm.get_output_embeddings()
    return per_token_cross_entropy_chunked(hidden, head.weight, batch["labels"], head.bias)
