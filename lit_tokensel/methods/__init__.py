"""One LightningModule per token-selection method."""

from lit_tokensel.methods.asft import ASFTSFT
from lit_tokensel.methods.base import LossTerm, Selection, TokenSelectionModule
from lit_tokensel.methods.dft import DFTSFT
from lit_tokensel.methods.eaft import EAFTSFT
from lit_tokensel.methods.forgetting import ForgettingSFT
from lit_tokensel.methods.full_sft import FullSFT
from lit_tokensel.methods.profit import ProFitSFT
from lit_tokensel.methods.qtuning import QTuningSFT
from lit_tokensel.methods.random_tokens import RandomTokenSFT
from lit_tokensel.methods.rho1 import Rho1SFT
from lit_tokensel.methods.self_evolving import SelfEvolvingTokenCleaningSFT
from lit_tokensel.methods.sstoken import SsTokenSFT
from lit_tokensel.methods.token_cleaning import TokenCleaningSFT

__all__ = [
    "ASFTSFT",
    "DFTSFT",
    "EAFTSFT",
    "ForgettingSFT",
    "FullSFT",
    "LossTerm",
    "ProFitSFT",
    "QTuningSFT",
    "RandomTokenSFT",
    "Rho1SFT",
    "Selection",
    "SelfEvolvingTokenCleaningSFT",
    "SsTokenSFT",
    "TokenCleaningSFT",
    "TokenSelectionModule",
]
