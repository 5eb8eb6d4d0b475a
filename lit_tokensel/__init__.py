"""lit_tokensel: token-level data selection for LLM supervised fine-tuning."""

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


def __getattr__(name: str):
    # The DataModule imports `datasets`, which is heavy; load it on first use.
    if name == "SFTDataModule":
        from lit_tokensel.data import SFTDataModule

        return SFTDataModule
    raise AttributeError(f"module 'lit_tokensel' has no attribute {name!r}")
