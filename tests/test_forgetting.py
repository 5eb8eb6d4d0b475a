"""ForgettingSFT against hand computations: the signed loss and its SGD update, the ascent on negative
tokens, the lambda schedule across resume, empty sets, the cap, the global partition, and the recipe."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lit_tokensel import FullSFT
from lit_tokensel.cache import TokenLossCache, score_to_cache
from lit_tokensel.cli import main
from lit_tokensel.data import SFTDataModule
from lit_tokensel.inspection import inspect_selection
from lit_tokensel.methods.forgetting import ForgettingSFT
from lit_tokensel.selection.forgetting import forgetting_weights
from tests.model_fixtures import (
    QUICKSTART_TRAIN,
    pad_batch,
    save_perturbed_copy,
    setup_datamodule,
    synthetic_rows,
)

RECIPE = Path(__file__).parents[1] / "configs" / "recipes" / "forgetting"
LR = 0.5


# ---------------------------------------------------------------------------------------------- helpers


def _ce(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Independent per-token CE `[B, T-1]` (0 off the response) from a full forward."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return nll * (targets != -100)


def _fixed_batch() -> dict:
    """Synthetic rows plus hand-made cached base/reference losses (influence = their difference)."""
    batch = pad_batch(synthetic_rows(4, vocab=300, seed=1), pad_id=0)
    valid = batch["labels"][:, 1:] != -100
    g = torch.Generator().manual_seed(7)
    batch["cached/base"] = (torch.rand(valid.shape, generator=g) * 6 + 1) * valid
    batch["cached/reference"] = (torch.rand(valid.shape, generator=g) * 6 + 1) * valid
    return batch


def _scores(batch: dict) -> torch.Tensor:
    valid = batch["labels"][:, 1:] != -100
    return (batch["cached/base"] - batch["cached/reference"])[valid]


class _Snapshots(L.Callback):
    """Model weights before and after every training batch, and the logged metrics of each batch."""

    def __init__(self) -> None:
        self.before: list[dict] = []
        self.after: list[dict] = []
        self.metrics: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _fit_fixed_batch(
    model_dir, monkeypatch, steps: int, dataset_scores: torch.Tensor, **kwargs
) -> _Snapshots:
    """Fit ForgettingSFT (SGD, constant lr) for `steps` steps on the fixed batch; the dataset's scores
    (normally read from the caches) are `dataset_scores`."""
    monkeypatch.setattr("lit_tokensel.methods.forgetting.dataset_scores", lambda *args: dataset_scores)
    module = ForgettingSFT(
        model=model_dir,
        optimizer=lambda p: torch.optim.SGD(p, lr=LR),
        lr_schedule="constant",
        warmup_ratio=0.0,
        **kwargs,
    )
    snapshots = _Snapshots()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[snapshots],
    )
    trainer.fit(module, train_dataloaders=DataLoader([_fixed_batch()] * steps, batch_size=None))
    return snapshots


def _model_at(model_dir: str, state: dict) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.load_state_dict(state)
    return model


def _sgd_step(model_dir: str, state: dict, loss_fn, batch: dict | None = None) -> tuple[dict, float]:
    """Independent SGD step on `loss_fn(per-token CE)` over `batch` (default: the fixed batch) from weights
    `state`: new weights and the loss."""
    model = _model_at(model_dir, state)
    loss = loss_fn(_ce(model, _fixed_batch() if batch is None else batch))
    loss.backward()
    with torch.no_grad():
        return {k: p - LR * p.grad for k, p in model.named_parameters()}, float(loss)


def _kth_largest(scores: torch.Tensor, ratio: float) -> float:
    ordered = sorted(scores.tolist(), reverse=True)
    return ordered[math.ceil(round(ratio * len(ordered), 9)) - 1]


# ---------------------------------------------------------------------------------------------- the loss


def test_loss_and_update_equal_hand_computation(tiny_model_dir, monkeypatch):
    batch = _fixed_batch()
    snapshots = _fit_fixed_batch(tiny_model_dir, monkeypatch, 3, _scores(batch), ratio=0.6, lambda_max=0.9)
    # independent: positives by sorting the scores; lambda = 0.9 * global_step / total at the third step
    score = batch["cached/base"] - batch["cached/reference"]
    valid = batch["labels"][:, 1:] != -100
    positive = (score >= _kth_largest(_scores(batch), 0.6)) & valid
    negative = valid & ~positive
    assert positive.any() and negative.any()
    lam = 0.9 * 2 / 3

    def objective(ce):
        return ce[positive].mean() - lam * ce[negative].mean()

    expected, loss = _sgd_step(tiny_model_dir, snapshots.before[2], objective)
    assert snapshots.metrics[2]["select/lambda"] == pytest.approx(lam)
    assert snapshots.metrics[2]["train/loss"] == pytest.approx(loss, abs=1e-5)
    assert snapshots.metrics[2]["select/positive_fraction"] == pytest.approx(
        float(positive.sum() / valid.sum())
    )
    for key, value in expected.items():
        torch.testing.assert_close(snapshots.after[2][key], value, rtol=1e-5, atol=1e-6)
    assert snapshots.metrics[0]["select/lambda"] == 0.0


def test_one_step_raises_negative_loss_and_lowers_positive_loss(tiny_model_dir, monkeypatch):
    batch = _fixed_batch()
    snapshots = _fit_fixed_batch(tiny_model_dir, monkeypatch, 2, _scores(batch), ratio=0.5, lambda_max=2.0)
    valid = batch["labels"][:, 1:] != -100
    positive = (batch["cached/base"] - batch["cached/reference"] >= _kth_largest(_scores(batch), 0.5)) & valid
    negative = valid & ~positive
    assert snapshots.metrics[1]["select/lambda"] == pytest.approx(1.0)
    with torch.no_grad():
        before = _ce(_model_at(tiny_model_dir, snapshots.before[1]), batch)
        after = _ce(_model_at(tiny_model_dir, snapshots.after[1]), batch)
    assert after[positive].mean() < before[positive].mean() - 1e-3
    assert after[negative].mean() > before[negative].mean() + 1e-3
    assert snapshots.metrics[1]["select/loss_negative"] == pytest.approx(
        float(before[negative].mean()), abs=1e-5
    )


def test_batch_without_negatives_is_plain_sft_and_without_positives_is_a_no_op(tiny_model_dir, monkeypatch):
    batch = _fixed_batch()
    # ratio = 1: every token is positive; the update is SGD on the mean CE of all response tokens
    snapshots = _fit_fixed_batch(tiny_model_dir, monkeypatch, 2, _scores(batch), ratio=1.0, lambda_max=1.0)
    valid = batch["labels"][:, 1:] != -100
    expected, loss = _sgd_step(tiny_model_dir, snapshots.before[1], lambda ce: ce[valid].mean())
    assert (
        snapshots.metrics[1]["select/negative_fraction"] == 0.0
        and "select/loss_negative" not in snapshots.metrics[1]
    )
    assert snapshots.metrics[1]["train/loss"] == pytest.approx(loss, abs=1e-5)
    for key, value in expected.items():
        torch.testing.assert_close(snapshots.after[1][key], value, rtol=1e-5, atol=1e-6)
    # a threshold above every score: all tokens negative, nothing to scale the ascent to -> zero update
    snapshots = _fit_fixed_batch(tiny_model_dir, monkeypatch, 2, torch.tensor([1e6]), lambda_max=1.0)
    assert snapshots.metrics[1]["select/positive_fraction"] == 0.0
    assert snapshots.metrics[1]["train/loss"] == 0.0
    for key, value in snapshots.before[1].items():
        assert torch.equal(snapshots.after[1][key], value)


def test_negative_loss_cap_is_the_gradient_of_clamped_ce(tiny_model_dir, monkeypatch):
    # pure function: the weighted sum has the gradient of mean(pos) - lam * mean(clamp(neg, max=cap))
    g = torch.Generator().manual_seed(0)
    losses = (torch.rand(3, 9, generator=g) * 8).requires_grad_()
    valid = torch.rand(3, 9, generator=g) < 0.8
    positive = valid & (torch.rand(3, 9, generator=g) < 0.5)
    negative = valid & ~positive
    cap, lam = 4.0, 0.7
    n_pos, n_neg = float(positive.sum()), float(negative.sum())
    weights = forgetting_weights(positive, negative, lam, n_pos, n_neg, losses, cap)
    ours = torch.autograd.grad((weights * losses * valid).sum() / n_pos, losses)[0]
    clamped = losses[positive].mean() - lam * losses.clamp(max=cap)[negative].mean()
    expected = torch.autograd.grad(clamped, losses)[0]
    torch.testing.assert_close(ours, expected)
    assert ((losses > cap) & negative).any() and (ours[(losses > cap) & negative] == 0).all()
    # in training: a cap below every token's loss leaves only the descent on positive tokens
    batch = _fixed_batch()
    snapshots = _fit_fixed_batch(
        tiny_model_dir, monkeypatch, 2, _scores(batch), ratio=0.5, lambda_max=2.0, negative_loss_cap=1e-3
    )
    valid = batch["labels"][:, 1:] != -100
    pos = (batch["cached/base"] - batch["cached/reference"] >= _kth_largest(_scores(batch), 0.5)) & valid
    expected_state, _ = _sgd_step(tiny_model_dir, snapshots.before[1], lambda ce: ce[pos].mean())
    for key, value in expected_state.items():
        torch.testing.assert_close(snapshots.after[1][key], value, rtol=1e-5, atol=1e-6)
    assert snapshots.metrics[1]["select/negative_capped"] == float((valid & ~pos).sum())


# ---------------------------------------------------------------------------------------------- gradient accumulation


def _shifted_batch(shift: float) -> dict:
    """The fixed batch with `shift` added to the influence of rows 0-1 (the first micro-batch)."""
    batch = _fixed_batch()
    valid = batch["labels"][:, 1:] != -100
    batch["cached/base"][:2] += shift * valid[:2]
    return batch


def _fit_accumulated(
    model_dir, monkeypatch, batch: dict, windows: int, dataset_scores: torch.Tensor, **kwargs
) -> _Snapshots:
    """Fit ForgettingSFT (SGD, constant lr) with `accumulate_grad_batches=2` for `windows` optimizer steps; each
    window is `batch` split into rows 0-1 and rows 2-3 (micro-batches of very different response lengths)."""
    monkeypatch.setattr("lit_tokensel.methods.forgetting.dataset_scores", lambda *args: dataset_scores)
    module = ForgettingSFT(
        model=model_dir,
        optimizer=lambda p: torch.optim.SGD(p, lr=LR),
        lr_schedule="constant",
        warmup_ratio=0.0,
        **kwargs,
    )
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    snapshots = _Snapshots()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=windows,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[snapshots],
    )
    trainer.fit(module, train_dataloaders=DataLoader(halves * windows, batch_size=None))
    assert trainer.global_step == windows
    return snapshots


def _partition(batch: dict, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent partition: positives by sorting the batch's scores (the batch is the whole dataset)."""
    valid = batch["labels"][:, 1:] != -100
    positive = (
        batch["cached/base"] - batch["cached/reference"] >= _kth_largest(_scores(batch), ratio)
    ) & valid
    return positive, valid & ~positive


