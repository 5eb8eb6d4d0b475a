"""QTuningSFT: sample triage and token pruning against independent computations, the chunked entropy,
and a short fit in which dropped samples never reach the training forward."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_tokensel.methods.qtuning import QTuningSFT
from lit_tokensel.selection.entropy import response_nll_and_entropy
from lit_tokensel.selection.qtuning import (
    neighbour_smoothed_ppl,
    prune_tokens,
    quantile_ranks,
    triage_samples,
)
from tests.model_fixtures import pad_batch, synthetic_rows

# ---------------------------------------------------------------------------------------------- triage


def _exact_ranks(values: list[float]) -> list[Fraction]:
    """Average rank (ties share it) scaled to [0, 1], in exact arithmetic."""
    n = len(values)
    if n == 1:
        return [Fraction(1, 2)]
    out = []
    for v in values:
        less, equal = sum(w < v for w in values), sum(w == v for w in values)
        out.append(Fraction(2 * less + equal - 1, 2 * (n - 1)))
    return out


def _expected_triage(ppl: list[float], ent: list[float], ratio: float) -> tuple[list[bool], list[bool]]:
    """Independent triage from closed-form entry thresholds: with high = rank > 1 - alpha and low = rank < alpha,
    a sample is in Q2 once alpha > max(1 - p, e) and in Q4 once alpha > max(p, 1 - e). The bisected alpha
    lies just above the k-th smallest entry; samples entering there are trimmed by |p - e|, and when
    fewer than k can enter (entry < 1/2) the rest is topped up by |p - e|; ties to the earlier sample."""
    p, e = _exact_ranks(ppl), _exact_ranks(ent)
    n, k = len(p), max(math.ceil(round(ratio * len(p), 9)), 1)
    q2_entry = [max(1 - pi, ei) for pi, ei in zip(p, e)]
    q4_entry = [max(pi, 1 - ei) for pi, ei in zip(p, e)]
    entry = [min(a, b) for a, b in zip(q2_entry, q4_entry)]
    reachable = sorted(x for x in entry if x < Fraction(1, 2))
    if len(reachable) >= k:
        t = reachable[k - 1]
        candidate = [x <= t for x in entry]
    else:
        t = Fraction(1, 2)
        candidate = [x < t for x in entry]
    # trimming only happens among the samples entering at t; every earlier one is kept
    key = [((0 if entry[i] < t else 1) if candidate[i] else 2, -abs(p[i] - e[i]), i) for i in range(n)]
    kept = {i for _, _, i in sorted(key)[:k]}
    keep = [i in kept for i in range(n)]
    in_q2 = [c and q2_entry[i] == entry[i] for i, c in enumerate(candidate)]
    prune = [keep[i] and (in_q2[i] or (not candidate[i] and p[i] > e[i])) for i in range(n)]
    return keep, prune


def _stats(
    seed: int, n: int, correlated: bool = False, ties: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ppl = torch.rand(n, generator=g) * 20 + 1
    ent = torch.rand(n, generator=g) * 5
    if correlated:  # PPL and entropy rise together: few samples lie off the diagonal, the triage tops up
        ent = ppl.log() + 0.05 * torch.rand(n, generator=g)
    if ties:  # repeated values: shared quantile ranks
        ppl, ent = ppl.round(), (ent * 2).round()
    return ppl, ent


CASES = [
    (seed, n, ratio, corr, ties)
    for seed, (n, ratio, corr, ties) in enumerate(
        [
            (16, 0.25, False, False),
            (16, 0.5, False, False),
            (16, 1.0, False, False),
            (13, 0.3, False, False),
            (16, 0.25, True, False),
            (32, 0.5, True, False),
            (16, 0.25, False, True),
            (9, 0.5, False, True),
            (1, 0.25, False, False),
            (2, 0.5, False, False),
            (12, 0.125, False, False),
            (64, 0.25, False, False),
        ]
    )
]


@pytest.mark.parametrize(("seed", "n", "ratio", "correlated", "ties"), CASES)
def test_triage_equals_independent_computation(seed, n, ratio, correlated, ties):
    ppl, ent = _stats(seed, n, correlated, ties)
    triage = triage_samples(ppl, ent, ratio)
    keep, prune = _expected_triage(ppl.tolist(), ent.tolist(), ratio)
    assert triage.keep.tolist() == keep
    assert triage.prune_tokens.tolist() == prune
    assert int(triage.keep.sum()) == max(math.ceil(round(ratio * n, 9)), 1)


def test_kept_sample_fraction_matches_ratio_and_topping_up_happens_when_needed():
    for n in range(1, 40):
        for ratio in (0.1, 0.25, 0.5, 0.75, 1.0):
            triage = triage_samples(*_stats(n, n), ratio)
            assert int(triage.keep.sum()) == max(math.ceil(round(ratio * n, 9)), 1)
    # perfectly correlated statistics have no sample off the diagonal: every kept sample is a top-up
    ppl = torch.arange(1.0, 17.0)
    triage = triage_samples(ppl, ppl.log(), 0.25)
    assert triage.topped_up == 4 and triage.alpha == 0.5 and int(triage.keep.sum()) == 4
    # anti-correlated: high PPL with low entropy and the reverse, the kept set is Q2 and Q4 only
    triage = triage_samples(ppl, -ppl, 0.25)
    assert triage.topped_up == 0
    assert triage.keep.tolist() == [True, True] + [False] * 12 + [True, True]  # the four corners
    assert triage.prune_tokens.tolist() == [False] * 14 + [True, True]  # high PPL, low entropy = Q2


def test_quantile_ranks_share_ties():
    ranks = quantile_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0, 5.0]))
    torch.testing.assert_close(ranks, torch.tensor([2.5, 0.0, 2.5, 1.0, 4.0], dtype=torch.float64) / 4)


# ---------------------------------------------------------------------------------------------- tokens


def _expected_token_keep(
    losses: torch.Tensor, valid: torch.Tensor, prune_rows: list[bool], ratio: float, lam: float
):
    keep = torch.zeros_like(valid)
    for b in range(valid.shape[0]):
        positions = [j for j in range(valid.shape[1]) if valid[b, j]]
        if not prune_rows[b]:
            keep[b, positions] = True
            continue
        scores = []
        for j in positions:
            own = math.exp(float(losses[b, j]))
            neighbours = [
                math.exp(float(losses[b, i]))
                for i in (j - 1, j + 1)
                if 0 <= i < valid.shape[1] and valid[b, i]
            ]
            mean = sum(neighbours) / len(neighbours) if neighbours else own
            scores.append(((1 - lam) * own + lam * mean, j))
        n_keep = math.ceil(round(ratio * len(positions), 9))
        keep[b, [j for _, j in sorted(scores)[:n_keep]]] = True
    return keep


def test_token_pruning_keeps_the_lowest_smoothed_perplexity_in_q2_rows_only():
    g = torch.Generator().manual_seed(3)
    losses = torch.rand(4, 12, generator=g) * 5
    valid = torch.rand(4, 12, generator=g) < 0.75
    valid[2, :] = False
    valid[2, [1, 2, 3, 7, 8, 10]] = True  # two turns and a one-token turn: neighbours stop at turn edges
    prune_rows = [True, False, True, True]
    keep, score = prune_tokens(losses, valid, torch.tensor(prune_rows), ratio=0.5, lam=0.5)
    assert torch.equal(keep, _expected_token_keep(losses, valid, prune_rows, 0.5, 0.5))
    # the one-token turn at position 10 scores its own perplexity; position 1 has only its right neighbour
    assert float(score[2, 10]) == pytest.approx(math.exp(float(losses[2, 10])))
    assert float(score[2, 1]) == pytest.approx(
        0.5 * math.exp(float(losses[2, 1])) + 0.5 * math.exp(float(losses[2, 2]))
    )
    assert torch.equal(neighbour_smoothed_ppl(losses.exp(), valid, 0.0)[valid], losses.exp().double()[valid])


# ---------------------------------------------------------------------------------------------- entropy


def test_chunked_entropy_and_nll_equal_the_direct_computation():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 10, 16, generator=g)
    weight, bias = torch.randn(50, 16, generator=g), torch.randn(50, generator=g)
    labels = torch.randint(0, 50, (3, 10), generator=g)
    labels[:, :3] = -100
    labels[1, 7:] = -100
    nll, entropy, valid = response_nll_and_entropy(hidden, weight, labels, bias, chunk_size=4)
    logp = torch.log_softmax(hidden @ weight.T + bias, dim=-1)[:, :-1]  # [B, T-1, V]
    direct_entropy = -(logp.exp() * logp).sum(-1)
    direct_nll = -logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    assert torch.equal(valid, labels[:, 1:] != -100)
    torch.testing.assert_close(entropy[valid], direct_entropy[valid])
    torch.testing.assert_close(nll[valid], direct_nll[valid])
    assert (entropy[~valid] == 0).all() and (nll[~valid] == 0).all()


# ---------------------------------------------------------------------------------------------- the module


def test_sample_statistics_match_the_model_and_restore_train_mode(tiny_model_dir):
    module = QTuningSFT(model=tiny_model_dir, entropy_chunk_size=7)
    module.configure_model()
    batch = pad_batch(synthetic_rows(6, vocab=300), pad_id=0)
    ppl, ent = module.sample_statistics(batch)
    assert module.model.training
    module.model.eval()
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits, -1)[:, :-1]
    valid = batch["labels"][:, 1:] != -100
    nll = -logp.gather(-1, batch["labels"][:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    for b in range(6):
        assert float(ppl[b]) == pytest.approx(math.exp(float(nll[b][valid[b]].mean())), rel=1e-5)
        assert float(ent[b]) == pytest.approx(float(entropy[b][valid[b]].mean()), rel=1e-5)


class _Spy(L.Callback):
    """Shapes of every decoder forward, and the per-step selection metrics."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.metrics: list[dict[str, float]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.model.model.register_forward_pre_hook(
            lambda mod, args, kwargs: self.shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("select/")}
        )


