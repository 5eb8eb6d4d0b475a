"""The reference interface: "per-token loss of another model on this batch", in the `[B, T-1]` frame.

A provider is a plain object, not an `nn.Module`: the LightningModule holds it as an attribute, so
its weights stay out of `parameters()`, the optimizer and the checkpoint's `state_dict`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from lit_tokensel.modeling.forward import decoder_hidden_and_head, response_token_losses
from lit_tokensel.selection.finite import check_finite
from lit_tokensel.trusted_classes import resolve_trusted_class

if TYPE_CHECKING:
    from lit_tokensel.methods.base import TokenSelectionModule

Batch = dict[str, torch.Tensor]
# A model's last hidden state [B, T, H] and its output projection's weight [V, H] and bias [V] (or None).
HiddenAndHead = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class ReferenceModel(ABC):
    """Source of another model's per-token losses for a batch.

    Lifecycle: the method calls `setup(module)` once at the end of `configure_model`, then
    `token_losses(module, batch)` from its training step; `callbacks()` lists the Lightning
    callbacks the provider needs (a method returns them from `configure_callbacks`).
    """

    shadows_parameters: bool = False
    """True when the provider keeps its own copy of each trainable parameter, tensor for tensor (the
    EMA history): such a copy only matches per-parameter shards (FSDP2), never FSDP1's flat ones."""

    def setup(self, module: TokenSelectionModule) -> None:  # noqa: B027 - optional hook
        """Load weights or allocate state once `module.model` exists. Must be idempotent."""

    @abstractmethod
    def token_losses(self, module: TokenSelectionModule, batch: Batch) -> torch.Tensor:
        """Per-token losses `[B, T-1]`, float32, no grad, 0 where `labels[:, 1:] == -100`."""

    def hidden_and_head(self, module: TokenSelectionModule, batch: Batch) -> HiddenAndHead:
        """The reference's last hidden state `[B, T, H]` (no grad) and output projection, for terms that need
        its whole next-token distribution (ASFT's KL) without its `[B, T, V]` logits."""
        raise NotImplementedError(
            f"{type(self).__name__} gives per-token losses only; a term over the whole distribution (ASFT's KL) "
            "needs a live model: FrozenModelReference, or AdapterDisabledReference under LoRA."
        )

    def callbacks(self) -> list[L.Callback]:
        """Callbacks this provider needs in the Trainer (none by default)."""
        return []

    def describe(self, module: TokenSelectionModule | None = None) -> str:
        """Which reference this is, for error messages: `FrozenModelReference(model='...')`."""
        args = ", ".join(f"{k}={v!r}" for k, v in getattr(self, "_init_args", {}).items() if v is not None)
        return f"{type(self).__name__}({args})"

    def checked(self, module: TokenSelectionModule, batch: Batch, losses: torch.Tensor) -> torch.Tensor:
        """`losses` (`[B, T-1]`) after refusing NaN/inf at response positions: a `NonFiniteError` naming the
        step, the samples and this reference (a NaN reference would silently decide what is trained)."""
        check_finite(
            losses,
            what="reference token losses",
            source=self.describe(module),
            mask=batch["labels"][:, 1:] != -100,
            sample_ids=batch.get("sample_id"),
            step=module.global_step if getattr(module, "_trainer", None) is not None else None,
        )
        return losses

    def config(self) -> dict[str, Any]:
        """Plain-data description (class_path, init_args) for a checkpoint's hyper-parameters."""
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_args": dict(getattr(self, "_init_args", {})),
        }


@torch.no_grad()
def model_token_losses(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """No-grad forward of `model` in eval mode (no dropout); per-token losses `[B, T-1]` float32.

    Only response positions are projected onto the vocabulary (no `[B, T, V]` logits).
    """
    with eval_mode(model):
        losses, _ = response_token_losses(model, batch)  # [B, T-1]
    return losses


@torch.no_grad()
def model_hidden_and_head(model: torch.nn.Module, batch: Batch) -> HiddenAndHead:
    """No-grad forward of `model` in eval mode: last hidden state `[B, T, H]` and the output projection."""
    with eval_mode(model):
        hidden, head = decoder_hidden_and_head(model, batch)
    return hidden, head.weight.detach(), None if head.bias is None else head.bias.detach()


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Switch `model` to eval for the block and restore each submodule's own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def reference_from_config(config: ReferenceModel | dict[str, Any]) -> ReferenceModel:
    """A provider from its `config()` (how checkpoints store it), or the provider itself.

    The `class_path` must be on the allow-list (`lit_tokensel.trusted_classes`): a checkpoint's
    hyper-parameters must not choose which code runs.
    """
    if isinstance(config, ReferenceModel):
        return config
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(
            f"a reference must be a ReferenceModel or a {{class_path, init_args}} dict, got {config!r}"
        )
    cls = resolve_trusted_class(config["class_path"], "reference config", base=ReferenceModel)
    return cls(**config.get("init_args", {}))
