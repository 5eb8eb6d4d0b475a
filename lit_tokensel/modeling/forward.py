"""Model inputs for padded and packed batches, and per-token losses that project only the response positions."""

from __future__ import annotations

from typing import Any

import torch

from lit_tokensel.selection.segments import packed_rows
from lit_tokensel.selection.token_loss import per_token_cross_entropy_chunked


def uses_varlen_attention(model: torch.nn.Module) -> bool:
    """True for FlashAttention models: packed rows go to them as one `[1, R*T]` row (varlen kernel)."""
    config = getattr(model, "config", None)
    return "flash" in str(getattr(config, "_attn_implementation", "") or "")


def model_inputs(
    model: torch.nn.Module, batch: dict[str, Any], flatten: bool | None = None
) -> dict[str, torch.Tensor]:
    """Keyword inputs of `model` for `batch`.

    Padded: `input_ids` and `attention_mask`, no KV cache. Packed (`position_ids` present): `input_ids` and
    `position_ids`, no `attention_mask` and no KV cache, which makes transformers build a block-diagonal causal mask
    from the restarting positions (SDPA, eager, flex). FlashAttention's varlen path only reads packing
    from a single row, so with `flatten` (default: `uses_varlen_attention(model)`) the rows go as one
    `[1, R*T]` row; `unflatten` restores `[R, T, ...]` outputs.
    """
    if (
        "position_ids" not in batch
    ):  # no KV cache: nothing here generates, and building one costs time and memory
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "use_cache": False,
        }
    flatten = uses_varlen_attention(model) if flatten is None else flatten
    ids, positions = batch["input_ids"], batch["position_ids"]  # [R, T] each
    if flatten:
        ids, positions = ids.reshape(1, -1), positions.reshape(1, -1)  # [1, R*T]
    # use_cache=False: transformers only reads packing from position_ids when there is no KV cache
    return {"input_ids": ids, "position_ids": positions, "use_cache": False}


def unflatten(output: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """`[1, R*T, ...]` -> `[R, T, ...]` after a flattened packed forward; other outputs unchanged."""
    rows, columns = batch["input_ids"].shape
    if output.shape[0] == rows and output.shape[1] == columns:
        return output
    return output.reshape(rows, columns, *output.shape[2:])


def response_token_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses and response mask, `[B, T-1]`, without materializing `[B, T, V]` logits.

    Runs the decoder for the last hidden state and sends only response positions through the output
    projection and cross-entropy (chunked `linear_cross_entropy`). With large vocabularies the
    projection dominates the forward, so skipping prompt positions saves both time and memory.
    Works for plain and peft-wrapped HF causal LMs, padded and packed batches and sample views.
    """
    hidden, head = decoder_hidden_and_head(model, batch)  # [B, T, H], the output projection
    return per_token_cross_entropy_chunked(hidden, head.weight, batch["labels"], head.bias)


def decoder_hidden_and_head(
    model: torch.nn.Module, batch: dict[str, Any]
) -> tuple[torch.Tensor, torch.nn.Module]:
    """The decoder's last hidden state `[B, T, H]` and the output projection, for plain and peft models.

    Callers project only the positions they need instead of taking the model's `[B, T, V]` logits. For
    a sample view of a packed batch (`lit_tokensel.selection.segments.sample_view`) the decoder runs on
    the packed rows and the hidden states are gathered into the view's `[N, L, H]` frame.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    rows = packed_rows(batch)
    source = rows.batch if rows is not None else batch
    hidden = causal_lm.get_decoder()(**model_inputs(causal_lm, source)).last_hidden_state  # [B, T, H]
    hidden = unflatten(hidden, source)
    if rows is not None:
        hidden = rows.layout.to_samples(hidden)  # [N, L, H]
    return hidden, causal_lm.get_output_embeddings()
