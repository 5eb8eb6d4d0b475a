"""Non-finite values stop the run: training loss and gradient (FiniteGuard), reference losses, token-loss caches
(read and write), global thresholds and Forgetting's partition. Errors name the step, the samples and the source."""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_tokensel import FullSFT, Rho1SFT, TokenCleaningSFT
from lit_tokensel.cache import score_to_cache
from lit_tokensel.cache.store import CacheError, TokenLossCache, TokenLossCacheWriter
from lit_tokensel.callbacks.finite import FiniteGuard
from lit_tokensel.data import SFTDataModule
from lit_tokensel.methods.forgetting import ForgettingSFT
from lit_tokensel.reference import CachedReference, FrozenModelReference
from lit_tokensel.selection.finite import NonFiniteError
from lit_tokensel.selection.forgetting import partition_tokens
from lit_tokensel.selection.selectors import global_threshold, top_k_per_batch, top_k_per_sequence
from lit_tokensel.selection.token_loss import per_token_cross_entropy
from tests.model_fixtures import QUICKSTART_TRAIN, setup_datamodule


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("finite")
    (path / "train.jsonl").write_text("\n".join(QUICKSTART_TRAIN.read_text().splitlines()[:32]) + "\n")
    return path


@pytest.fixture(scope="module")
def nan_model_dir(tiny_model_dir: str, workdir: Path) -> str:
    """The tiny model with one NaN in its output head: every token's loss is NaN."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = math.nan
    target = workdir / "nan-model"
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(target)
    return str(target)


@pytest.fixture(scope="module")
def good_cache(tiny_model_dir: str, workdir: Path) -> str:
    return str(
        score_to_cache(
            FullSFT(model=tiny_model_dir),
            setup_datamodule(tiny_model_dir, workdir),
            workdir / "cache-good",
            shard_size=16,
            progress=False,
        )
    )


@pytest.fixture(scope="module")
def nan_cache(good_cache: str, workdir: Path) -> tuple[str, int]:
    """A complete, checksummed copy of `good_cache` with NaN at one response position of sample 20 (shard 1):
    what `score` wrote before it refused NaN. Returns the directory and the bad sample's id."""
    good = TokenLossCache(good_cache)
    manifest = good.manifest
    writer = TokenLossCacheWriter(
        workdir / "cache-nan", good.fingerprint, good.split, manifest["shard_size"], manifest["num_samples"]
    )
    bad_id = 20
    # The writer refuses NaN rows itself now; this cache stands for one written before it did.
    patch = pytest.MonkeyPatch()
    patch.setattr(np, "isfinite", lambda values: np.ones(np.shape(values), dtype=bool))
    try:
        _write_all(writer, good, bad_id)
    finally:
        patch.undo()
    return str(writer.path), bad_id


def _write_all(writer: TokenLossCacheWriter, good: TokenLossCache, bad_id: int) -> None:
    for index in range(writer.num_shards):
        ids = sorted(good.rows)[index * writer.shard_size : (index + 1) * writer.shard_size]
        rows = [good.rows[i].copy() for i in ids]
        if bad_id in ids:
            row = rows[ids.index(bad_id)]
            row[int(np.flatnonzero(row)[0])] = np.nan  # a response position (losses are 0 elsewhere)
        writer.write_shard(index, ids, rows)


def _datamodule(model_dir: str, workdir: Path, **kwargs) -> SFTDataModule:
    """Batches of 4 of the 32 rows (8 steps an epoch), seeded order."""
    dm = SFTDataModule(
        train_file=str(workdir / "train.jsonl"),
        tokenizer=model_dir,
        batch_size=4,
        seed=0,
        cache_dir=str(workdir / "hf"),
        **kwargs,
    )
    dm.setup("fit")
    return dm


def _trainer(**kwargs) -> L.Trainer:
    kwargs.setdefault("max_steps", 6)
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


class _StepRecorder(L.Callback):
    """Sample ids of each optimizer step's batch, and the weights before each step."""

    def __init__(self) -> None:
        self.ids: dict[int, list[int]] = {}
        self.batches: dict[int, dict] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids[trainer.global_step] = batch["sample_id"].tolist()
        self.batches[trainer.global_step] = {k: v.clone() for k, v in batch.items()}
        self.weights[trainer.global_step] = {
            k: v.detach().clone() for k, v in pl_module.model.state_dict().items()
        }


