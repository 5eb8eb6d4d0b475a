"""The shared training step. Methods differ only in which response tokens enter the loss.

A method subclasses `TokenSelectionModule` and overrides `select_tokens`, which gets the live
per-token losses and returns a `Selection` (keep-mask plus the named scores behind it). Everything
else lives here, written once: model loading, the per-token loss, loss normalization across
gradient accumulation, optimizer and schedule, selection statistics, metrics.

Normalization: the loss of an optimizer step is the sum of the kept tokens' losses over every
micro-batch of the accumulation window divided by the kept-token count of the whole window (and
of all ranks), so `batch_size=2, accumulate_grad_batches=4` gives the update of `batch_size=8`.
Each micro-batch backpropagates its *sum*; the gradients are rescaled once in
`on_before_optimizer_step`, when the window's count is known.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.aggregation import MeanMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from lit_tokensel.modeling.forward import model_inputs, response_token_losses, unflatten
from lit_tokensel.modeling.loading import LoraSettings, load_causal_lm, load_tokenizer
from lit_tokensel.selection.segments import (
    as_samples,
    drop_samples,
    is_packed,
    layout_of,
    packed_rows,
    sample_view,
)
from lit_tokensel.selection.stats import selection_statistics
from lit_tokensel.selection.token_loss import (
    masked_sum,
    per_token_cross_entropy,
)

Batch = dict[str, torch.Tensor]
# Per-window sums behind the loss normalization and the logged step metrics.
WINDOW_KEYS = ("loss_sum", "kept", "normalizer", "response", "tokens")


@dataclass
class Selection:
    """A method's decision for a micro-batch: `keep` `[B, T-1]` and the named scores behind it.

    The first score is the one ranked; its quantiles are logged as `select/score_q*`.

    Attributes:
        keep: `[B, T-1]` bool, the tokens whose loss enters the objective.
        scores: Named `[B, T-1]` signals behind the decision (logged, and written by `inspect`).
        weights: Optional `[B, T-1]` signed per-token loss weights (default 1): Forgetting's
            gradient ascent on negative tokens is a negative weight.
        normalizer: Token count this micro-batch adds to the window's divisor (default: kept count).
        diagnostics: Scalars logged as `select/<name>` (e.g. ssToken's mean loss gap).
    """

    keep: torch.Tensor
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: torch.Tensor | None = None
    normalizer: torch.Tensor | None = None
    diagnostics: dict[str, torch.Tensor | float] = field(default_factory=dict)


@dataclass
class SelectedBatch:
    """What `select_batch` decided: the (possibly sample-pruned) batch, its losses and the selection."""

    batch: Batch  # for packed rows: the sample view (`lit_tokensel.selection.segments.sample_view`)
    samples: torch.Tensor | None  # [B] bool over the original batch, None when every sample stays
    token_losses: torch.Tensor  # [B', T-1], with the graph
    valid: torch.Tensor  # [B', T-1]
    selection: Selection


class TokenSelectionModule(L.LightningModule):
    """Base class of every method: trains a causal LM on the response tokens that `select_tokens` keeps.

    Args:
        model: Hub id, local directory, or `builtin:<name>` (a tiny model built locally on first use).
        tokenizer: Tokenizer location when it differs from `model`.
        gguf_file: GGUF file name inside `model` to load weights and tokenizer from.
        dtype: Weight dtype: float32, bfloat16 or float16 (use the Trainer's `precision` for autocast).
        attn_implementation: `sdpa` (default), `eager`, or `flash_attention_2` on a GPU.
        gradient_checkpointing: Trade compute for activation memory.
        chunked_loss: Compute per-token losses from the last hidden state in chunks
            (`linear_cross_entropy`) instead of materializing `[B, T, V]` logits; for large vocabularies.
        lora: LoRA adapter settings; None trains all weights.
        learning_rate: Peak learning rate of the default AdamW optimizer.
        weight_decay: AdamW weight decay.
        lr_schedule: `cosine`, `linear` or `constant`, each after a linear warmup.
        warmup_ratio: Fraction of the optimizer steps spent warming up.
        optimizer: Replaces the default AdamW (a class_path with init_args in YAML).
        lr_scheduler: Replaces the default warmup schedule (a class_path with init_args in YAML).
    """

    def __init__(
        self,
        model: str = "builtin:tiny-llama",
        tokenizer: str | None = None,
        gguf_file: str | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        chunked_loss: bool = False,
        lora: LoraSettings | dict | None = None,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        lr_schedule: str = "cosine",
        warmup_ratio: float = 0.03,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if lr_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_schedule={lr_schedule!r}: use cosine, linear or constant")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={warmup_ratio} must lie in [0, 1)")
        if isinstance(lora, dict):  # from a checkpoint's hyper-parameters
            lora = LoraSettings(**lora)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "lora"])
        # Plain data in the checkpoint, so it loads without unpickling our classes.
        self.hparams["lora"] = asdict(lora) if lora is not None else None
        self.model_name_or_path = model
        self.tokenizer_name_or_path = tokenizer or model
        self.gguf_file = gguf_file
        self.lora = lora
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.model: PreTrainedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self._reset_window()
        self._last_step_time: float | None = None

    # ------------------------------------------------------------------ loading
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer, loaded on first access (the DataModule shares this object)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name_or_path, self.gguf_file)
        return self._tokenizer

    def configure_model(self) -> None:
        """Load the weights here, not in `__init__`, so config parsing stays instant.

        Under `ModelParallelStrategy` (FSDP2, detected by `self.device_mesh`) the model is sharded
        here, per decoder layer and then the root, before the references are set up, so that a
        reference model and the EMA history are sharded like it.
        """
        if self.model is not None:
            return
        hp = self.hparams
        self.model = load_causal_lm(
            self.model_name_or_path,
            dtype=hp.dtype,
            attn_implementation=hp.attn_implementation,
            gguf_file=self.gguf_file,
            gradient_checkpointing=hp.gradient_checkpointing,
            lora=self.lora,
        )
        self.model.train()  # from_pretrained returns eval mode, which would switch dropout off
        if self.device_mesh is not None:
            from lit_tokensel.distributed.fsdp import data_parallel_mesh, mixed_precision_policy, shard_model

            if hp.chunked_loss:
                raise ValueError(
                    "chunked_loss is not supported under FSDP2 yet (its loss bypasses the sharded root "
                    "module's forward); set `model.init_args.chunked_loss: false` or use DDP."
                )
            precision = self.trainer.precision if self._trainer is not None else None
            shard_model(self.model, data_parallel_mesh(self.device_mesh), mixed_precision_policy(precision))
        elif self._trainer is not None:
            from lit_tokensel.distributed.fsdp import check_fsdp1_references

            check_fsdp1_references(self.trainer.strategy, self.reference_models())
        for reference in self.reference_models():
            reference.setup(self)

    def reference_models(self) -> list[Any]:
        """The method's reference providers (`lit_tokensel.reference`); set up after the model loads."""
        return []

    def configure_callbacks(self) -> list[L.Callback]:
        """Callbacks the references need, e.g. the history-model update schedule."""
        return [cb for reference in self.reference_models() for cb in reference.callbacks()]

    # ------------------------------------------------------------------ the method's hooks
    def select_samples(self, batch: Batch) -> torch.Tensor | None:
        """Which samples of the micro-batch to train on, `[B]` bool, or None for all.

        Runs before the training forward, so dropped samples cost no forward or backward work
        (Q-Tuning). Keep at least one sample.
        """
        return None

    def prepare_selection(self, datamodule: Any) -> None:
        """One-off work before selecting (e.g. a dataset-wide threshold from cached losses).

        Called when fit starts and by `lit-tokensel inspect`; `datamodule` has been set up.
        """

    def on_fit_start(self) -> None:
        self.prepare_selection(self.trainer.datamodule)

    def forward_context(self, batch: Batch) -> AbstractContextManager[Any]:
        """Context entered around the training forward, e.g. to capture one layer's attention."""
        return nullcontext()

    def select_tokens(self, batch: Batch, token_losses: torch.Tensor, valid: torch.Tensor) -> Selection:
        """Which response tokens enter the loss. The base keeps every one of them (full SFT).

        `token_losses` and `valid` are `[B, T-1]`; the losses carry the graph, so detach them
        before using them as scores.
        """
        return Selection(keep=valid)

    # ------------------------------------------------------------------ shared step
    def token_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token losses of the trained model and the response mask, both `[B, T-1]`.

        A packed batch gives them in its rows' frame `[R, T-1]`, a sample view of one in the view's frame.
        """
        if self.hparams.chunked_loss:
            return response_token_losses(self.model, batch)
        rows = packed_rows(batch)  # a sample view runs on its packed rows
        source = rows.batch if rows is not None else batch
        logits = unflatten(self.model(**model_inputs(self.model, source)).logits, source)  # [B, T, V]
        losses, valid = per_token_cross_entropy(logits, source["labels"])  # [B, T-1] each
        if rows is not None:
            return rows.layout.to_samples(losses), rows.layout.to_samples(valid, False)
        return losses, valid

    def select_batch(self, batch: Batch) -> SelectedBatch:
        """Select samples, run the forward in the method's context, then select tokens (training and `inspect`)."""
        if is_packed(batch):
            return self._select_packed(batch)
        samples = self.select_samples(batch)  # [B] bool or None
        if samples is not None:
            if not samples.any():
                raise RuntimeError(f"{type(self).__name__}.select_samples dropped every sample of the batch")
            batch = {k: v[samples] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
        with self.forward_context(batch):
            token_losses, valid = self.token_losses(batch)  # [B', T-1] each
        selection = self.select_tokens(batch, token_losses, valid)
        return SelectedBatch(batch, samples, token_losses, valid, selection)

    def _select_packed(self, batch: Batch) -> SelectedBatch:
        """`select_batch` for packed rows: the forwards run on the rows, the method selects in the sample
        view (the padded frame of the same samples, `lit_tokensel.selection.segments`), so every ranking
        stays per sample. Samples that `select_samples` drops leave the rows before the training forward."""
        view = sample_view(batch)  # [N, L] frame
        samples = self.select_samples(view)  # [N] bool or None
        if samples is not None:
            if not samples.any():
                raise RuntimeError(f"{type(self).__name__}.select_samples dropped every sample of the batch")
            batch = drop_samples(batch, samples)
            view = sample_view(batch, layout_of(batch, min_width=view["labels"].shape[1]))
        with self.forward_context(batch):
            row_losses, row_valid = self.token_losses(batch)  # [R, T-1] each
        layout = packed_rows(view).layout
        token_losses, valid = layout.to_samples(row_losses), layout.to_samples(row_valid, False)  # [N, L-1]
        selection = self.select_tokens(view, token_losses, valid)
        return SelectedBatch(view, samples, token_losses, valid, selection)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        response_count = (batch["labels"][:, 1:] != -100).sum()  # before any sample is dropped
        token_count = batch["attention_mask"].sum()
        selected = self.select_batch(batch)
        token_losses, valid, selection = selected.token_losses, selected.valid, selected.selection
        keep = selection.keep & valid  # [B', T-1]
        weighted = token_losses if selection.weights is None else token_losses * selection.weights
        loss_sum = masked_sum(weighted, keep)
        if selection.scores or selected.samples is not None:
            ranked = next(iter(selection.scores.values()), None)
            stats = selection_statistics(keep, valid, token_losses, ranked)
            stats["kept_fraction"] = float(keep.sum()) / max(int(response_count), 1)
            self.log_dict({f"select/{k}": v for k, v in stats.items()}, on_step=True, on_epoch=False)
        if selection.diagnostics:
            self.log_dict({f"select/{k}": float(v) for k, v in selection.diagnostics.items()},
                          on_step=True, on_epoch=False)
        self._window["loss_sum"] += loss_sum.detach()
        self._window["kept"] += keep.sum()
        self._window["normalizer"] += keep.sum() if selection.normalizer is None else selection.normalizer
        self._window["response"] += response_count
        self._window["tokens"] += token_count
        # Lightning divides this by accumulate_grad_batches; on_before_optimizer_step undoes that
        # and divides by the window's kept-token count instead.
        return loss_sum

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        window = torch.stack([self._window[k].float() for k in WINDOW_KEYS])
        if self.trainer.world_size > 1:
            window = self.trainer.strategy.reduce(window, reduce_op="sum")
        loss_sum, kept, normalizer, response, tokens = window.tolist()
        # DDP averages gradients over ranks, and Lightning averaged over the window's micro-batches.
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / max(normalizer, 1.0)
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(scale)
        now = time.perf_counter()
        metrics = {
            "train/loss": loss_sum / max(normalizer, 1.0),
            "train/kept_fraction": kept / max(response, 1.0),
            "train/kept_tokens": kept,
        }
        if self._last_step_time is not None:
            metrics["train/tokens_per_s"] = tokens / max(now - self._last_step_time, 1e-9)
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        self.log("loss", metrics["train/loss"], prog_bar=True, logger=False, rank_zero_only=True)
        self._last_step_time = now
        self._reset_window()

    def on_train_epoch_start(self) -> None:
        self._last_step_time = time.perf_counter()

    def _reset_window(self) -> None:
        self._window = {k: torch.zeros((), device=self.device) for k in WINDOW_KEYS}

    def on_train_start(self) -> None:
        self._reset_window()

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        token_losses, valid = self.token_losses(batch)
        self.val_loss.update(token_losses[valid])

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.val_loss)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        token_losses, valid = self.token_losses(batch)
        self.test_loss.update(token_losses[valid])

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.test_loss)

    def _log_eval(self, split: str, metric: MeanMetric) -> None:
        if metric.update_count == 0:
            return
        mean_loss = metric.compute()  # token-weighted over the whole split (synced across ranks)
        self.log(f"{split}/loss", mean_loss, prog_bar=True)
        self.log(f"{split}/ppl", mean_loss.exp())
        metric.reset()

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-token losses `[B, T-1]` with their mask and sample ids (per sample for packed batches too)."""
        token_losses, valid = self.token_losses(as_samples(batch))
        return {"sample_id": batch["sample_id"], "token_losses": token_losses, "valid": valid}

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(params)
        else:
            optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        if self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
        else:
            total = int(self.trainer.estimated_stepping_batches)
            scheduler = get_scheduler(
                self.hparams.lr_schedule,
                optimizer,
                num_warmup_steps=math.ceil(self.hparams.warmup_ratio * total),
                num_training_steps=total,
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the method class (for export) and the chat template used in training (it may be the
        DataModule's fallback)."""
        checkpoint["method_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        if self._tokenizer is not None and self._tokenizer.chat_template:
            checkpoint["chat_template"] = self._tokenizer.chat_template

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("chat_template"):
            self.tokenizer.chat_template = checkpoint["chat_template"]