def _assert_state(actual: dict, expected: dict) -> None:
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6)


def test_accumulated_update_equals_the_means_over_the_whole_window(tiny_model_dir, monkeypatch):
    """accumulate_grad_batches=2, micro-batches with different positive/negative ratios: the SGD step is that of
    `mean CE(pos) - lambda * mean CE(neg)` over the concatenated batch, each mean over the whole window. (The old
    per-micro-batch weighting, `-lambda * N_pos_k / N_neg_k`, fails this.)"""
    batch = _fixed_batch()
    positive, negative = _partition(batch, 0.6)
    counts = [(int(positive[rows].sum()), int(negative[rows].sum())) for rows in (slice(0, 2), slice(2, 4))]
    (pos_a, neg_a), (pos_b, neg_b) = counts
    assert min(pos_a, neg_a, pos_b, neg_b) > 0 and pos_a * neg_b != pos_b * neg_a, counts
    snapshots = _fit_accumulated(
        tiny_model_dir, monkeypatch, batch, 2, _scores(batch), ratio=0.6, lambda_max=0.9
    )
    # window 0: lambda 0, SGD on the positives' mean
    expected, loss = _sgd_step(tiny_model_dir, snapshots.before[0], lambda ce: ce[positive].mean(), batch)
    _assert_state(snapshots.after[1], expected)
    assert snapshots.metrics[1]["train/loss"] == pytest.approx(loss, abs=1e-5)
    # window 1: lambda = 0.9 * 1 / 2; the weights do not move inside the window
    lam = 0.45
    _assert_state(snapshots.after[2], snapshots.before[2])
    expected, loss = _sgd_step(
        tiny_model_dir, snapshots.before[2], lambda ce: ce[positive].mean() - lam * ce[negative].mean(), batch
    )
    _assert_state(snapshots.after[3], expected)
    assert snapshots.metrics[3]["select/lambda"] == pytest.approx(lam)
    assert snapshots.metrics[3]["train/loss"] == pytest.approx(loss, abs=1e-5)


