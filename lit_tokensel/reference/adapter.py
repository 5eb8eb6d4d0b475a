"""The trained model's base weights with the LoRA adapter switched off: theta_0 without a second copy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lit_tokensel.reference.base import (
    Batch,
    HiddenAndHead,
    ReferenceModel,
    model_hidden_and_head,
    model_token_losses,
)

if TYPE_CHECKING:
    from lit_tokensel.methods.base import TokenSelectionModule


class AdapterDisabledReference(ReferenceModel):
    """Losses of the frozen base model under the LoRA adapter (peft `disable_adapter()`), no grad.

    Needs a module trained with `lora:`; the base weights are shared with the trained model.
    """

    def __init__(self) -> None:
        self._init_args: dict = {}

    def setup(self, module: TokenSelectionModule) -> None:
        _require_adapter(module)

    def token_losses(self, module: TokenSelectionModule, batch: Batch) -> torch.Tensor:
        model = _require_adapter(module)
        with model.disable_adapter():
            losses = model_token_losses(model, batch)  # [B, T-1]
        return self.checked(module, batch, losses)

    def hidden_and_head(self, module: TokenSelectionModule, batch: Batch) -> HiddenAndHead:
        model = _require_adapter(module)
        with model.disable_adapter():
            hidden, weight, bias = model_hidden_and_head(model, batch)  # [B, T, H]
        # A LoRA-wrapped head's `.weight` is its base weight: the projection is adapter-off too.
        return hidden, weight, bias


def _require_adapter(module: TokenSelectionModule) -> torch.nn.Module:
    model = module.model
    if model is None or not hasattr(model, "disable_adapter") or not getattr(model, "peft_config", None):
        raise ValueError(
            "AdapterDisabledReference needs a model with a LoRA adapter, but the module trains "
            f"{type(model).__name__} without one. Set `model.init_args.lora` (e.g. `lora: {{r: 16}}`), "
            "or use FrozenModelReference(model=<base model>) for full fine-tuning."
        )
    return model
