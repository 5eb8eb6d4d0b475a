"""Fingerprints of a token-loss cache: what the cached losses depend on, and errors that name what differs.

A cache is valid for a DataModule split when its `data`, `tokenizer`, `max_length` and `train_on` parts
equal the DataModule's. The `model` part identifies the scoring model; it is checked when a scoring
pass resumes into an existing directory, and only recorded (`TokenLossCache.model_fingerprint`) for
the join, since which frozen model a method wants is the method's business.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

DATA_PARTS = ("data", "tokenizer", "max_length", "train_on")
"""The parts a DataModule checks when it joins a cache."""
ALL_PARTS = (*DATA_PARTS, "model")
"""The parts a resumed scoring pass checks."""

_SAMPLED_VALUES = 16


class FingerprintMismatchError(ValueError):
    """A cache was made for other data, tokenizer, max_length, train_on or model than the one in use."""

    def __init__(self, path: str, parts: Mapping[str, tuple[Any, Any]], hint: str) -> None:
        self.path = path
        self.parts = dict(parts)
        lines = [
            f"{name}: cache has {_short(cached)}, current is {_short(now)}"
            for name, (cached, now) in parts.items()
        ]
        super().__init__(
            f"token-loss cache {path} does not match ({', '.join(parts)} differ{'s' if len(parts) == 1 else ''}):\n  "
            + "\n  ".join(lines)
            + f"\n{hint}"
        )


def _short(value: Any, keep: int = 16) -> str:
    text = str(value)
    return repr(value) if len(text) <= 2 * keep + 3 else f"'{text[:keep]}...{text[-8:]}'"


def compare(
    path: str, cached: Mapping[str, Any], current: Mapping[str, Any], parts: Sequence[str], hint: str
) -> None:
    """Raise `FingerprintMismatchError` naming every part in `parts` where `cached` and `current` differ."""
    diff = {p: (cached.get(p), current.get(p)) for p in parts if cached.get(p) != current.get(p)}
    if diff:
        raise FingerprintMismatchError(path, diff, hint)


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def data_fingerprint(
    content_id: Sequence[str], fmt: str, system_prompt: str | None, sample_ids: Sequence[int]
) -> str:
    """Hash of the rows a split is made of: the source's content id (`pipeline.source_content_id`),
    the row format, the system prompt and the split's row positions.

    Independent of the tokenizer and `max_length`, which are fingerprint parts of their own.
    """
    return _sha(["data", list(content_id), fmt, system_prompt, list(sample_ids)])


def model_fingerprint(model: torch.nn.Module, name_or_path: str) -> str:
    """`"<name_or_path>@<sha256>"` over the model's config and a cheap digest of its weights.

    The weight digest hashes, for every state-dict entry in name order, its name, dtype, shape and
    16 values taken at even strides over the flattened tensor plus its last value: it changes when
    weights are replaced or retrained, and costs no full pass over a large model. Moving the model
    directory changes `name_or_path` (so a resumed scoring pass refuses it) but not the hash.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        config_dict = {
            k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")
        }
        digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode("utf-8"))
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLED_VALUES)
        sample = torch.cat([flat[::step][:_SAMPLED_VALUES], flat[-1:]]).to("cpu", torch.float64)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(sample.numpy().tobytes())
    return f"{name_or_path}@{digest.hexdigest()}"