@pytest.mark.parametrize(
    "shift", [100.0, -100.0], ids=["first-micro-batch-all-positive", "first-micro-batch-all-negative"]
)
def test_accumulated_micro_batch_without_negatives_or_positives(tiny_model_dir, monkeypatch, shift):
    """One micro-batch of the window has no negative (or no positive) token: still the window's two means."""
    batch = _shifted_batch(shift)
    positive, negative = _partition(batch, 0.6)
    first = negative[:2] if shift > 0 else positive[:2]
    assert not first.any() and positive[2:].any() and negative.any()
    snapshots = _fit_accumulated(
        tiny_model_dir, monkeypatch, batch, 2, _scores(batch), ratio=0.6, lambda_max=1.0
    )
    lam = 0.5
    expected, loss = _sgd_step(
        tiny_model_dir, snapshots.before[2], lambda ce: ce[positive].mean() - lam * ce[negative].mean(), batch
    )
    _assert_state(snapshots.after[3], expected)
    assert snapshots.metrics[3]["train/loss"] == pytest.approx(loss, abs=1e-5)


def test_accumulated_window_without_negatives_is_sft_and_without_positives_is_a_no_op(
    tiny_model_dir, monkeypatch
):
    batch = _fixed_batch()
    valid = batch["labels"][:, 1:] != -100
    snapshots = _fit_accumulated(
        tiny_model_dir, monkeypatch, batch, 2, _scores(batch), ratio=1.0, lambda_max=1.0
    )
    expected, loss = _sgd_step(tiny_model_dir, snapshots.before[2], lambda ce: ce[valid].mean(), batch)
    assert snapshots.metrics[3]["train/loss"] == pytest.approx(loss, abs=1e-5)
    _assert_state(snapshots.after[3], expected)
    # every token negative: nothing to scale the ascent to (as without accumulation) -> no update, no NaN
    snapshots = _fit_accumulated(tiny_model_dir, monkeypatch, batch, 2, torch.tensor([1e6]), lambda_max=1.0)
    assert snapshots.metrics[3]["select/positive_fraction"] == 0.0
    assert snapshots.metrics[3]["train/loss"] == 0.0
    for key, value in snapshots.before[2].items():
        assert torch.equal(snapshots.after[3][key], value)


