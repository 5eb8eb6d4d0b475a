"""Influence scores `L_base - L_ref` of a whole training set from two cached scoring passes.

Shared by TokenCleaning's and Forgetting's dataset-wide thresholds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def dataset_scores(
    datamodule: Any, base_name: str, reference_name: str, method: str = "TokenCleaningSFT"
) -> torch.Tensor:
    """`L_base - L_ref` of every response token of the training set, 1-D (one pass over the caches)."""
    caches = getattr(datamodule, "loss_caches", {})
    missing = [n for n in (base_name, reference_name) if n not in caches]
    if missing:
        raise ValueError(
            f"{method} needs cached losses named {missing} in `data.cached_losses` "
            f"(have {sorted(caches)}); write them with `lit-tokensel score`."
        )
    base, reference = caches[base_name], caches[reference_name]
    columns = datamodule.train_dataset.select_columns(["sample_id", "labels"])
    scores = []
    for sample_id, labels in zip(columns["sample_id"], columns["labels"]):
        response = np.asarray(labels[1:]) != -100  # [T-1]
        scores.append(base[sample_id][response] - reference[sample_id][response])
    return torch.from_numpy(np.concatenate(scores))
