"""`EvalCallback`: evaluate the model being trained with lm-eval, every N steps and/or when fit ends.

Runs on global rank zero with the in-memory model (LoRA adapters active, nothing written to disk
unless `output_dir` is set), logs `eval/<task>/<metric>` for the requested tasks to every logger of
the trainer at the current global step, and puts the model back in train mode. Other ranks wait at a
barrier. Task names and data are checked in `setup`, before any training step, so a typo or a missing
dataset fails at once instead of after hours of training.

In YAML (LightningCLI):

    trainer:
      callbacks:
        - class_path: lit_tokensel_eval.EvalCallback
          init_args: {suite: quickstart, every_n_steps: 200, limit: 20}
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lit_tokensel_eval.models import InMemoryModel, open_model
from lit_tokensel_eval.results import result_rows, write_run
from lit_tokensel_eval.runner import TaskRequest, prepare, resolve_requests, run_requests

log = logging.getLogger(__name__)


class EvalCallback(L.Callback):
    """Evaluate the trained model on lm-eval tasks during and/or after `fit`.

    Args:
        tasks: lm-eval task, group or tag names (a list or comma-separated); the bundled ones run offline.
        suite: A suite name or YAML path (`lit-tokensel-eval list`), instead of or besides `tasks`.
        every_n_steps: Evaluate after every N optimizer steps; None for never during training.
        at_end: Evaluate when training ends (skipped if the last step was just evaluated).
        limit: Documents per task; keep it small for evaluations during training.
        num_fewshot: Few-shot examples for every task (default: the suite's or the task's).
        apply_chat_template: Chat formatting (default: per suite/task; always for the bundled tasks).
        batch_size: lm-eval batch size.
        output_dir: Also write each evaluation's `results.json`/`results.csv` to `output_dir/step-<N>`.
        bootstrap_iters: lm-eval bootstrap iterations for standard errors (few by default: they are not logged).
    """

    def __init__(
        self,
        tasks: str | Sequence[str] | None = None,
        suite: str | None = None,
        every_n_steps: int | None = None,
        at_end: bool = True,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        apply_chat_template: bool | None = None,
        batch_size: int = 8,
        output_dir: str | None = None,
        bootstrap_iters: int = 0,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps}")
        if every_n_steps is None and not at_end:
            raise ValueError("EvalCallback would never run: set every_n_steps and/or at_end=True")
        self.requests: list[TaskRequest] = resolve_requests(
            tasks, suite, num_fewshot=num_fewshot, apply_chat_template=apply_chat_template, limit=limit
        )
        self.every_n_steps = every_n_steps
        self.at_end = at_end
        self.batch_size = batch_size
        self.output_dir = output_dir
        self.bootstrap_iters = bootstrap_iters
        self.history: list[tuple[int, dict[str, float]]] = []  # (global step, logged metrics)
        self._manager: Any = None
        self._last_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            prepared = prepare(self.requests)
            self._manager, self.requests = prepared.manager, prepared.requests

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Evaluate now on rank zero, log the metrics, restore train mode; returns what was logged."""
        step = trainer.global_step
        self._last_step = step
        metrics: dict[str, float] = {}
        if trainer.is_global_zero:
            metrics = self._evaluate_here(trainer, pl_module, step)
        trainer.strategy.barrier("lit_tokensel_eval")
        return metrics

    def _evaluate_here(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, float]:
        log.info("EvalCallback: evaluating at step %d on %s", step, ", ".join(r.task for r in self.requests))
        in_memory = InMemoryModel(pl_module.model, pl_module.tokenizer, f"step-{step}")
        needs_chat = any(r.apply_chat_template for r in self.requests)
        # open_model restores the model's train mode when the block ends, also on errors
        with (
            torch.no_grad(),
            open_model(in_memory, batch_size=self.batch_size, needs_chat_template=needs_chat) as lm,
        ):
            if self._manager is None:
                prepared = prepare(self.requests)
                self._manager, self.requests = prepared.manager, prepared.requests
            results = run_requests(
                lm, self._manager, self.requests, bootstrap_iters=self.bootstrap_iters, progress=False
            )
        rows = result_rows(results, f"step-{step}", results["lit_tokensel_eval"]["primary"])
        if self.output_dir is not None:
            write_run(Path(self.output_dir) / f"step-{step}", results, rows)
        requested = set(results["lit_tokensel_eval"]["primary"])
        metrics = {
            f"eval/{r.task}/{r.metric}" + ("" if r.filter == "none" else f"/{r.filter}"): r.value
            for r in rows
            if r.task in requested
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.history.append((step, metrics))
        return metrics
