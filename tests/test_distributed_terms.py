"""The signed-weight contract's own-count loss terms on 2 DDP ranks (gloo, CPU) equal one process.

A term normalised over its own tokens is exact over the whole global batch: without accumulation its
count is all-reduced with the main count; with accumulation its gradient is collected apart on each rank
and summed over ranks at the step (`lit_tokensel.methods.base`). Slow: one 2-rank torchrun.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.model_fixtures import QUICKSTART_TRAIN
from tests.test_distributed import (
    PER_RANK_BATCH,
    STEPS,
    WORLD,
    _assert_same_tensors,
    _result,
    run_jobs,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: str) -> Path:
    out = tmp_path_factory.mktemp("distributed_terms")
    rows = QUICKSTART_TRAIN.read_text().splitlines()[: WORLD * PER_RANK_BATCH * 2]
    (out / "train.jsonl").write_text("\n".join(rows) + "\n")
    spec: dict[str, Any] = {
        "model": tiny_model_dir,
        "reference": tiny_model_dir,
        "train_file": str(out / "train.jsonl"),
        "out": str(out),
        "world": WORLD,
    }
    job = {"method": "terms", "per_rank_batch": PER_RANK_BATCH, "max_steps": STEPS}
    distributed = [
        {"name": "ddp_terms", "strategy": "ddp", **job},
        {"name": "ddp_terms_accumulate", "strategy": "ddp", **job, "per_rank_batch": 1, "accumulate": 2},
    ]
    single = [
        {"name": name, "strategy": "single", **job, "method": method}
        for name, method in (("single_terms", "terms"), ("single_full", "terms_full"))
    ]
    run_jobs(out, spec, distributed, single)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp_terms", "ddp_terms_accumulate"])
def test_two_ranks_with_own_count_terms_equal_one_process(runs, name):
    single, distributed = _result(runs, "single_terms"), _result(runs, name)
    assert single["global_step"] == distributed["global_step"] == STEPS
    _assert_same_tensors(single["weights"], distributed["weights"], rtol=1e-5, atol=2e-5)
    losses = distributed["losses"]
    if name.endswith("accumulate"):  # recorded after every micro-batch: each step's loss from its last one on
        assert len(losses) == 2 * STEPS - 1
        losses = losses[::2]
    torch.testing.assert_close(losses, single["losses"], rtol=1e-5, atol=1e-5)
    full = _result(runs, "single_full")["weights"]  # the term changed the update: the comparison has power
    assert max((single["weights"][k] - full[k]).abs().max() for k in full) > 1e-3
