"""The quickstart config end to end (shortened), the export command, and --print_config."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_tokensel.cli import main

QUICKSTART = Path(__file__).parents[1] / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("quickstart")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run_dir)
        mp.setattr(sys, "argv", ["lit-tokensel"])
        main(
            [
                "fit",
                "-c",
                str(QUICKSTART),
                "--trainer.max_steps",
                "12",
                "--trainer.val_check_interval",
                "6",
                "--trainer.limit_val_batches",
                "3",
                "--trainer.log_every_n_steps",
                "2",
                "--trainer.enable_progress_bar",
                "false",
            ]
        )
    return run_dir / "runs" / "quickstart" / "full_sft" / "version_0"


def _logits(model_dir: Path, text: str) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_quickstart_trains_logs_and_exports(quickstart_run, capsys):
    rows = list(csv.DictReader((quickstart_run / "metrics.csv").open()))
    train_losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val_losses = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(train_losses) >= 5 and len(val_losses) == 2
    assert train_losses[-1] < train_losses[0] - 0.5, "a 12-step run at lr 3e-3 must lower the loss"
    assert val_losses[1] < val_losses[0]
    export = quickstart_run / "export"
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert "{% generation %}" in tokenizer.chat_template
    assert AutoModelForCausalLM.from_pretrained(export).config.model_type == "llama"
    config = yaml.safe_load((quickstart_run / "config.yaml").read_text())
    assert config["model"]["class_path"] == "lit_tokensel.FullSFT"


def test_export_command_matches_fit_end_export(quickstart_run, tmp_path):
    checkpoint = quickstart_run / "checkpoints" / "last.ckpt"
    main(["export", "--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "again")])
    text = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    torch.testing.assert_close(_logits(tmp_path / "again", text), _logits(quickstart_run / "export", text))


def test_print_config_is_instant_and_complete(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(QUICKSTART), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["model"] == "builtin:tiny-llama"
    assert printed["data"]["train_file"] == "builtin:quickstart/train.jsonl"