# ------------------------------------------------------------------------------------------- training guard


def test_learning_rate_1e3_stops_within_one_optimizer_step(tiny_model_dir, workdir):
    L.seed_everything(0)
    module = FullSFT(model=tiny_model_dir, learning_rate=1e3, lr_schedule="constant", warmup_ratio=0.0)
    recorder = _StepRecorder()
    trainer = _trainer(callbacks=[recorder])
    with pytest.raises(NonFiniteError) as error:
        trainer.fit(module, datamodule=_datamodule(tiny_model_dir, workdir))
    step = trainer.global_step
    message = str(error.value)
    assert f"at optimizer step {step}" in message and "source: the " in message and tiny_model_dir in message
    assert str(recorder.ids[step]) in message  # the step's sample ids
    # no non-finite update reached the weights
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    # independent: with the weights the step started from, a plain forward/backward on its batch is non-finite,
    # and every earlier step's was finite
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for s in range(step + 1):
        model.load_state_dict(recorder.weights[s])
        model.zero_grad()
        batch = recorder.batches[s]
        losses, valid = per_token_cross_entropy(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )
        loss = losses[valid].sum()
        loss.backward()
        finite = bool(torch.isfinite(loss)) and all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert finite == (s < step), f"step {s}"
    assert step == 1  # measured: step 0 is finite (loss 136), step 1's gradient is NaN


def test_skip_option_drops_nonfinite_steps_and_counts_them(tiny_model_dir, workdir):
    L.seed_everything(0)
    module = FullSFT(model=tiny_model_dir, learning_rate=1e3, lr_schedule="constant", warmup_ratio=0.0)
    recorder, guard = _StepRecorder(), FiniteGuard(on_nonfinite="skip")
    trainer = _trainer(callbacks=[recorder, guard])
    with pytest.warns(UserWarning, match="skipped optimizer step 1 "):
        trainer.fit(module, datamodule=_datamodule(tiny_model_dir, workdir))
    assert trainer.global_step == 6 and all(torch.isfinite(p).all() for p in module.model.parameters())
    assert [c for c in trainer.callbacks if isinstance(c, FiniteGuard)] == [guard]  # no second, default guard
    recorder.weights[6] = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    unchanged = [
        s
        for s in range(6)
        if all(torch.equal(recorder.weights[s][k], recorder.weights[s + 1][k]) for k in recorder.weights[s])
    ]
    assert 1 in unchanged and guard.skipped_steps == len(unchanged)  # a skipped step changes no weight
    assert float(trainer.callback_metrics["train/skipped_nonfinite_steps"]) == guard.skipped_steps
    assert guard.state_dict() == {"skipped_steps": guard.skipped_steps}


def test_guard_is_added_by_default_and_refuses_unknown_modes(tiny_model_dir, workdir):
    module = FullSFT(model=tiny_model_dir)
    trainer = _trainer(max_steps=1)
    trainer.fit(module, datamodule=_datamodule(tiny_model_dir, workdir))
    assert [c.on_nonfinite for c in trainer.callbacks if isinstance(c, FiniteGuard)] == ["error"]
    with pytest.raises(ValueError, match="on_nonfinite='ignore'"):
        FiniteGuard(on_nonfinite="ignore")


# ------------------------------------------------------------------------------------------- references


def test_nan_frozen_reference_is_named_with_step_and_samples(tiny_model_dir, nan_model_dir, workdir):
    L.seed_everything(0)
    module = Rho1SFT(reference=FrozenModelReference(model=nan_model_dir), model=tiny_model_dir)
    recorder = _StepRecorder()
    with pytest.raises(NonFiniteError) as error:
        _trainer(callbacks=[recorder]).fit(module, datamodule=_datamodule(tiny_model_dir, workdir))
    message = str(error.value)
    assert "reference token losses" in message and "at optimizer step 0" in message
    assert f"FrozenModelReference(model={nan_model_dir!r}" in message
    assert f"sample_id {recorder.ids[0]}" in message