def test_accumulated_negative_loss_cap_is_the_gradient_of_clamped_ce(tiny_model_dir, monkeypatch):
    batch = _fixed_batch()
    positive, negative = _partition(batch, 0.5)
    # the cap: between two middle negative losses at the weights the second window starts from (window 0 is
    # lambda 0, SGD on the positives' mean, computed here by hand), so the cap binds on some negatives only
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    second, _ = _sgd_step(tiny_model_dir, start, lambda ce: ce[positive].mean(), batch)
    with torch.no_grad():
        ordered = _ce(_model_at(tiny_model_dir, second), batch)[negative].sort().values
    middle = ordered.numel() // 2
    cap = float(ordered[middle - 1] + ordered[middle]) / 2
    assert float(ordered[middle] - ordered[middle - 1]) > 1e-4
    snapshots = _fit_accumulated(
        tiny_model_dir,
        monkeypatch,
        batch,
        2,
        _scores(batch),
        ratio=0.5,
        lambda_max=1.0,
        negative_loss_cap=cap,
    )
    with torch.no_grad():
        ce = _ce(_model_at(tiny_model_dir, snapshots.before[2]), batch)
    over = negative & (ce > cap)
    assert over.any() and (negative & ~over).any()
    lam = 0.5
    expected, _ = _sgd_step(
        tiny_model_dir,
        snapshots.before[2],
        lambda ce: ce[positive].mean() - lam * ce.clamp(max=cap)[negative].mean(),
        batch,
    )
    _assert_state(snapshots.after[3], expected)
    # logged like without accumulation: a capped token leaves the loss, the mean still runs over all negatives
    logged = ce[positive].mean() - lam * ce[negative & ~over].sum() / negative.sum()
    assert snapshots.metrics[3]["train/loss"] == pytest.approx(float(logged), abs=1e-5)
    capped = sum(snapshots.metrics[i]["select/negative_capped"] for i in (2, 3))
    assert capped == float(over.sum())


