"""Token-weighting losses' math: DFT's probability, EAFT's top-k entropy, ASFT's KL to a reference.

Everything works on the response positions only, a chunk of positions at a time, from either the
trained model's `[B, T, V]` logits or its last hidden state and output projection (`chunked_loss`),
so no second `[B, T, V]` tensor is ever built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lit_tokensel.selection.segments import PackedLayout

DEFAULT_CHUNK = 1024
Span = tuple[int, int, int, int, int]
"""`(b, start, stop, source_row, source_start)`: positions `start:stop` of frame row `b`, which are
`source[source_row, source_start : source_start + stop - start]`."""


@dataclass
class ResponseLogits:
    """The logits at the response positions of a batch, projected a chunk of positions at a time.

    Either `source` is the `[B, T, V]` logits (positions gathered per chunk), or it is the last hidden
    state `[B, T, H]` and `weight` `[V, H]` (with `bias`) is the output projection applied per chunk.
    Positions are those of `valid` `[B, T-1]` in row-major order, in the shared `[B, T-1]` frame (the
    logits at position `j` predict token `j+1`).

    For a packed batch `valid` and every result are in the per-sample frame `[N, L-1]`, while `source` is
    the packed rows' `[R, T, V]` logits and `layout` says where each sample lies in them: each sample's
    positions are one slice of its row, so the rows' logits are read in place (no `[N, L, V]` copy).
    """

    source: torch.Tensor
    valid: torch.Tensor
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    layout: PackedLayout | None = None

    def __post_init__(self) -> None:
        if self.layout is not None and self.weight is not None:
            raise ValueError(
                "ResponseLogits: a packed layout goes with the rows' logits, not a hidden state "
                "(a hidden state is gathered into the per-sample frame first)"
            )

    def spans(self, chunk_size: int) -> list[Span]:
        """Chunks of at most `chunk_size` response positions of `valid`, each a slice of `source`."""
        spans = response_spans(self.valid, chunk_size)
        if self.layout is None:
            return [(b, start, stop, b, start) for b, start, stop in spans]
        rows, starts = self.layout.row.tolist(), self.layout.start.tolist()
        return [(b, start, stop, rows[b], starts[b] + start) for b, start, stop in spans]

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits `[n, V]` of `rows` (already logits, or hidden states to project)."""
        if self.weight is None:
            return rows.float()
        return F.linear(rows, self.weight, self.bias).float()

    def map_positions(
        self, fn: Callable[[torch.Tensor], torch.Tensor], chunk_size: int = DEFAULT_CHUNK
    ) -> torch.Tensor:
        """`fn(logits [n, V]) -> [n]` over the response positions, no grad, as a `[B, T-1]` frame (0 elsewhere).

        From `[B, T, V]` logits each row's span of response positions is a view (no copy of the logits);
        from a hidden state the response rows are gathered and projected `chunk_size` at a time.
        """
        frame = torch.zeros(self.valid.shape, dtype=torch.float32, device=self.valid.device)  # [B, T-1]
        with torch.no_grad():
            if self.weight is None:
                for b, start, stop, row, offset in self.spans(chunk_size):
                    frame[b, start:stop] = fn(
                        self.source[row, offset : offset + stop - start]
                    ).float()  # view [n, V]
                return frame * self.valid
            rows = self.source[:, :-1][self.valid]  # [N, H]
            values = torch.zeros(rows.shape[0], dtype=torch.float32, device=rows.device)  # [N]
            for start in range(0, rows.shape[0], chunk_size):
                values[start : start + chunk_size] = fn(
                    self.project(rows[start : start + chunk_size])
                ).float()
            return frame.masked_scatter(self.valid, values)


