"""ssToken's semantic score: one layer's attention mass on the prompt, captured during an ordinary forward.

ssToken (arXiv 2510.18250) scores a response token by how much its position attends to the prompt in one
deep layer, averaged over query heads:

    attn(i) = mean_h sum_{j in prompt(i)} softmax(q_i k_j * scaling + mask)_j,   in [0, 1].

Asking the model for attention probabilities (`output_attentions=True`) needs the eager attention in every
layer and returns `[B, H, T, T]` per layer. Instead, `PromptAttentionScore` puts a forward pre-hook on the
chosen layer's attention module: the model keeps running SDPA everywhere, and the hook recomputes q and k
of that one layer from the module's own inputs (`hidden_states`, RoPE `position_embeddings`) with the
module's own `q_proj`/`k_proj` (so a LoRA adapter on them counts), under `torch.no_grad()` and in float32.
Only response query rows are scored, a chunk of rows of one sample at a time, and the prompt mass is
`exp(logsumexp(prompt keys) - logsumexp(all allowed keys))`, so no probability matrix is formed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

IGNORE_INDEX = -100

SUPPORTED_ATTENTION: dict[type[torch.nn.Module], str] = {
    LlamaAttention: "Llama",
    Qwen2Attention: "Qwen2",
    MistralAttention: "Mistral",
}
"""Attention classes whose forward this module reproduces (q/k projections, RoPE, GQA, scaling, window)."""


def prompt_key_mask(
    labels: torch.Tensor, attention_mask: torch.Tensor | None = None, exclude_sink: bool = False
) -> torch.Tensor:
    """Keys that count as prompt, `[B, T]` bool: non-padding positions whose label is -100.

    Definition: for a query at response position p, the prompt keys are every non-response, non-padding
    token before the first response token of p's turn. Responses are contiguous spans of labels != -100,
    so together with causality (keys k <= p) this is exactly `{k < p : attention_mask[k] == 1 and
    labels[k] == -100}`: in a multi-turn sample a query in turn 2 counts the system/user tokens of
    turn 1 and the user message of turn 2, never the turn-1 response. (Counting the -100 labels and
    taking that many leading keys, as the released ssToken code does, is only right for a single turn
    with right padding.) The caller combines this key mask with the causal mask.

    Args:
        labels: `[B, T]`, -100 on prompt and padding.
        attention_mask: `[B, T]`, 1 on tokens and 0 on padding (left or right); `None` means no padding.
        exclude_sink: Leave out each sequence's first non-pad token (the attention sink), whose large
            attention mass says little about the prompt's content.
    """
    keep = labels == IGNORE_INDEX  # [B, T]
    if attention_mask is not None:
        keep &= attention_mask.bool()
    if exclude_sink:
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(keep)  # [B, T]
        first = real.int().argmax(dim=1)  # [B] first non-pad position
        keep[torch.arange(labels.shape[0], device=labels.device), first] = False
    return keep


class PromptAttentionScore:
    """Captures one layer's attention mass on the prompt during a model's ordinary forward.

    Usage::

        scorer = PromptAttentionScore(model, layer=-1)
        with scorer.capture(batch):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        scores = scorer.scores  # [B, T-1] float32

    Alignment: like every per-token tensor in this library, `scores` is `[B, T-1]` aligned with
    `labels[:, 1:]` (entry j is about predicting token j+1). ssToken scores token x_i with the attention
    row of position i itself, so entry j holds the row of position j+1. Entries where `labels[:, 1:]` is
    -100 or padding are 0. The scores are detached and carry no autograd graph.

    The mask is built here from the batch's 2-D `attention_mask` (causal + padding, left or right
    padding, plus the sliding window where the layer uses one), never taken from the model, whose
    cached mask is `None` for unpadded batches.

    Packed rows (a batch with `sample_index`, `lit_tokensel.data.packing`): each sample is scored on its
    own span, so a query sees only its own sample's keys, and its prompt and sink are its own; the scores
    equal those of the sample run alone, in the rows' `[R, T-1]` frame.

    Works with the full model (`model(...)`) and the decoder alone (`model.get_decoder()(...)`), plain
    or peft-wrapped. One forward per `capture` block: gradient checkpointing calls the layer again in
    backward, and that recomputation is skipped, but a second forward inside the block (say, a
    reference model sharing these weights) is an error, since its scores would silently replace or
    be mistaken for the training forward's.
    `q_proj`/`k_proj` are evaluated in eval mode (no LoRA dropout): the score is deterministic and the
    random stream of training is untouched, so the model's outputs are identical with and without
    the capture. The score math runs in float32 with autocast off, whatever the model's dtype.

    Args:
        model: Llama, Qwen2 or Mistral causal LM or decoder, optionally wrapped by peft.
        layer: Index into the decoder layers; negative counts from the end (-1 = last, the default).
        exclude_sink: Leave each sequence's first non-pad token out of the prompt keys (it stays in the
            softmax normalizer). Off by default, as in the paper.
        max_block_elements: Upper bound on the elements of one `[H, rows, keys]` float32 score block;
            response rows are processed in chunks under it (default 2**24, i.e. 64 MiB).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layer: int = -1,
        exclude_sink: bool = False,
        max_block_elements: int = 1 << 24,
    ) -> None:
        self.layer = layer
        self.exclude_sink = exclude_sink
        self.max_block_elements = max_block_elements
        self.attention = _attention_module(model, layer)
        module = sys.modules[type(self.attention).__module__]
        self._apply_rope = module.apply_rotary_pos_emb  # the architecture's own RoPE
        self.sliding_window = _sliding_window(self.attention)
        self.scores: torch.Tensor | None = None
        self.calls = 0  # times the hook ran inside the current capture (> 1 under gradient checkpointing)
        self._batch: dict[str, torch.Tensor] | None = None

    @contextmanager
    def capture(self, batch: dict[str, torch.Tensor]) -> Iterator[PromptAttentionScore]:
        """Registers the hook for the duration of the block; after the forward, `self.scores` is `[B, T-1]`.

        `batch` needs `labels` `[B, T]` and optionally `attention_mask` `[B, T]` (else no padding); they
        must describe the sequences the forward runs on. `scores` stays `None` if the layer never ran.
        """
        if self._batch is not None:
            raise RuntimeError("PromptAttentionScore.capture is already active; captures do not nest")
        self._batch, self.scores, self.calls = batch, None, 0
        handle = self.attention.register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()
            self._batch = None

    # ------------------------------------------------------------------ hook
    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: score on the first call, leave the call's inputs untouched."""
        self.calls += 1
        if self.calls > 1:
            if (
                torch._C._current_graph_task_id() != -1
            ):  # inside backward: gradient checkpointing's recomputation
                return
            raise RuntimeError(
                "a second forward through the scored layer inside one PromptAttentionScore.capture block: "
                "capture exactly the forward to score (run other forwards, e.g. a reference's, outside it)"
            )
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, T, D]
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None:
            raise RuntimeError(f"{type(module).__name__} was called without position_embeddings (cos, sin)")
        assert self._batch is not None
        labels = self._batch["labels"]
        segments = self._batch.get("sample_index")  # [R, T] for packed rows, else None
        if segments is not None and hidden.shape[:2] == (1, labels.numel()):  # packed rows as one varlen row
            hidden = hidden.reshape(*labels.shape, -1)  # [R, T, D]
            position_embeddings = tuple(x.reshape(*labels.shape, -1) for x in position_embeddings)
        if labels.shape != hidden.shape[:2]:
            raise ValueError(
                f"batch labels {tuple(labels.shape)} do not match the layer input {tuple(hidden.shape[:2])}"
            )
        # float32 throughout, also inside an autocast region (mixed-precision training)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            self.scores = self._score(
                hidden, position_embeddings, labels, self._batch.get("attention_mask"), segments
            )

    def _score(
        self,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompt attention mass of every response row, `[B, T-1]` float32 (0 elsewhere).

        `segments` `[B, T]` (a packed batch's `sample_index`, -1 on padding) scores each sample of a row
        on its own span: its queries see only its keys, its prompt and attention sink are its own.
        """
        B, T = labels.shape
        device = hidden.device
        labels = labels.to(device)
        real = labels.new_ones(B, T, dtype=torch.bool)  # [B, T] non-padding
        if segments is not None:
            real = segments.to(device) >= 0
        elif attention_mask is not None:
            real = attention_mask.to(device).bool()
        prompt = prompt_key_mask(labels, real, self.exclude_sink and segments is None)  # [B, T]
        scored = (labels[:, 1:] != IGNORE_INDEX) & real[:, 1:]  # [B, T-1]  entry j <-> row j+1
        out = torch.zeros(B, T - 1, dtype=torch.float32, device=device)  # [B, T-1]
        projections = (self.attention.q_proj, self.attention.k_proj)
        modes = [proj.training for proj in projections]
        for proj in projections:
            proj.eval()  # no (LoRA) dropout: deterministic, and no draws from the training RNG
        try:
            for b, start, end in _spans(segments.to(device) if segments is not None else None, B, T):
                prompt_b = prompt[b, start:end].clone()  # [S]
                if segments is not None and self.exclude_sink:
                    prompt_b[0] = False  # the sample's own first token
                self._score_span(hidden, position_embeddings, b, start, end, scored, real, prompt_b, out)
        finally:
            for proj, mode in zip(projections, modes):
                proj.train(mode)
        return out

    def _score_span(
        self,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        b: int,
        start: int,
        end: int,
        scored: torch.Tensor,
        real: torch.Tensor,
        prompt: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        """Score the response rows of positions `[start, end)` of row `b` against keys of that span only;
        writes `out[b]`. `prompt` `[end - start]` marks the span's prompt keys."""
        attn = self.attention
        device = hidden.device
        rows = scored[b, start : end - 1].nonzero().squeeze(1) + start + 1  # [R] query positions
        if rows.numel() == 0:
            return
        n_heads = attn.config.num_attention_heads
        n_kv, d = attn.config.num_key_value_heads, attn.head_dim
        groups = n_heads // n_kv
        cos, sin = position_embeddings  # [1 or B, T, d]
        n_keys = int(rows.max()) + 1 - start  # keys after the last row are causally masked anyway
        key_pos = torch.arange(start, start + n_keys, device=device)  # [K]
        h = hidden[b : b + 1, start : start + n_keys]  # [1, K, D]
        pe = b if cos.shape[0] > 1 else 0  # position embeddings are per sample or shared
        cb, sb = cos[pe : pe + 1].float(), sin[pe : pe + 1].float()  # [1, T, d]
        k = attn.k_proj(h).view(1, n_keys, n_kv, d).transpose(1, 2).float()  # [1, Hkv, K, d]
        k = self._rope(k, cb[:, key_pos], sb[:, key_pos])[0]  # [Hkv, K, d]
        chunk = max(1, self.max_block_elements // (n_heads * n_keys))
        for rs in rows.split(chunk):
            q = attn.q_proj(hidden[b : b + 1, rs]).view(1, len(rs), n_heads, d).transpose(1, 2)
            q = self._rope(q.float(), cb[:, rs], sb[:, rs])[0]  # [H, R, d]
            q = q.view(n_kv, groups, len(rs), d)  # [Hkv, G, R, d]  head h uses kv head h // G
            logits = torch.matmul(q, k[:, None].transpose(-1, -2)) * attn.scaling  # [Hkv, G, R, K]
            allowed = key_pos[None, :] <= rs[:, None]  # [R, K] causal
            if self.sliding_window is not None:
                allowed &= key_pos[None, :] > rs[:, None] - self.sliding_window
            allowed &= real[b, None, start : start + n_keys]  # [R, K]
            total = logits.masked_fill_(~allowed, float("-inf")).logsumexp(-1)  # [Hkv, G, R]
            on_prompt = allowed & prompt[None, :n_keys]  # [R, K]
            mass = logits.masked_fill_(~on_prompt, float("-inf")).logsumexp(-1)  # [Hkv, G, R]
            out[b, rs - 1] = (mass - total).exp().mean(dim=(0, 1))  # [R]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on one tensor `[1, heads, n, d]` with the architecture's `apply_rotary_pos_emb` (q and k
        rotate alike; queries and keys here cover different positions, so they go in separate calls)."""
        return self._apply_rope(x, x, cos, sin)[0]


def _spans(segments: torch.Tensor | None, rows: int, columns: int) -> list[tuple[int, int, int]]:
    """`(row, start, end)` of every sample: whole rows for a padded batch, each run of one `segments`
    value >= 0 for packed rows."""
    if segments is None:
        return [(b, 0, columns) for b in range(rows)]
    spans = []
    for b in range(rows):
        values, counts = torch.unique_consecutive(segments[b], return_counts=True)
        start = 0
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            if value >= 0:
                spans.append((b, start, start + count))
            start += count
    return spans


def _attention_module(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The `self_attn` of decoder layer `layer`, checked to be a supported architecture."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # unwrap peft
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    layers = getattr(decoder, "layers", None)
    attention = getattr(layers[0], "self_attn", None) if isinstance(layers, torch.nn.ModuleList) else None
    if type(attention) not in SUPPORTED_ATTENTION:
        found = type(attention).__name__ if attention is not None else type(base).__name__
        raise ValueError(
            f"the prompt attention score supports {'/'.join(SUPPORTED_ATTENTION.values())} decoders "
            f"({', '.join(c.__name__ for c in SUPPORTED_ATTENTION)}); found {found}"
        )
    n = len(layers)
    if not -n <= layer < n:
        raise ValueError(
            f"layer={layer} is out of range for a model with {n} decoder layers (use {-n}..{n - 1})"
        )
    attention = layers[layer].self_attn
    if type(attention) not in SUPPORTED_ATTENTION:
        raise ValueError(f"layer {layer} has an unsupported attention module {type(attention).__name__}")
    return attention


def _sliding_window(attention: torch.nn.Module) -> int | None:
    """The layer's sliding window in tokens (key k is visible from query p iff p - window < k <= p)."""
    if isinstance(attention, Qwen2Attention):
        return attention.sliding_window  # None unless this layer's type is sliding_attention
    if isinstance(attention, MistralAttention):
        return getattr(attention.config, "sliding_window", None)
    return None
