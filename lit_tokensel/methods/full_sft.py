"""Full SFT: every response token enters the loss. The baseline every method is measured against."""

from __future__ import annotations

from lit_tokensel.methods.base import TokenSelectionModule


class FullSFT(TokenSelectionModule):
    """Standard supervised fine-tuning on all response tokens (the base class's `select_tokens`)."""