@pytest.mark.parametrize("sample_ratio", [0.25, 0.5])
def test_fit_forwards_only_the_kept_samples(tiny_model_dir, sample_ratio):
    rows = synthetic_rows(16, vocab=300, seed=4)
    batches = [pad_batch(rows[:8], pad_id=0), pad_batch(rows[8:], pad_id=0)]
    module = QTuningSFT(model=tiny_model_dir, sample_ratio=sample_ratio, ratio=0.5, learning_rate=1e-3)
    spy = _Spy()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[spy],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    kept = math.ceil(sample_ratio * 8)
    width = [b["input_ids"].shape[1] for b in batches]
    # per step: the no-grad scoring forward sees all 8 rows, the training forward only the kept ones
    assert spy.shapes == [(8, width[0]), (kept, width[0]), (8, width[1]), (kept, width[1])]
    for metrics in spy.metrics:
        assert metrics["select/sample_kept_fraction"] == kept / 8
        assert 0 < metrics["select/kept_fraction"] < 1
        assert 0.0 < metrics["select/alpha"] <= 0.5


def test_select_tokens_on_the_kept_rows_follows_the_triage(tiny_model_dir):
    module = QTuningSFT(model=tiny_model_dir, sample_ratio=0.5, ratio=0.5)
    module.configure_model()
    batch = pad_batch(synthetic_rows(8, vocab=300, seed=2), pad_id=0)
    ppl, ent = module.sample_statistics(batch)
    expected_keep, expected_prune = _expected_triage(ppl.tolist(), ent.tolist(), 0.5)
    samples = module.select_samples(batch)
    assert samples.tolist() == expected_keep
    sub = {k: v[samples] for k, v in batch.items()}
    losses, valid = module.token_losses(sub)
    selection = module.select_tokens(sub, losses, valid)
    prune_rows = [p for p, k in zip(expected_prune, expected_keep) if k]
    assert torch.equal(selection.keep, _expected_token_keep(losses.detach(), valid, prune_rows, 0.5, 0.5))
    with pytest.raises(RuntimeError, match="select_samples"):  # the decision is used once
        module.select_tokens(sub, losses, valid)


