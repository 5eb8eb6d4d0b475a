"""One LightningModule per token-selection method."""

from lit_tokensel.methods.base import TokenSelectionModule
from lit_tokensel.methods.full_sft import FullSFT

__all__ = ["FullSFT", "TokenSelectionModule"]
