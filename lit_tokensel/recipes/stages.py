"""The building blocks of a recipe, each in-process: a warm-up subset, a resumable training run, a scoring pass."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lit_tokensel.cache.store import CacheError, TokenLossCache
from lit_tokensel.methods.base import TokenSelectionModule
from lit_tokensel.recipes.state import RecipeError

BASE_KEYS = frozenset(inspect.signature(TokenSelectionModule.__init__).parameters) - {"self"}
"""init_args every method shares (model, learning rate, LoRA...): the base run's, set by the user's configs."""


CliBuilder = Callable[[list[str]], Any]
"""Parses LightningCLI arguments into an instantiated (not run) CLI: `lit_tokensel.cli.build_cli`."""


def check_method_config(path: Path) -> None:
    """A recipe's method config may not set base-run settings: those come from the user's configs."""
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    init_args = (config.get("model") or {}).get("init_args") or {}
    if clash := sorted(BASE_KEYS & set(init_args)):
        raise RecipeError(
            f"recipe method config {path} sets model.init_args {clash}: the base model and its training "
            f"settings come from your -c configs (they also train the reference). Keep only the method's "
            f"own options in the method config."
        )


def write_warmup_subset(
    datamodule: Any, output: Path, size: int | None, fraction: float | None
) -> dict[str, Any]:
    """A seeded random subset of the training rows (the validation hold-out excluded) as JSON Lines."""
    from lit_tokensel.data.pipeline import holdout_split
    from lit_tokensel.data.sources import Source, iter_rows

    dm = datamodule
    source = (
        Source(path=dm.train_file)
        if dm.train_file
        else Source(
            dataset_name=dm.dataset_name,
            dataset_config=dm.dataset_config,
            split=dm.train_split,
            cache_dir=dm.cache_dir,
        )
    )
    rows = list(iter_rows(source))
    positions = (
        holdout_split(len(rows), dm.val_fraction, dm.seed)[0] if dm.val_fraction > 0 else range(len(rows))
    )
    candidates = [p for p in positions if rows[p].error is None]
    count = size if size is not None else round(fraction * len(candidates))
    if not 1 <= count <= len(candidates):
        raise ValueError(
            f"a warm-up set of {count} rows cannot be drawn from {len(candidates)} training rows"
        )
    chosen = sorted(random.Random(dm.seed).sample(candidates, count))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(
        "".join(json.dumps(rows[p].value, ensure_ascii=False, default=str) + "\n" for p in chosen),
        encoding="utf-8",
    )
    os.replace(tmp, output)
    return {"path": str(output), "rows": count, "source": source.display, "seed": dm.seed}


def cache_complete(path: Path) -> bool:
    try:
        return TokenLossCache(path).complete
    except CacheError:
        return False


def score(cli: Any, output: Path, shard_size: int, tokenizer: Any = None) -> Path:
    """Score `cli`'s model (built from the stage's args) over the training data into the cache `output`
    (resumes a partial one).

    `tokenizer` replaces the module's tokenizer for the data (the base's, so that a reference exported
    with its own copy of the tokenizer is scored on identical tokens), unless the data config names one.
    """
    from lit_tokensel.cache.scoring import score_to_cache

    if tokenizer is not None and cli.datamodule.tokenizer_source is None:
        cli.datamodule.tokenizer_source = tokenizer
    return score_to_cache(
        cli.model, cli.datamodule, output, "train", shard_size, device=cli.trainer.strategy.root_device
    )


class TrainRun:
    """One `fit` of a recipe stage in `directory`: `config.yaml`, CSV `logs/`, `resume/last.ckpt`, `export/`.

    An interrupted run resumes from `resume/last.ckpt` (saved every epoch, or every
    `save_every_n_steps` when set). The resolved config is written to `config.yaml` when the run
    starts, so a finished run is skipped only when its config is unchanged; a changed one (finished
    or interrupted) is an error, never a silent resume or skip.
    """

    def __init__(
        self, directory: Path, args: list[str], build: CliBuilder, save_every_n_steps: int | None = None
    ) -> None:
        self.directory = directory
        self.build = build
        checkpointing = {
            "dirpath": str(directory / "resume"),
            "filename": "last",
            "save_top_k": 1,
            "enable_version_counter": False,
            "every_n_train_steps": save_every_n_steps,
        }
        self.args = [
            *args,
            "--trainer.logger",
            json.dumps(
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {
                        "save_dir": str(directory.parent),
                        "name": directory.name,
                        "version": "logs",
                    },
                }
            ),
            "--trainer.enable_checkpointing",
            "true",
            "--trainer.callbacks+",
            json.dumps(
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": checkpointing}
            ),
            "--export.output_dir",
            str(directory / "export"),
        ]
        self._cli: Any = None

    @property
    def checkpoint(self) -> Path:
        return self.directory / "resume" / "last.ckpt"

    @property
    def export(self) -> Path:
        return self.directory / "export"

    @property
    def cli(self) -> Any:
        if self._cli is None:
            self._cli = self.build(self.args)
        return self._cli

    def config_text(self) -> str:
        return self.cli.parser.dump(self.cli.config, skip_none=False)

    def config_sha(self) -> str:
        return hashlib.sha256(self.config_text().encode("utf-8")).hexdigest()

    def complete(self, record: dict[str, Any]) -> bool:
        """Finished and exported; a finished run whose configuration changed is an error."""
        if record.get("status") != "done" or not (self.export / "config.json").is_file():
            return False
        self.check_unchanged()
        return True

    def check_unchanged(self) -> None:
        """Refuse a directory whose `config.yaml` (written when the run started) differs from this config."""
        saved = self.directory / "config.yaml"
        if not saved.is_file() or saved.read_text(encoding="utf-8") == self.config_text():
            return
        changed = _differing_keys(
            yaml.safe_load(saved.read_text(encoding="utf-8")), yaml.safe_load(self.config_text())
        )
        raise RecipeError(
            f"{self.directory} was run with another configuration (differs in: {', '.join(changed[:6]) or '?'}). "
            f"Delete {self.directory} (and the stages after it) to redo it, or use another --workdir."
        )

    def run(self) -> dict[str, Any]:
        """Fit (resuming an interrupted run) and return the stage record's fields."""
        self.check_unchanged()
        cli, sha = self.cli, self.config_sha()
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "config.yaml").write_text(self.config_text(), encoding="utf-8")
        resume = self.checkpoint if self.checkpoint.is_file() else None
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resume)
        cli.after_fit()
        metrics = {
            k: float(v) for k, v in cli.trainer.callback_metrics.items() if "/" in k and v.numel() == 1
        }
        return {
            "config_sha256": sha,
            "run_dir": str(self.directory),
            "checkpoint": str(self.checkpoint),
            "export": str(self.export),
            "global_step": cli.trainer.global_step,
            "resumed_from": str(resume) if resume else None,
            "metrics": metrics,
        }


def _differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            k
            for key in sorted(set(old) | set(new))
            for k in _differing_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [] if old == new else [prefix.rstrip(".")]