def test_score_refuses_to_write_nonfinite_losses(nan_model_dir, tiny_model_dir, workdir):
    out = workdir / "cache-from-nan-model"
    with pytest.raises(CacheError, match=r"the losses of \d+ sample\(s\) are NaN or inf"):
        score_to_cache(
            FullSFT(model=nan_model_dir),
            setup_datamodule(tiny_model_dir, workdir),
            out,
            shard_size=16,
            progress=False,
        )
    assert not list(out.glob("shard-*.parquet"))  # nothing written that a method could read


def _fit_with_caches(module, tiny_model_dir, workdir, caches):
    dm = _datamodule(tiny_model_dir, workdir, cached_losses=caches)
    _trainer(max_steps=2).fit(module, datamodule=dm)


@pytest.mark.parametrize("method", ["token_cleaning", "forgetting", "rho1"])
def test_nan_cache_is_refused_naming_the_shard(method, tiny_model_dir, workdir, good_cache, nan_cache):
    path, bad_id = nan_cache
    module = {
        "token_cleaning": lambda: TokenCleaningSFT(model=tiny_model_dir),
        "forgetting": lambda: ForgettingSFT(model=tiny_model_dir),
        "rho1": lambda: Rho1SFT(reference=CachedReference("reference"), model=tiny_model_dir),
    }[method]()
    caches = {"reference": path} if method == "rho1" else {"base": good_cache, "reference": path}
    with pytest.raises(CacheError) as error:
        _fit_with_caches(module, tiny_model_dir, workdir, caches)
    message = str(error.value)
    assert f"{path}/shard-00001.parquet holds 1 non-finite losses" in message
    assert f"at sample_id {bad_id}," in message and "lit-tokensel score" in message


def test_cached_reference_names_its_cache_directory(tiny_model_dir, workdir, good_cache):
    """Defence in depth behind the read check: NaN joined into a batch is refused naming the cache."""
    module = Rho1SFT(reference=CachedReference("reference"), model=tiny_model_dir)
    dm = _datamodule(tiny_model_dir, workdir, cached_losses={"reference": good_cache})
    trainer = _trainer(max_steps=1)
    trainer.fit(module, datamodule=dm)
    batch = next(iter(dm.train_dataloader()))
    valid = batch["labels"][:, 1:] != -100
    batch["cached/reference"][valid.nonzero()[0].tolist()[0], valid.nonzero()[0].tolist()[1]] = math.inf
    with pytest.raises(
        NonFiniteError, match=re.escape(f"CachedReference(name='reference'), token-loss cache {good_cache}")
    ):
        module.reference.token_losses(module, batch)


# ------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_global_threshold_refuses_nonfinite_scores(bad):
    scores = torch.arange(10, dtype=torch.float32)
    assert global_threshold(scores, 0.6) == 4.0  # control: top 6 of 0..9
    scores[3] = bad
    with pytest.raises(
        NonFiniteError, match="global_threshold: 1 (NaN|inf) among the dataset's 10 token scores"
    ):
        global_threshold(scores, 0.6)


def test_forgetting_partition_refuses_nonfinite_scores_and_threshold():
    scores = torch.tensor([[0.5, -1.0, 2.0]])
    valid = torch.tensor([[True, True, False]])
    positive, negative = partition_tokens(scores, valid, 0.0)
    assert positive.tolist() == [[True, False, False]] and negative.tolist() == [[False, True, False]]
    assert (
        partition_tokens(torch.tensor([[0.5, -1.0, math.nan]]), valid, 0.0)[0].tolist() == positive.tolist()
    )
    with pytest.raises(NonFiniteError, match="1 NaN"):
        partition_tokens(torch.tensor([[0.5, math.nan, 2.0]]), valid, 0.0)
    with pytest.raises(NonFiniteError, match="threshold is nan"):
        partition_tokens(scores, valid, math.nan)


@pytest.mark.parametrize("select", [top_k_per_sequence, top_k_per_batch])
def test_top_k_refuses_nonfinite_scores_at_response_positions(select):
    valid = torch.tensor([[True, True, False]])
    assert select(torch.tensor([[1.0, 2.0, math.inf]]), valid, 0.5).tolist() == [[False, True, False]]
    with pytest.raises(NonFiniteError, match="1 inf"):
        select(torch.tensor([[math.inf, 2.0, 0.0]]), valid, 0.5)
