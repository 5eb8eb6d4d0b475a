"""Every shipped YAML parses and instantiates (model, data, trainer) without loading weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from lit_tokensel.cli import TokenSelCLI
from lit_tokensel.data import SFTDataModule
from lit_tokensel.methods.base import TokenSelectionModule

CONFIGS = Path(__file__).parents[1] / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"
STACKED = sorted(p for p in CONFIGS.rglob("*.yaml") if p != QUICKSTART)


def _instantiate(*configs: Path) -> LightningCLI:
    args = [arg for c in configs for arg in ("-c", str(c))]
    if "accelerator: gpu" in configs[-1].read_text() and not torch.cuda.is_available():
        args += ["--trainer.accelerator", "cpu"]  # everything else in a GPU preset still instantiates
    return TokenSelCLI(TokenSelectionModule, SFTDataModule, subclass_mode_model=True, run=False, args=args)


def _requires(config: Path) -> list[Path]:
    """Configs a preset stacks on, declared in its header as `# stacks on: methods/x.yaml`."""
    prefix = "# stacks on:"
    return [
        CONFIGS / line[len(prefix) :].strip()
        for line in config.read_text().splitlines()
        if line.startswith(prefix)
    ]


def test_every_config_is_covered():
    assert {p.parent.name for p in STACKED} >= {"methods", "data", "presets"}


@pytest.mark.parametrize("config", [QUICKSTART, *STACKED], ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit-tokensel"])
    stack = (config,) if config == QUICKSTART else (QUICKSTART, *_requires(config), config)
    cli = _instantiate(*stack)
    assert isinstance(cli.model, TokenSelectionModule)
    assert cli.model.model is None, "weights must load in configure_model, not at config time"
    assert isinstance(cli.datamodule, SFTDataModule)
    assert cli.trainer.max_epochs is not None or cli.trainer.max_steps > 0
