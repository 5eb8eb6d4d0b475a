"""Where "other model" per-token losses come from: frozen model, base with adapter off, cache, history."""

from lit_tokensel.reference.adapter import AdapterDisabledReference
from lit_tokensel.reference.base import ReferenceModel, model_token_losses, reference_from_config
from lit_tokensel.reference.cached import CachedReference
from lit_tokensel.reference.frozen import FrozenModelReference
from lit_tokensel.reference.history import HistoryReference

__all__ = [
    "AdapterDisabledReference",
    "CachedReference",
    "FrozenModelReference",
    "HistoryReference",
    "ReferenceModel",
    "model_token_losses",
    "reference_from_config",
]
