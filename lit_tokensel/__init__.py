"""lit_tokensel: token-level data selection for LLM supervised fine-tuning."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lit_tokensel.data import SFTDataModule
    from lit_tokensel.methods import (
        ASFTSFT,
        DFTSFT,
        EAFTSFT,
        ForgettingSFT,
        FullSFT,
        ProFitSFT,
        QTuningSFT,
        RandomTokenSFT,
        Rho1SFT,
        SelfEvolvingTokenCleaningSFT,
        SsTokenSFT,
        TokenCleaningSFT,
        TokenSelectionModule,
    )

__version__ = "0.1.0"

__all__ = [
    "ASFTSFT",
    "DFTSFT",
    "EAFTSFT",
    "ForgettingSFT",
    "FullSFT",
    "ProFitSFT",
    "QTuningSFT",
    "RandomTokenSFT",
    "Rho1SFT",
    "SFTDataModule",
    "SelfEvolvingTokenCleaningSFT",
    "SsTokenSFT",
    "TokenCleaningSFT",
    "TokenSelectionModule",
]


def __getattr__(name: str) -> Any:
    # Loaded on first use: torch, Lightning and `datasets` are heavy, and `lit-tokensel --help` needs none.
    if name in __all__:
        package = "lit_tokensel.data" if name == "SFTDataModule" else "lit_tokensel.methods"
        value = getattr(importlib.import_module(package), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lit_tokensel' has no attribute {name!r}")