def test_inspect_reports_the_kept_samples_of_each_batch(tiny_model_dir, tmp_path):
    from lit_tokensel.data import SFTDataModule
    from lit_tokensel.inspection import inspect_selection

    rows = (Path(__file__).parents[1] / "lit_tokensel" / "assets" / "quickstart" / "train.jsonl").read_text()
    (tmp_path / "train.jsonl").write_text("\n".join(rows.splitlines()[:16]) + "\n")
    dm = SFTDataModule(
        train_file=str(tmp_path / "train.jsonl"),
        tokenizer=tiny_model_dir,
        batch_size=8,
        cache_dir=str(tmp_path / "hf"),
    )
    out = inspect_selection(QTuningSFT(model=tiny_model_dir), dm, tmp_path / "inspect.jsonl", progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [sum(r["sample_kept"] for r in records[i : i + 8]) for i in (0, 8)] == [2, 2]
    for record in records:
        n = len(record["positions"])
        kept = sum(record["keep"])
        assert kept == 0 if not record["sample_kept"] else kept in (n, math.ceil(n / 2))


def test_invalid_arguments_are_config_errors():
    with pytest.raises(ValueError, match="sample_ratio"):
        QTuningSFT(sample_ratio=0.0)
    with pytest.raises(ValueError, match="ratio=1.5"):
        QTuningSFT(ratio=1.5)
    with pytest.raises(ValueError, match="neighbor_weight"):
        QTuningSFT(neighbor_weight=2.0)
