"""`lit-tokensel recipe`: the TokenCleaning pipeline end to end on a tiny model, resume, skipping, misuse."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_tokensel.cache import TokenLossCache
from lit_tokensel.cli import build_cli, main
from lit_tokensel.data import SFTDataModule
from lit_tokensel.recipes import RecipeError, RecipeOptions, run_recipe, stages
from lit_tokensel.recipes.registry import CONFIGS
from lit_tokensel.selection.token_loss import per_token_cross_entropy
from tests.model_fixtures import QUICKSTART_TRAIN

NUM_ROWS = 16


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe_data") / "train.jsonl"
    path.write_text("\n".join(QUICKSTART_TRAIN.read_text().splitlines()[:NUM_ROWS]) + "\n")
    return path


@pytest.fixture
def base_args(tiny_model_dir: str, train_file: Path) -> list[str]:
    """The base run, as a user would give it: model, its training settings, data (with a hold-out), trainer."""
    return [
        "--model.class_path",
        "lit_tokensel.FullSFT",
        "--model.init_args.model",
        tiny_model_dir,
        "--model.init_args.learning_rate",
        "2e-2",
        "--model.init_args.warmup_ratio",
        "0",
        "--data.train_file",
        str(train_file),
        "--data.max_length",
        "96",
        "--data.batch_size",
        "4",
        "--data.val_fraction",
        "0.25",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.log_every_n_steps",
        "1",
    ]


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-tokensel"])


def mtimes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and p.name != "recipe.json"
    }


def test_fixed_recipe_end_to_end_continues_after_an_interruption_and_skips_finished_stages(
    base_args, tiny_model_dir, tmp_path, monkeypatch
):
    workdir = tmp_path / "tc"
    options = RecipeOptions(workdir=str(workdir), warmup_size=6, shard_size=8)
    real_score = stages.score

    def interrupted(cli, output, *rest):
        if output.name == "reference":
            raise KeyboardInterrupt("simulated crash while scoring the reference")
        return real_score(cli, output, *rest)

    monkeypatch.setattr(stages, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_recipe("token-cleaning", base_args, options, build_cli)
    assert (
        json.loads((workdir / "recipe.json").read_text())["stages"]["cache_reference"]["status"] == "running"
    )
    before = mtimes(workdir)
    monkeypatch.setattr(stages, "score", real_score)
    summary = run_recipe("token-cleaning", base_args, options, build_cli)  # continues: stages 1-3 are done
    after = mtimes(workdir)
    assert all(after[name] == stamp for name, stamp in before.items()), "finished stages must not be redone"

    # 1. warm-up subset: 6 distinct training rows, none from the validation hold-out
    dm = SFTDataModule(
        train_file=base_args[base_args.index("--data.train_file") + 1],
        tokenizer=tiny_model_dir,
        val_fraction=0.25,
        max_length=96,
    )
    dm.setup("fit")
    warmup = [json.loads(line) for line in (workdir / "warmup.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in QUICKSTART_TRAIN.read_text().splitlines()[:NUM_ROWS]]
    val_rows = [rows[i] for i in dm.val_dataset["sample_id"]]
    assert len(warmup) == 6 and all(r in rows and r not in val_rows for r in warmup)
    # 2. the reference is a trained export of the base
    reference = AutoModelForCausalLM.from_pretrained(summary["reference_export"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(reference.lm_head.weight, base.lm_head.weight)
    # 3. both caches cover the training split; the reference cache holds the export's own losses
    caches = {name: TokenLossCache(path) for name, path in summary["caches"].items()}
    assert all(
        c.complete and sorted(c.rows) == sorted(dm.train_dataset["sample_id"]) for c in caches.values()
    )
    assert caches["reference"].fingerprint == {
        **caches["base"].fingerprint,
        "model": caches["reference"].model_fingerprint,
    }
    batch = dm.collator([dm.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        expected = per_token_cross_entropy(
            reference.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )[0]
    for row, sample_id in enumerate(batch["sample_id"].tolist()):
        n = int(batch["attention_mask"][row].sum()) - 1
        torch.testing.assert_close(
            torch.tensor(caches["reference"][sample_id]), expected[row, :n], atol=1e-4, rtol=0
        )
    # 4. the final run: TokenCleaningSFT on both caches, checkpoint and export
    checkpoint = torch.load(summary["checkpoint"], weights_only=False)
    assert checkpoint["method_class"] == "lit_tokensel.methods.token_cleaning.TokenCleaningSFT"
    assert checkpoint["hyper_parameters"]["model"] == tiny_model_dir  # the base, not the method config's
    assert checkpoint["global_step"] == 3  # 12 training rows / batch 4, one epoch
    assert (Path(summary["export"]) / "model.safetensors").is_file()
    assert summary["stages"]["train"]["metrics"]["select/kept_fraction"] < 0.9
    assert (workdir / "train" / "logs" / "metrics.csv").is_file()

    # a re-run (through the command line) skips every stage: nothing trains, scores or writes
    monkeypatch.setattr(stages, "score", lambda *a: pytest.fail("a finished cache was scored again"))
    monkeypatch.setattr(stages.TrainRun, "run", lambda *a: pytest.fail("a finished run was trained again"))
    main(
        [
            "recipe",
            "token-cleaning",
            "--workdir",
            str(workdir),
            "--warmup_size",
            "6",
            "--shard_size",
            "8",
            *base_args,
        ]
    )
    assert mtimes(workdir) == after

    # a crash after the final checkpoint but before the export: the re-run resumes from resume/last.ckpt
    monkeypatch.undo()
    monkeypatch.setattr(sys, "argv", ["lit-tokensel"])
    for file in Path(summary["export"]).iterdir():
        file.unlink()
    again = run_recipe("token-cleaning", base_args, options, build_cli)
    assert again["stages"]["train"]["resumed_from"] == summary["checkpoint"]
    assert (
        again["stages"]["train"]["global_step"] == 3
        and (Path(summary["export"]) / "model.safetensors").is_file()
    )

    # a changed base run is refused, naming what changed
    changed = [*base_args, "--model.init_args.learning_rate", "1e-3"]
    with pytest.raises(
        RecipeError,
        match=r"reference was run with another configuration \(differs in: "
        r"model.init_args.learning_rate\)",
    ):
        run_recipe("token-cleaning", changed, options, build_cli)
    # an earlier stage that must run again while later outputs exist is refused, not run over them
    (workdir / "warmup.jsonl").unlink()
    with pytest.raises(
        RecipeError,
        match=r"stage warmup_data must run, but outputs of later stages exist .*"
        r"reference.*cache/base.*cache/reference.*train",
    ):
        run_recipe("token-cleaning", base_args, options, build_cli)


def test_self_evolving_recipe_scores_only_the_base_and_trains_one_round_per_chunk(base_args, tmp_path):
    workdir = tmp_path / "se"
    summary = run_recipe(
        "token-cleaning",
        base_args,
        RecipeOptions(workdir=str(workdir), variant="self-evolving", chunks=2, shard_size=8),
        build_cli,
    )
    assert list(summary["stages"]) == ["cache_base", "train"]
    assert summary["reference_export"] is None and list(summary["caches"]) == ["base"]
    assert not (workdir / "reference").exists() and not (workdir / "cache" / "reference").exists()
    checkpoint = torch.load(summary["checkpoint"], weights_only=False)
    assert checkpoint["method_class"].endswith("SelfEvolvingTokenCleaningSFT")
    assert checkpoint["hyper_parameters"]["chunks"] == 2 and checkpoint["epoch"] == 1
    assert checkpoint["self_evolving_round"]["epoch"] == 1  # the last round's scores travel with it
    metrics = summary["stages"]["train"]["metrics"]
    assert metrics["select/round"] == 1 and "select/chunk_threshold" in metrics
    config = (workdir / "train" / "config.yaml").read_text()
    assert "epoch_chunks: 2" in config and "max_epochs: 2" in config


@pytest.mark.parametrize(
    ("variant", "options", "message"),
    [
        ("fixed", {}, "pass exactly one of --warmup_file, --warmup_size, --warmup_fraction"),
        ("self-evolving", {"warmup_size": 4}, r"needs no reference model; drop \['warmup_size'\]"),
        ("fixed", {"warmup_size": 4, "chunks": 3}, "--chunks applies to chunked recipes"),
        (
            "fixed",
            {"warmup_size": 4, "method_config": str(CONFIGS / "methods" / "token_cleaning.yaml")},
            r"sets model.init_args \['learning_rate', 'lr_schedule', 'model', 'warmup_ratio'\]",
        ),
        ("nope", {}, "has no variant 'nope'; available: fixed, self-evolving"),
    ],
)
def test_recipe_misuse_is_a_clear_error_before_any_work(variant, options, message, base_args, tmp_path):
    with pytest.raises((RecipeError, ValueError), match=message):
        run_recipe(
            "token-cleaning",
            base_args,
            RecipeOptions(workdir=str(tmp_path / "w"), variant=variant, **options),
            build_cli,
        )
    assert not (tmp_path / "w").exists()


def test_a_workdir_of_another_recipe_variant_is_refused(base_args, tmp_path):
    (tmp_path / "recipe.json").write_text(
        json.dumps({"recipe": "token-cleaning", "variant": "fixed", "stages": {}})
    )
    with pytest.raises(RecipeError, match="holds a token-cleaning/fixed recipe"):
        run_recipe(
            "token-cleaning",
            base_args,
            RecipeOptions(workdir=str(tmp_path), variant="self-evolving"),
            build_cli,
        )


def test_unknown_recipe_and_help(capsys):
    with pytest.raises(ValueError, match="unknown recipe 'nope'; available: token-cleaning"):
        run_recipe("nope", [], RecipeOptions(workdir="unused"), build_cli)
    with pytest.raises(SystemExit) as exit_info:
        main(["recipe", "--help"])
    assert exit_info.value.code == 0
    assert "token-cleaning --variant self-evolving" in capsys.readouterr().out