def scatter_rows(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`[N]` per-position values into the `[B, T-1]` frame (0 off `valid`)."""
    frame = torch.zeros(valid.shape, dtype=values.dtype, device=values.device)
    return frame.masked_scatter(valid, values)


def dft_weights(token_losses: torch.Tensor) -> torch.Tensor:
    """DFT's per-token weight `sg(p_t) = exp(-CE_t)`, detached, `[B, T-1]`."""
    return torch.exp(-token_losses.detach().float())


def topk_entropy(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy `[n]` of the softmax over each row's `k` largest logits (`logits` `[n, V]`), in nats."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1, sorted=False).values.float()  # [n, k]
    logp = torch.log_softmax(top, dim=-1)  # [n, k]
    return -(logp.exp() * logp).sum(dim=-1)


def eaft_weights(
    logits: ResponseLogits, k: int = 20, alpha: float = 1.0, chunk_size: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """EAFT's `w_t = (H_topk / ln k) ** alpha` and the normalised entropy, both `[B, T-1]`, detached."""
    normalised = logits.map_positions(lambda rows: topk_entropy(rows, k), chunk_size) / math.log(
        k
    )  # [B, T-1]
    return normalised.pow(alpha), normalised


def response_spans(valid: torch.Tensor, chunk_size: int) -> list[tuple[int, int, int]]:
    """`(row, start, stop)` chunks of at most `chunk_size` positions covering each row's response span.

    A span runs from a row's first to its last response position, so gaps (a multi-turn row's prompts)
    are inside it; callers mask them. Slices of a span are views of `[B, T, ...]` tensors: no gather copy.
    """
    spans = []
    for b in range(valid.shape[0]):
        positions = valid[b].nonzero().flatten()  # [n_b]
        if positions.numel():
            lo, hi = int(positions[0]), int(positions[-1]) + 1
            spans += [(b, start, min(start + chunk_size, hi)) for start in range(lo, hi, chunk_size)]
    return spans


class _LogitsKL(torch.autograd.Function):
    """Per-position `KL(p_ref || p_theta)` `[B, T-1]` from the trained model's logits `source` (`[B, T, V]`,
    or a packed batch's `[R, T, V]`), a chunk of positions at a time (`spans`), and the reference's hidden
    states `[B, T, H]` with its output projection.

    Each chunk's gradient `d KL / d z = softmax(z) - p_ref` is written in the forward, straight into the
    `[B, T, V]` gradient tensor that the backward returns (it scales it in place by the incoming per-position
    gradient): the reference's projection and both softmaxes run once, not again in the backward, and no
    other tensor of that size is built. The model's log-softmax is written into that gradient's chunk and
    turned into the softmax there, so a chunk costs two `[n, V]` temporaries (the reference's log-softmax
    and probabilities), each pass over them one fused kernel.
    """

    @staticmethod
    def forward(ctx, source, ref_hidden, ref_weight, ref_bias, valid, spans):  # noqa: D102
        grad_source = _zeros_outside(source, spans) if ctx.needs_input_grad[0] else None  # [B, T, V]
        out = torch.zeros(valid.shape, dtype=torch.float32, device=source.device)  # [B, T-1]
        for b, start, stop, row, offset in spans:
            z = source[row, offset : offset + stop - start]  # [n, V], a view
            ref_logp = torch.log_softmax(
                _logits(ref_hidden[b, start:stop], ref_weight, ref_bias), dim=-1
            )  # [n, V]
            chunk = (
                None if grad_source is None else grad_source[row, offset : offset + stop - start]
            )  # a view
            if chunk is not None and chunk.dtype == torch.float32 and z.dtype == torch.float32:
                logp = torch._log_softmax(z, -1, False, out=chunk)  # in the gradient's own memory
            else:
                logp = torch.log_softmax(z.float(), dim=-1)
            p_ref = ref_logp.exp()
            out[b, start:stop] = (
                ref_logp.sub_(logp).mul_(p_ref).sum(dim=-1)
            )  # sum_v p_ref (log p_ref - log p)
            if chunk is None:
                continue
            if logp is chunk:
                chunk.exp_().sub_(p_ref)  # softmax(z) - p_ref
            else:
                chunk.copy_(logp.exp_().sub_(p_ref))
        ctx.grad_source, ctx.spans = grad_source, spans
        ctx.save_for_backward(valid)
        return out * valid

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        (valid,) = ctx.saved_tensors
        if ctx.spans is None:
            raise RuntimeError(
                "the chunked KL's backward ran twice: its gradient buffer is used up after one "
                "backward (take the KL again, or use chunked_loss)"
            )
        grad_source = ctx.grad_source
        if grad_source is None:
            return None, None, None, None, None, None
        grad = (grad_out * valid).to(grad_source.dtype)  # [B, T-1]
        for b, start, stop, row, offset in ctx.spans:
            grad_source[row, offset : offset + stop - start].mul_(grad[b, start:stop, None])  # d KL / d z
        ctx.grad_source, ctx.spans = None, None
        return grad_source, None, None, None, None, None


def _zeros_outside(source: torch.Tensor, spans: list[Span]) -> torch.Tensor:
    """An uninitialised tensor like `source` `[B, T, V]`, zero except on the spans' positions (which the
    caller fills): a memset of the prompt positions only."""
    out = torch.empty_like(source)
    covered: dict[int, list[tuple[int, int]]] = {}
    for _, start, stop, row, offset in spans:
        covered.setdefault(row, []).append((offset, offset + stop - start))
    for row in range(source.shape[0]):
        column = 0
        for lo, hi in sorted(covered.get(row, [])):
            if lo > column:
                out[row, column:lo].zero_()
            column = max(column, hi)
        out[row, column:].zero_()
    return out


class _ChunkedKL(torch.autograd.Function):
    """Per-position `KL(p_ref || p_theta)` `[B, T-1]` from the trained model's last hidden state `source`
    `[B, T, H]` and output projection `weight` (`chunked_loss`), a chunk of positions at a time (`spans`),
    and the reference's hidden states `[B, T, H]`. The backward recomputes each chunk
    (`d KL / d z = softmax(z) - p_ref`): the projection's gradient sums over positions with the incoming
    per-position gradient, so it cannot be taken in the forward, and nothing of size `[N, V]` is kept."""

    @staticmethod
    def forward(ctx, source, weight, bias, ref_hidden, ref_weight, ref_bias, valid, spans):  # noqa: D102
        ctx.save_for_backward(source, weight, bias, ref_hidden, ref_weight, ref_bias, valid)
        ctx.spans = spans
        out = torch.zeros(valid.shape, dtype=torch.float32, device=source.device)  # [B, T-1]
        for b, start, stop, row, offset in spans:
            logp = torch.log_softmax(
                _logits(source[row, offset : offset + stop - start], weight, bias), dim=-1
            )
            ref_logp = torch.log_softmax(_logits(ref_hidden[b, start:stop], ref_weight, ref_bias), dim=-1)
            out[b, start:stop] = (ref_logp.exp() * ref_logp.sub_(logp)).sum(dim=-1)  # [n]
        return out * valid

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        source, weight, bias, ref_hidden, ref_weight, ref_bias, valid = ctx.saved_tensors
        grad = grad_out * valid  # [B, T-1]
        grad_source = torch.zeros_like(source) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        for b, start, stop, row, offset in ctx.spans:
            rows = source[row, offset : offset + stop - start]  # [n, H], a view
            grad_logits = torch.softmax(_logits(rows, weight, bias), dim=-1)  # [n, V]
            grad_logits.sub_(torch.softmax(_logits(ref_hidden[b, start:stop], ref_weight, ref_bias), dim=-1))
            grad_logits = grad_logits.mul_(grad[b, start:stop, None]).to(weight.dtype)  # d KL / d z
            if grad_source is not None:
                grad_source[row, offset : offset + stop - start] = grad_logits @ weight  # [n, H]
            if grad_weight is not None:
                grad_weight += grad_logits.T @ rows  # [V, H]
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        return grad_source, grad_weight, grad_bias, None, None, None, None, None


def _logits(rows: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    return (rows if weight is None else F.linear(rows, weight, bias)).float()


def kl_to_reference(
    logits: ResponseLogits,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    ref_bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """`KL(p_ref || p_theta)` per response position, `[B, T-1]` (0 off the response), with the graph.

    `ref_hidden` `[B, T, H]` is the reference's last hidden state (no grad), in `logits.valid`'s frame (the
    per-sample frame for a packed batch), and `ref_weight`/`ref_bias` its output projection. Gradients
    reach the trained model's logits (or hidden state and projection).
    """
    spans = logits.spans(chunk_size)
    ref_bias = None if ref_bias is None else ref_bias.detach()
    if logits.weight is None:
        return _LogitsKL.apply(
            logits.source, ref_hidden.detach(), ref_weight.detach(), ref_bias, logits.valid, spans
        )
    return _ChunkedKL.apply(
        logits.source,
        logits.weight,
        logits.bias,
        ref_hidden.detach(),
        ref_weight.detach(),
        ref_bias,
        logits.valid,
        spans,
    )
