"""`lit-tokensel inspect`: per-sample JSON lines that match an independent selection, and checkpoint loading."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_tokensel import FullSFT, Rho1SFT
from lit_tokensel.cli import main
from lit_tokensel.data import SFTDataModule
from lit_tokensel.inspection import inspect_selection
from lit_tokensel.reference import FrozenModelReference
from lit_tokensel.selection.token_loss import per_token_cross_entropy
from tests.model_fixtures import QUICKSTART_TRAIN, save_perturbed_copy


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inspect")
    (path / "train.jsonl").write_text("\n".join(QUICKSTART_TRAIN.read_text().splitlines()[:24]) + "\n")
    return path


@pytest.fixture(scope="module")
def reference_dir(tiny_model_dir: str, workdir: Path) -> str:
    return save_perturbed_copy(tiny_model_dir, workdir / "reference", seed=7)


def _datamodule(model_dir: str, workdir: Path) -> SFTDataModule:
    return SFTDataModule(
        train_file=str(workdir / "train.jsonl"),
        tokenizer=model_dir,
        batch_size=8,
        cache_dir=str(workdir / "hf"),
    )


def _losses(model_dir: str, batch: dict) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_token_cross_entropy(logits, batch["labels"])[0]  # [B, T-1]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rho1_inspect_matches_an_independent_batch_top_k(tiny_model_dir, reference_dir, workdir):
    out = inspect_selection(
        Rho1SFT(reference=FrozenModelReference(model=reference_dir), model=tiny_model_dir, ratio=0.5),
        _datamodule(tiny_model_dir, workdir),
        workdir / "rho1.jsonl",
        limit=16,
        progress=False,
    )
    records = _read(out)
    assert [r["sample_id"] for r in records] == list(range(16))
    assert not out.with_name(out.name + ".partial").exists()
    dm = _datamodule(tiny_model_dir, workdir)
    dm.setup("fit")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batches = [dm.collator([dm.train_dataset[i] for i in range(start, start + 8)]) for start in (0, 8)]
    for b, batch in enumerate(batches):
        excess = _losses(tiny_model_dir, batch) - _losses(reference_dir, batch)  # [B, T-1]
        valid = batch["labels"][:, 1:] != -100
        flat = [
            (-float(excess[i, t]), i, t)
            for i in range(excess.shape[0])
            for t in range(excess.shape[1])
            if valid[i, t]
        ]
        chosen = {(i, t) for _, i, t in sorted(flat)[: -(-len(flat) // 2)]}  # ceil(0.5 * n), ties: earlier
        for i in range(excess.shape[0]):
            record = records[b * 8 + i]
            positions = valid[i].nonzero().flatten().tolist()
            assert record["positions"] == positions
            targets = batch["labels"][i, 1:][positions].tolist()
            assert record["tokens"] == tokenizer.convert_ids_to_tokens(targets)
            assert record["keep"] == [(i, t) in chosen for t in positions]
            assert record["scores"]["excess_loss"] == pytest.approx(excess[i, positions].tolist(), abs=1e-4)


def test_inspect_cli_loads_the_checkpoint_weights(tiny_model_dir, workdir, tmp_path):
    module = FullSFT(model=tiny_model_dir, learning_rate=5e-2)
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=_datamodule(tiny_model_dir, workdir))
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    out = tmp_path / "inspect.jsonl"
    args = [
        "--model.class_path",
        "lit_tokensel.FullSFT",
        "--model.init_args.model",
        tiny_model_dir,
        "--data.train_file",
        str(workdir / "train.jsonl"),
        "--data.batch_size",
        "8",
        "--data.cache_dir",
        str(workdir / "hf"),
        "--trainer.logger",
        "false",
    ]
    main(
        [
            "inspect",
            *args,
            "--output",
            str(out),
            "--limit",
            "3",
            "--ckpt_path",
            str(tmp_path / "trained.ckpt"),
        ]
    )
    records = _read(out)
    assert len(records) == 3 and all(r["step"] == 3 for r in records)
    assert all(all(r["keep"]) for r in records)  # full SFT keeps every response token
    dm = _datamodule(tiny_model_dir, workdir)
    dm.setup("fit")
    batch = dm.collator([dm.train_dataset[i] for i in range(3)])
    with torch.no_grad():
        module.eval()
        trained = per_token_cross_entropy(
            module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )[0]
    untrained = _losses(tiny_model_dir, batch)
    for i, record in enumerate(records):
        assert record["loss"] == pytest.approx(trained[i, record["positions"]].tolist(), abs=1e-4)
        assert record["loss"] != pytest.approx(untrained[i, record["positions"]].tolist(), abs=1e-3)


def test_inspect_rejects_a_bad_limit(tiny_model_dir, workdir):
    with pytest.raises(ValueError, match="limit=0"):
        inspect_selection(
            FullSFT(model=tiny_model_dir), _datamodule(tiny_model_dir, workdir), workdir / "x.jsonl", limit=0
        )


def test_inspect_prints_a_summary_that_matches_its_file(
    tiny_model_dir, reference_dir, workdir, tmp_path, capsys, monkeypatch
):
    import numpy as np

    from lit_tokensel.inspection import SUMMARY_QUANTILES

    monkeypatch.setattr("sys.argv", ["lit-tokensel"])
    args = [
        "--model.class_path",
        "lit_tokensel.Rho1SFT",
        "--model.init_args.model",
        tiny_model_dir,
        "--model.init_args.ratio",
        "0.5",
        "--data.train_file",
        str(workdir / "train.jsonl"),
        "--data.batch_size",
        "8",
        "--data.cache_dir",
        str(workdir / "hf"),
        "--trainer.logger",
        "false",
    ]
    for reference, out in (
        (reference_dir, tmp_path / "rho1.jsonl"),
        (tiny_model_dir, tmp_path / "same.jsonl"),
    ):
        main(
            [
                "inspect",
                *args,
                "--model.init_args.reference",
                json.dumps(
                    {
                        "class_path": "lit_tokensel.reference.FrozenModelReference",
                        "init_args": {"model": reference},
                    }
                ),
                "--output",
                str(out),
                "--limit",
                "8",
            ]
        )
        records = _read(out)
        keep = [k for r in records for k in r["keep"]]
        scores = np.array([s for r in records for s in r["scores"]["excess_loss"]])
        err = capsys.readouterr().err
        assert (
            f"8 samples, {len(keep)} response tokens, kept {sum(keep)} ({100 * sum(keep) / len(keep):.1f}%)"
            in err
        )
        spread = "  ".join(
            f"q{round(100 * q)}={v:.4g}"
            for q, v in zip(SUMMARY_QUANTILES, np.quantile(scores, SUMMARY_QUANTILES))
        )
        assert f"score excess_loss: {spread}" in err
        assert ("every score is equal" in err) == (reference == tiny_model_dir)  # the README's old example
