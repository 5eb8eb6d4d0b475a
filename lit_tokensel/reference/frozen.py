"""A separately loaded, frozen model (Rho-1's reference, TokenCleaning's theta_0 or reference)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from lit_tokensel.modeling.loading import load_causal_lm
from lit_tokensel.reference.base import Batch, ReferenceModel, model_token_losses

if TYPE_CHECKING:
    from lit_tokensel.methods.base import TokenSelectionModule


class FrozenModelReference(ReferenceModel):
    """Losses of a second causal LM, loaded in `setup`, in eval mode, with no trainable weights.

    The model lives in this provider, not in the LightningModule, so it is neither trained nor
    saved in checkpoints. It follows the trained module to its device.

    Args:
        model: Hub id, local directory, or `builtin:<name>` of the reference model.
        gguf_file: GGUF file name inside `model` to load weights from.
        dtype: Weight dtype: float32, bfloat16 or float16.
        attn_implementation: `sdpa` (default), `eager`, or `flash_attention_2` on a GPU.
    """

    def __init__(
        self,
        model: str,
        gguf_file: str | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
    ) -> None:
        self._init_args = {"model": model, "gguf_file": gguf_file, "dtype": dtype,
                           "attn_implementation": attn_implementation}
        self.model_name_or_path = model
        self.gguf_file = gguf_file
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.model: PreTrainedModel | None = None

    def setup(self, module: TokenSelectionModule) -> None:
        if self.model is None:
            self.model = load_causal_lm(
                self.model_name_or_path, dtype=self.dtype,
                attn_implementation=self.attn_implementation, gguf_file=self.gguf_file,
            )
            self.model.eval().requires_grad_(False)
        self._follow(module)

    def token_losses(self, module: TokenSelectionModule, batch: Batch) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("FrozenModelReference.setup(module) was not called (call it in configure_model)")
        self._follow(module)
        return model_token_losses(self.model, batch)  # [B, T-1]

    def _follow(self, module: TokenSelectionModule) -> None:
        # Lightning moves the module after configure_model; a plain attribute is not moved with it.
        if self.model.device != module.device:
            self.model.to(module.device)