def test_accumulation_under_sharded_strategies_or_fp16_scaling_is_refused():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from lit_tokensel.methods.forgetting import check_accumulation_support

    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        check_accumulation_support(FSDPStrategy(), None, None)
    with pytest.raises(ValueError, match="FSDP2"):
        check_accumulation_support(DDPStrategy(), object(), None)  # ModelParallelStrategy's device mesh
    with pytest.raises(ValueError, match="16-mixed"):
        check_accumulation_support(DDPStrategy(), None, SimpleNamespace(scaler=object()))
    check_accumulation_support(DDPStrategy(), None, SimpleNamespace(scaler=None))


# ---------------------------------------------------------------------------------------------- with caches


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("forgetting")
    rows = QUICKSTART_TRAIN.read_text().splitlines()
    (path / "train.jsonl").write_text("\n".join(rows[:40]) + "\n")
    (path / "warmup.jsonl").write_text("\n".join(rows[100:124]) + "\n")
    return path


@pytest.fixture(scope="module")
def caches(tiny_model_dir: str, workdir: Path) -> dict[str, str]:
    """Base = the tiny model; reference = the tiny model with perturbed weights."""
    reference_dir = save_perturbed_copy(tiny_model_dir, workdir / "reference", seed=5)
    out = {}
    for name, model_dir in (("base", tiny_model_dir), ("reference", str(reference_dir))):
        out[name] = str(
            score_to_cache(
                FullSFT(model=model_dir),
                setup_datamodule(model_dir, workdir),
                workdir / f"cache-{name}",
                shard_size=16,
                progress=False,
            )
        )
    return out


