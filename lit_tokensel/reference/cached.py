"""Losses precomputed by a scoring pass and joined into the batch by the DataModule."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lit_tokensel.reference.base import Batch, ReferenceModel

if TYPE_CHECKING:
    from lit_tokensel.methods.base import TokenSelectionModule


class CachedReference(ReferenceModel):
    """Reads `batch["cached/<name>"]` (`[B, T-1]` float32), written once by a scoring pass.

    Args:
        name: Name of the cached losses, as configured under `data.cached_losses`.
    """

    def __init__(self, name: str) -> None:
        self._init_args = {"name": name}
        self.name = name

    @property
    def key(self) -> str:
        return f"cached/{self.name}"

    def token_losses(self, module: TokenSelectionModule, batch: Batch) -> torch.Tensor:
        if self.key not in batch:
            raise KeyError(
                f"CachedReference(name={self.name!r}) needs batch[{self.key!r}], but the batch has only "
                f"{sorted(batch)}. Add {self.name!r} to `data.cached_losses` (pointing at the output of "
                "the scoring pass) so the DataModule joins those losses by sample_id."
            )
        losses = batch[self.key]
        expected = (batch["labels"].shape[0], batch["labels"].shape[1] - 1)
        if tuple(losses.shape) != expected:
            raise ValueError(
                f"batch[{self.key!r}] has shape {tuple(losses.shape)}, expected [B, T-1] = {expected}"
            )
        valid = batch["labels"][:, 1:] != -100  # [B, T-1]
        return self.checked(module, batch, losses.detach().float().masked_fill(~valid, 0.0))

    def describe(self, module: TokenSelectionModule | None = None) -> str:
        """This reference and the cache directory it reads (`data.cached_losses.<name>`)."""
        datamodule = getattr(module._trainer, "datamodule", None) if module is not None else None
        path = getattr(datamodule, "cached_losses", {}).get(self.name)
        return f"CachedReference(name={self.name!r})" + (f", token-loss cache {path}" if path else "")
