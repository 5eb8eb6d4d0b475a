"""The functional selection core against hand computations and independent sorts."""

from __future__ import annotations

import pytest
import torch

from lit_tokensel import FullSFT
from lit_tokensel.methods.random_tokens import RandomTokenSFT, uniform_scores
from lit_tokensel.selection.selectors import (
    check_ratio,
    global_threshold,
    keep_count,
    select_top,
    top_k_per_batch,
    top_k_per_sequence,
)
from lit_tokensel.selection.stats import selection_statistics
from lit_tokensel.selection.token_loss import per_token_cross_entropy, per_token_cross_entropy_chunked
from tests.model_fixtures import pad_batch, synthetic_rows


def test_keep_count_is_exact_ceil():
    n = torch.tensor([0, 1, 3, 4, 5, 10])
    assert keep_count(n, 0.6).tolist() == [0, 1, 2, 3, 3, 6]  # 0.6*5 = 3.0000000000000004 -> 3
    assert keep_count(n, 0.5).tolist() == [0, 1, 2, 2, 3, 5]


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, "0.5", True, None])
def test_invalid_ratio_is_a_config_error(ratio):
    with pytest.raises(ValueError, match="must be a number in \\(0, 1\\]"):
        check_ratio(ratio)
    with pytest.raises(ValueError):
        RandomTokenSFT(ratio=ratio)


def test_top_k_per_sequence_by_hand_with_ties():
    scores = torch.tensor([[3.0, 1.0, 3.0, 2.0, 9.0], [5.0, 5.0, 5.0, 5.0, 0.0]])
    valid = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    keep = top_k_per_sequence(scores, valid, 0.6)
    # row 0: 4 response tokens -> k=3; the invalid 9.0 is never kept
    assert keep[0].tolist() == [True, False, True, True, False]
    # row 1: 5 tokens -> k=3; four-way tie broken towards earlier positions
    assert keep[1].tolist() == [True, True, True, False, False]


def test_top_k_per_batch_equals_independent_sort():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 9, generator=g).round(decimals=1)  # rounding makes ties
    valid = torch.rand(4, 9, generator=g) > 0.3
    keep = top_k_per_batch(scores, valid, 0.6)
    flat = [(-float(scores[b, t]), b * 9 + t) for b in range(4) for t in range(9) if valid[b, t]]
    k = -(-len(flat) * 6 // 10)
    expected = torch.zeros(36, dtype=torch.bool)
    expected[[i for _, i in sorted(flat)[:k]]] = True
    assert torch.equal(keep.flatten(), expected)
    assert int(keep.sum()) == k


def test_global_threshold_equals_sorting_all_scores():
    g = torch.Generator().manual_seed(1)
    dataset_scores = [torch.randn(n, generator=g) for n in (5, 12, 7, 20)]  # one row per sample
    everything = torch.cat(dataset_scores)
    threshold = global_threshold(everything, 0.6)
    k = -(-everything.numel() * 6 // 10)
    top_set = set(torch.sort(everything, descending=True).values[:k].tolist())
    kept = {v for row in dataset_scores for v in row.tolist() if v >= threshold}
    assert kept == top_set
    width = max(len(r) for r in dataset_scores)
    scores = torch.zeros(4, width)
    valid = torch.zeros(4, width, dtype=torch.bool)
    for i, row in enumerate(dataset_scores):
        scores[i, : len(row)], valid[i, : len(row)] = row, True
    keep = select_top(scores, valid, 0.6, "global", threshold=threshold)
    assert int(keep.sum()) == k and not (keep & ~valid).any()
    with pytest.raises(ValueError, match="needs a threshold"):
        select_top(scores, valid, 0.6, "global")


def test_selection_statistics_by_hand():
    keep = torch.tensor([[True, False, False], [True, True, False]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    losses = torch.tensor([[1.0, 2.0, 7.0], [3.0, 5.0, 4.0]])
    scores = torch.tensor([[0.0, 1.0, 9.0], [2.0, 3.0, 4.0]])
    stats = selection_statistics(keep, valid, losses, scores)
    assert stats["kept_fraction"] == pytest.approx(3 / 5)
    assert stats["loss_kept"] == pytest.approx((1 + 3 + 5) / 3)
    assert stats["loss_dropped"] == pytest.approx((2 + 4) / 2)
    assert stats["score_q50"] == pytest.approx(2.0)


def test_chunked_loss_equals_direct_loss_and_transformers(tiny_model_dir):
    direct = FullSFT(model=tiny_model_dir)
    chunked = FullSFT(model=tiny_model_dir, chunked_loss=True)
    direct.configure_model()
    chunked.configure_model()
    batch = pad_batch(synthetic_rows(4, vocab=300), pad_id=0)
    a, valid = direct.token_losses(batch)
    b, valid_b = chunked.token_losses(batch)
    assert torch.equal(valid, valid_b)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    reference = chunked.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    torch.testing.assert_close(b[valid].mean(), reference, rtol=1e-5, atol=1e-5)
    b.sum().backward()
    a.sum().backward()
    for p, q in zip(direct.model.parameters(), chunked.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


def test_chunked_loss_with_no_response_token_keeps_graph():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)
    losses, valid = per_token_cross_entropy_chunked(hidden, weight, labels)
    assert not valid.any() and losses.abs().sum() == 0
    losses.sum().backward()
    assert hidden.grad is not None and not hidden.grad.any()
    direct, _ = per_token_cross_entropy(hidden @ weight.T, labels)
    assert torch.equal(direct, losses.detach())


def test_random_selection_depends_only_on_sample_and_seed():
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[1, 6:] = False
    module = RandomTokenSFT(ratio=0.6, selection_seed=7)
    batch = {"sample_id": torch.tensor([4, 9, 2])}
    keep = module.select_tokens(batch, torch.zeros(3, 10), valid).keep
    assert keep.sum(dim=1).tolist() == [6, 4, 6]
    swapped = module.select_tokens(
        {"sample_id": torch.tensor([2, 4, 9])}, torch.zeros(3, 10), valid[[2, 0, 1]]
    ).keep
    assert torch.equal(swapped, keep[[2, 0, 1]])
    assert not torch.equal(uniform_scores(torch.tensor([4]), 10, 7), uniform_scores(torch.tensor([4]), 10, 8))