def test_partition_threshold_equals_sorting_all_cached_scores(tiny_model_dir, caches, workdir):
    dm = setup_datamodule(tiny_model_dir, workdir, cached_losses=caches)
    module = ForgettingSFT(model=tiny_model_dir, ratio=0.7)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=0,
    )
    trainer.fit(module, datamodule=dm)  # on_fit_start: the threshold
    # independent: read the cache files by sample id, every response token of the dataset
    base, reference = TokenLossCache(caches["base"]), TokenLossCache(caches["reference"])
    everything = []
    for sample in dm.train_dataset:
        response = np.asarray(sample["labels"][1:]) != -100
        everything.append(base[sample["sample_id"]][response] - reference[sample["sample_id"]][response])
    everything = np.sort(np.concatenate(everything))[::-1]
    k = math.ceil(0.7 * everything.size)
    assert module.threshold == pytest.approx(float(everything[k - 1]), abs=1e-6)
    # shuffled batches join the partition by sample id: positives over an epoch are the global top 70%
    positives = 0
    for batch in dm.train_dataloader():
        valid = batch["labels"][:, 1:] != -100
        selection = module.select_tokens(batch, torch.zeros(valid.shape), valid)
        for row, sample_id in enumerate(batch["sample_id"].tolist()):
            n = int(batch["attention_mask"][row].sum()) - 1
            own = torch.from_numpy(base[sample_id] - reference[sample_id])  # [n]
            expected = (own >= module.threshold) & valid[row, :n]
            assert torch.equal(selection.weights[row, :n] > 0, expected)
        positives += int((selection.weights > 0).sum())
        assert torch.equal(selection.keep, valid)
    assert positives == k


