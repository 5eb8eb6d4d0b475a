"""Cached per-token losses of a frozen model: a scoring pass writes them once, the DataModule joins them
into batches by `sample_id` (as `batch["cached/<name>"]`, `[B, T-1]`), with shuffling on."""

from lit_tokensel.cache.fingerprint import FingerprintMismatchError, data_fingerprint, model_fingerprint
from lit_tokensel.cache.scoring import score_to_cache
from lit_tokensel.cache.store import CacheError, TokenLossCache, TokenLossCacheWriter

__all__ = [
    "CacheError",
    "FingerprintMismatchError",
    "TokenLossCache",
    "TokenLossCacheWriter",
    "data_fingerprint",
    "model_fingerprint",
    "score_to_cache",
]
