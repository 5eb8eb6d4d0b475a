"""A separately loaded, frozen model (Rho-1's reference, TokenCleaning's theta_0 or reference)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from lit_tokensel.choices import check_choices
from lit_tokensel.distributed.fsdp import is_fsdp, reshard_root
from lit_tokensel.modeling.loading import WeightDType, load_causal_lm
from lit_tokensel.reference.base import (
    Batch,
    HiddenAndHead,
    ReferenceModel,
    model_hidden_and_head,
    model_token_losses,
)

if TYPE_CHECKING:
    from lit_tokensel.methods.base import TokenSelectionModule


class FrozenModelReference(ReferenceModel):
    """Losses of a second causal LM, loaded in `setup`, in eval mode, with no trainable weights.

    The model lives in this provider, not in the LightningModule, so it is neither trained nor
    saved in checkpoints. It follows the trained module to its device. Under FSDP2 (the module has a
    device mesh) it is sharded like the trained model, so no rank holds a full copy: each forward
    all-gathers one layer at a time and frees it again.

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
        dtype: WeightDType = "float32",
        attn_implementation: str = "sdpa",
    ) -> None:
        check_choices(FrozenModelReference.__init__, locals())
        self._init_args = {
            "model": model,
            "gguf_file": gguf_file,
            "dtype": dtype,
            "attn_implementation": attn_implementation,
        }
        self.model_name_or_path = model
        self.gguf_file = gguf_file
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.model: PreTrainedModel | None = None

    def setup(self, module: TokenSelectionModule) -> None:
        if self.model is None:
            self.model = load_causal_lm(
                self.model_name_or_path,
                dtype=self.dtype,
                attn_implementation=self.attn_implementation,
                gguf_file=self.gguf_file,
            )
            self.model.eval().requires_grad_(False)
            if getattr(module, "device_mesh", None) is not None:
                self._shard(module)
        self._follow(module)

    def token_losses(self, module: TokenSelectionModule, batch: Batch) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError(
                "FrozenModelReference.setup(module) was not called (call it in configure_model)"
            )
        self._follow(module)
        losses = model_token_losses(self.model, batch)  # [B, T-1]
        if is_fsdp(self.model):
            reshard_root(self.model)  # free the gathered embeddings and head until the next batch
        return self.checked(module, batch, losses)

    def hidden_and_head(self, module: TokenSelectionModule, batch: Batch) -> HiddenAndHead:
        if self.model is None:
            raise RuntimeError(
                "FrozenModelReference.setup(module) was not called (call it in configure_model)"
            )
        if is_fsdp(self.model):
            raise ValueError(
                "FrozenModelReference.hidden_and_head (ASFT's KL) is not supported under FSDP2 yet: "
                "its output projection is sharded. Use DDP, or LoRA with AdapterDisabledReference."
            )
        self._follow(module)
        return model_hidden_and_head(self.model, batch)

    def _shard(self, module: TokenSelectionModule) -> None:
        from lit_tokensel.distributed.fsdp import data_parallel_mesh, mixed_precision_policy, shard_model

        precision = module.trainer.precision if module._trainer is not None else None
        shard_model(
            self.model,
            data_parallel_mesh(module.device_mesh),
            mixed_precision_policy(precision),
            reshard_root_after_forward=True,
        )

    def _follow(self, module: TokenSelectionModule) -> None:
        # Lightning moves the module after configure_model; a plain attribute is not moved with it.
        # FSDP2 placed the shards on the mesh's device already.
        if not is_fsdp(self.model) and self.model.device != module.device:
            self.model.to(module.device)