def test_inspect_shows_the_partition_as_signed_weights(tiny_model_dir, caches, workdir, tmp_path):
    dm = SFTDataModule(
        train_file=str(workdir / "train.jsonl"),
        tokenizer=tiny_model_dir,
        batch_size=8,
        cache_dir=str(workdir / "hf"),
        cached_losses=caches,
    )
    module = ForgettingSFT(model=tiny_model_dir, ratio=0.7, lambda_max=0.25)
    out = inspect_selection(module, dm, tmp_path / "inspect.jsonl", limit=16, progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    base, reference = TokenLossCache(caches["base"]), TokenLossCache(caches["reference"])
    for first in (0, 8):  # two batches of 8 samples, in order
        batch = records[first : first + 8]
        positive = [
            [
                base[r["sample_id"]][j] - reference[r["sample_id"]][j] >= module.threshold
                for j in r["positions"]
            ]
            for r in batch
        ]
        n_pos = sum(map(sum, positive))
        n_neg = sum(map(len, positive)) - n_pos
        for record, signs in zip(batch, positive):
            assert all(record["keep"])
            for weight, is_positive in zip(record["weight"], signs):  # outside fit: the final lambda
                assert weight == pytest.approx(1.0 if is_positive else -0.25 * n_pos / n_neg, abs=1e-6)


class _LambdaRecorder(L.Callback):
    def __init__(self) -> None:
        self.values: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step has already moved on when this micro-batch closed a window
        self.values.append(float(trainer.callback_metrics["select/lambda"]))


class _StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def _fit_epochs(model_dir, workdir, caches, tmp_path, callbacks, ckpt_path=None) -> L.Trainer:
    L.seed_everything(0)
    module = ForgettingSFT(model=model_dir, lambda_max=0.6, learning_rate=1e-3)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        accumulate_grad_batches=2,
        limit_train_batches=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    trainer.fit(
        module, datamodule=setup_datamodule(model_dir, workdir, cached_losses=caches), ckpt_path=ckpt_path
    )
    return trainer


def test_lambda_schedule_is_the_same_after_resume(tiny_model_dir, caches, workdir, tmp_path):
    # 3 micro-batches per epoch, accumulate 2 -> 2 optimizer steps per epoch (the last window is short), 4 in all
    full = _LambdaRecorder()
    _fit_epochs(tiny_model_dir, workdir, caches, tmp_path, [full])
    steps = [0, 0, 1, 2, 2, 3]  # the optimizer step each micro-batch accumulates into
    assert full.values == pytest.approx([0.6 * s / 4 for s in steps])
    first, second = _LambdaRecorder(), _LambdaRecorder()
    trainer = _fit_epochs(tiny_model_dir, workdir, caches, tmp_path, [first, _StopAfterFirstEpoch()])
    assert trainer.global_step == 2
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = _fit_epochs(
        tiny_model_dir, workdir, caches, tmp_path, [second], ckpt_path=tmp_path / "epoch1.ckpt"
    )
    assert resumed.global_step == 4
    assert first.values + second.values == pytest.approx(full.values)


# ---------------------------------------------------------------------------------------------- the recipe


def test_recipe_runs_reference_scoring_and_training_in_sequence(
    tiny_model_dir, workdir, tmp_path, monkeypatch
):
    """The documented command sequence of configs/recipes/forgetting, in-process on a tiny model and data."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit-tokensel"])
    data = [
        "--data.train_file",
        str(workdir / "train.jsonl"),
        "--data.cache_dir",
        str(workdir / "hf"),
        "--data.batch_size",
        "8",
        "--trainer.enable_progress_bar",
        "false",
    ]
    main(
        [
            "fit",
            "-c",
            str(RECIPE / "reference.yaml"),
            "--model.init_args.model",
            tiny_model_dir,
            *data,
            "--data.train_file",
            str(workdir / "warmup.jsonl"),
            "--trainer.max_steps",
            "2",
        ]
    )
    reference_dir = tmp_path / "runs" / "forgetting" / "reference_model"
    main(
        [
            "score",
            "-c",
            str(RECIPE / "train.yaml"),
            "--model.init_args.model",
            tiny_model_dir,
            *data,
            "--output_dir",
            "runs/forgetting/cache/base",
        ]
    )
    main(
        [
            "score",
            "-c",
            str(RECIPE / "train.yaml"),
            "--model.init_args.model",
            str(reference_dir),
            *data,
            "--output_dir",
            "runs/forgetting/cache/reference",
        ]
    )
    main(
        [
            "fit",
            "-c",
            str(RECIPE / "train.yaml"),
            "--model.init_args.model",
            tiny_model_dir,
            *data,
            "--trainer.max_steps",
            "3",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.val_check_interval",
            "3",
        ]
    )

    base = TokenLossCache(tmp_path / "runs" / "forgetting" / "cache" / "base")
    reference = TokenLossCache(tmp_path / "runs" / "forgetting" / "cache" / "reference")
    assert base.complete and reference.complete
    assert reference.model_fingerprint.startswith(f"{reference_dir}@")
    gap = np.concatenate([base[i] - reference[i] for i in base.rows])
    assert gap.mean() > 0, "the warm-up must lower the reference's loss on the training data"
    rows = list(
        csv.DictReader((tmp_path / "runs" / "forgetting" / "forgetting" / "version_0" / "metrics.csv").open())
    )
    lambdas = [float(r["select/lambda"]) for r in rows if r.get("select/lambda")]
    assert lambdas == pytest.approx([0.0, 0.25 / 3, 0.5 / 3])
    fractions = [float(r["select/positive_fraction"]) for r in rows if r.get("select/positive_fraction")]
    assert len(fractions) == 3 and all(0 < f < 1 for f in fractions)
    assert (
        tmp_path / "runs" / "forgetting" / "forgetting" / "version_0" / "export" / "config.json"
    ).is_file()


def test_without_caches_the_error_names_the_fix(tiny_model_dir, workdir):
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match="data.cached_losses"):
        trainer.fit(ForgettingSFT(model=tiny_model_dir), datamodule=setup_datamodule(tiny_model_dir, workdir))


def test_invalid_arguments_are_config_errors():
    with pytest.raises(ValueError, match="ratio=0.0"):
        ForgettingSFT(ratio=0.0)
    with pytest.raises(ValueError, match="lambda_max"):
        ForgettingSFT(lambda_max=-1.0)
    with pytest.raises(ValueError, match="negative_loss_cap"):
        ForgettingSFT(negative_loss_cap=0.0)


def test_independent_ce_helper_matches_transformers_loss(tiny_model_dir):
    """Guard for the independent CE helper used above: it agrees with transformers' own loss."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = _fixed_batch()
    valid = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        ours = _ce(model, batch)[valid].mean()
        theirs = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
