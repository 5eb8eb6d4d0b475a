"""Rho-1 and TokenCleaning against independent computations; random and Rho-1 in a short fit."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_tokensel import FullSFT, RandomTokenSFT, Rho1SFT, TokenCleaningSFT
from lit_tokensel.cache import score_to_cache
from lit_tokensel.reference import CachedReference, FrozenModelReference
from lit_tokensel.selection.token_loss import per_token_cross_entropy
from tests.model_fixtures import QUICKSTART_TRAIN, save_perturbed_copy, setup_datamodule


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("methods")
    rows = QUICKSTART_TRAIN.read_text().splitlines()[:40]
    (path / "train.jsonl").write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def reference_dir(tiny_model_dir: str, workdir: Path) -> str:
    """The tiny model with perturbed weights: a different model on the same tokenizer."""
    return save_perturbed_copy(tiny_model_dir, workdir / "reference", seed=5)


@pytest.fixture(scope="module")
def caches(tiny_model_dir: str, reference_dir: str, workdir: Path) -> dict[str, str]:
    out = {}
    for name, model_dir in (("base", tiny_model_dir), ("reference", reference_dir)):
        module = FullSFT(model=model_dir)
        out[name] = str(
            score_to_cache(
                module,
                setup_datamodule(model_dir, workdir),
                workdir / f"cache-{name}",
                shard_size=16,
                progress=False,
            )
        )
    return out


def _independent_losses(model_dir: str, batch: dict) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_token_cross_entropy(logits, batch["labels"])[0]


def _top_k_by_sort(scores: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    entries = sorted(
        (-float(scores[b, t]), b * scores.shape[1] + t)
        for b in range(scores.shape[0])
        for t in range(scores.shape[1])
        if valid[b, t]
    )
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[[i for _, i in entries[: -(-len(entries) * int(ratio * 10) // 10)]]] = True
    return keep.view_as(scores)


def test_rho1_live_and_cached_reference_select_the_same_tokens(
    tiny_model_dir, reference_dir, caches, workdir
):
    dm = setup_datamodule(tiny_model_dir, workdir, cached_losses={"reference": caches["reference"]})
    batch = next(iter(dm.train_dataloader()))
    live = Rho1SFT(reference=FrozenModelReference(model=reference_dir), model=tiny_model_dir)
    cached = Rho1SFT(reference=CachedReference(name="reference"), model=tiny_model_dir)
    selections = []
    for module in (live, cached):
        module.configure_model()
        losses, valid = module.token_losses(batch)
        selections.append(module.select_tokens(batch, losses, valid))
    assert torch.equal(selections[0].keep, selections[1].keep)
    # independent: excess loss from two separately loaded models, top 60% of the batch by sorting
    excess = _independent_losses(tiny_model_dir, batch) - _independent_losses(reference_dir, batch)
    torch.testing.assert_close(selections[0].scores["excess_loss"], excess, rtol=1e-5, atol=1e-5)
    assert torch.equal(selections[0].keep, _top_k_by_sort(excess, valid, 0.6))


def test_rho1_reference_is_outside_parameters_and_checkpoint(tiny_model_dir, reference_dir):
    module = Rho1SFT(reference=FrozenModelReference(model=reference_dir), model=tiny_model_dir)
    module.configure_model()
    n_model = sum(p.numel() for p in module.model.parameters())
    assert sum(p.numel() for p in module.parameters()) == n_model
    assert all(key.startswith("model.") for key in module.state_dict())


def test_token_cleaning_global_threshold_equals_sorting_all_scores(
    tiny_model_dir, reference_dir, caches, workdir
):
    dm = setup_datamodule(tiny_model_dir, workdir, cached_losses=caches)
    module = TokenCleaningSFT(model=tiny_model_dir, ratio=0.6)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=0,
    )
    trainer.fit(module, datamodule=dm)  # runs on_fit_start: the threshold
    # independent: every response token's L_base - L_ref, from full forwards of both models
    all_scores, kept = [], 0
    for batch in torch.utils.data.DataLoader(dm.train_dataset, batch_size=8, collate_fn=dm.collator):
        valid = batch["labels"][:, 1:] != -100
        score = _independent_losses(tiny_model_dir, batch) - _independent_losses(reference_dir, batch)
        all_scores.append(score[valid])
    everything = torch.cat(all_scores)
    k = -(-everything.numel() * 6 // 10)
    kth = torch.sort(everything, descending=True).values[k - 1]
    assert module.threshold == pytest.approx(float(kth), abs=1e-5)
    # over the whole epoch the cached batches keep the global top 60%
    for batch in dm.train_dataloader():
        losses = torch.zeros(batch["labels"].shape[0], batch["labels"].shape[1] - 1)
        kept += int(module.select_tokens(batch, losses, batch["labels"][:, 1:] != -100).keep.sum())
    assert abs(kept - k) <= 2  # float32 cache vs float64 sort: at most a tie at the boundary


def test_token_cleaning_without_caches_names_the_fix(tiny_model_dir, workdir):
    dm = setup_datamodule(tiny_model_dir, workdir)
    module = TokenCleaningSFT(model=tiny_model_dir)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match="data.cached_losses"):
        trainer.fit(module, datamodule=dm)


@pytest.mark.parametrize("method", ["random", "rho1"])
def test_short_fit_keeps_the_ratio_and_logs_selection_stats(
    method, tiny_model_dir, reference_dir, workdir, tmp_path
):
    if method == "random":
        module = RandomTokenSFT(model=tiny_model_dir, ratio=0.5, learning_rate=1e-3)
    else:
        module = Rho1SFT(
            reference=FrozenModelReference(model=reference_dir),
            model=tiny_model_dir,
            ratio=0.5,
            learning_rate=1e-3,
        )
    dm = setup_datamodule(tiny_model_dir, workdir)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    assert 0.5 <= float(metrics["train/kept_fraction"]) < 0.56  # ceil per sequence/batch rounds up
    assert float(metrics["select/loss_kept"]) > 0 and torch.isfinite(metrics["train/loss"])
    if method == "rho1":  # Rho-1 keeps the tokens the reference finds easier than the model does
        assert float(metrics["select/loss_kept"]) > float(metrics["select/loss_dropped"])
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert {"select/score_q50", "select/kept_fraction", "train/loss"} <= set(header.split(","))
    json.dumps({k: float(v) for k, v in metrics.items()})


def test_rho1_checkpoint_stores_plain_reference_config_and_exports(
    tiny_model_dir, reference_dir, workdir, tmp_path
):
    from lit_tokensel.export import export_checkpoint

    module = Rho1SFT(
        reference=FrozenModelReference(model=reference_dir), model=tiny_model_dir, learning_rate=1e-3
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=setup_datamodule(tiny_model_dir, workdir))
    checkpoint_path = tmp_path / "rho1.ckpt"
    trainer.save_checkpoint(checkpoint_path)
    stored = torch.load(checkpoint_path, weights_only=True)["hyper_parameters"][
        "reference"
    ]  # plain data only
    assert stored["init_args"]["model"] == reference_dir
    out = export_checkpoint(str(checkpoint_path), str(tmp_path / "export"))
    batch = next(
        iter(
            setup_datamodule(tiny_model_dir, workdir).val_dataloader()
            or torch.utils.data.DataLoader(
                module.trainer.datamodule.train_dataset,
                batch_size=4,
                collate_fn=module.trainer.datamodule.collator,
            )
        )
    )
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        exported = AutoModelForCausalLM.from_pretrained(out)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    torch.testing.assert_close(exported, expected)
