"""The contract between a method and the shared training step: what `select_tokens` returns.

`Selection` (which tokens enter the objective, signed weights, scores, extra `LossTerm`s), the
`SelectedBatch` the step works on, and the settings under which a separately normalised term cannot be
accumulated exactly. `lit_tokensel.methods.base` re-exports every name, and explains the objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

Batch = dict[str, torch.Tensor]
# Per-window sums behind the loss normalization and the logged step metrics.
WINDOW_KEYS = ("loss_sum", "kept", "normalizer", "response", "tokens")
# The collated `[B, T-1]` per-token weights taken from the data (`lit_tokensel.data.weights`).
DATA_WEIGHTS_KEY = "token_weights"


@dataclass
class LossTerm:
    """A named extra term `coefficient * sum(weights * losses over mask) / N`, N its own token count.

    N is `mask`'s count over the whole accumulation window and all ranks (see the module docstring).

    Attributes:
        mask: `[B, T-1]` bool, the term's tokens (what its mean runs over).
        weights: Optional `[B, T-1]` per-token factors (default 1); a 0 leaves a token in the count
            but out of the sum (e.g. Forgetting's capped negatives).
        losses: Optional `[B, T-1]` per-token values with the graph; None means the training CE.
        coefficient: The term's signed factor (Forgetting's ascent: `-lambda`).
        needs_main_tokens: The term contributes nothing in a window without main tokens
            (Forgetting scales its ascent to the positives).
        shares_main_count: The term is normalised by the main count instead of its own (its mask is
            the main tokens, e.g. ASFT's KL over the same response tokens): no extra accumulation cost.
    """

    mask: torch.Tensor
    weights: torch.Tensor | None = None
    losses: torch.Tensor | None = None
    coefficient: float = 1.0
    needs_main_tokens: bool = False
    shares_main_count: bool = False


@dataclass
class Selection:
    """A method's decision for a micro-batch: which tokens enter the objective, and how.

    The first score is the one ranked; its quantiles are logged as `select/score_q*`.

    Attributes:
        keep: `[B, T-1]` bool, the tokens that enter the objective (any term); the main term's tokens.
        scores: Named `[B, T-1]` signals behind the decision (logged, and written by `inspect`).
        weights: Optional `[B, T-1]` signed weights on the kept tokens' CE in the main term (default 1).
        normalizer: The main term's token count in this micro-batch (default: the kept count).
        terms: Named extra loss terms, each normalised over its own tokens of the window.
        diagnostics: Scalars logged as `select/<name>` (e.g. ssToken's mean loss gap).
    """

    keep: torch.Tensor
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: torch.Tensor | None = None
    normalizer: torch.Tensor | None = None
    terms: dict[str, LossTerm] = field(default_factory=dict)
    diagnostics: dict[str, torch.Tensor | float] = field(default_factory=dict)


@dataclass
class SelectedBatch:
    """What `select_batch` decided: the (possibly sample-pruned) batch, its losses and the selection."""

    batch: Batch  # for packed rows: the sample view (`lit_tokensel.selection.segments.sample_view`)
    samples: torch.Tensor | None  # [B] bool over the original batch, None when every sample stays
    token_losses: torch.Tensor  # [B', T-1], with the graph
    valid: torch.Tensor  # [B', T-1], response tokens the data does not weight 0
    selection: Selection
    data_weights: torch.Tensor | None = None  # [B', T-1] from the data, None when the data has none


@dataclass
class _TermSums:
    """One term of one micro-batch: its weighted sum (with the graph) and its token count."""

    loss_sum: torch.Tensor
    count: torch.Tensor


def check_accumulation_support(
    strategy: Any, device_mesh: Any, precision_plugin: Any, method: str = "A method with its own loss terms"
) -> None:
    """Refuse the settings under which a separately normalised term cannot be accumulated exactly.

    With `accumulate_grad_batches > 1` such a term's gradient is taken per micro-batch with
    `torch.autograd.grad` with respect to the trainable parameters and added to their `.grad` at the step.
    That needs whole (unsharded) parameters, and a gradient that fp16 loss scaling does not have to check.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if device_mesh is not None or isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        name = "FSDP2 (ModelParallelStrategy)" if device_mesh is not None else type(strategy).__name__
        raise ValueError(
            f"{method} with trainer.accumulate_grad_batches > 1 is not supported under {name}: its "
            "separately normalised loss term is accumulated on whole parameters, which FSDP shards. Set "
            "`trainer.accumulate_grad_batches: 1` (raise data.batch_size or the number of devices instead), "
            "or train with DDP."
        )
    if getattr(precision_plugin, "scaler", None) is not None:
        raise ValueError(
            f"{method} with trainer.accumulate_grad_batches > 1 does not support fp16 loss scaling "
            "(precision 16-mixed): the scaler would not check the separately accumulated gradient "
            "for overflow. Use precision bf16-mixed or 32-true, or `trainer.accumulate_grad_batches: 1`."
        )
