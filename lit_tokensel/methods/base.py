"""The shared training step. Methods differ only in how their response tokens enter the loss.

A method subclasses `TokenSelectionModule` and overrides `select_tokens`, which gets the live
per-token losses and returns a `Selection`: which tokens enter the objective (`keep`), signed
per-token weights on their cross-entropy (default 1; a plain keep mask is the simple case), the
named scores behind the decision, and optionally named extra `LossTerm`s. Everything else lives
here, written once: model loading, the per-token loss, data-provided token weights, normalisation
and exact gradient accumulation, optimizer and schedule, selection statistics, metrics.

The objective of one optimizer step (an accumulation window, every rank) is

    sum(w * CE over the main tokens) / N_main  +  sum_k c_k * sum(w_k * l_k over term k's tokens) / N_k

with each count `N` taken over the whole window and all ranks, so `batch_size=2,
accumulate_grad_batches=4` gives the update of `batch_size=8`. Each micro-batch backpropagates its
main *sum*; the gradients are rescaled once in `on_before_optimizer_step`, when `N_main` is known.
A term normalised over its own tokens is exact too: without accumulation its count is all-reduced
at once and it is folded into the same backward (factor `c_k * N_main / N_k`); with accumulation
its gradient sum is collected apart (`torch.autograd.grad`, one extra backward per micro-batch, one
buffer the size of the trainable parameters) and added as `c_k / N_k` times it at the step. A term
counted over the main tokens (`shares_main_count`) never needs the buffer.

The contract's dataclasses live in `lit_tokensel.methods.contract`, the own-count terms' gradient
accumulation in `lit_tokensel.methods.term_gradients`; both are re-exported here.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.aggregation import MeanMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_tokensel.callbacks.finite import FiniteGuard
from lit_tokensel.choices import check_choices
from lit_tokensel.methods.contract import (  # noqa: F401 - re-exported: the contract's names stay importable here
    DATA_WEIGHTS_KEY,
    WINDOW_KEYS,
    Batch,
    LossTerm,
    SelectedBatch,
    Selection,
    _TermSums,
    check_accumulation_support,
)
from lit_tokensel.methods.optim import LRSchedule, check_optimizer_settings, lr_factor
from lit_tokensel.methods.term_gradients import TermGradientAccumulation
from lit_tokensel.modeling.forward import (
    decoder_hidden_and_head,
    model_inputs,
    response_token_losses,
    unflatten,
)
from lit_tokensel.modeling.loading import LoraSettings, WeightDType, load_causal_lm, load_tokenizer
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
    per_token_cross_entropy_chunked,
)
from lit_tokensel.selection.weighting import ResponseLogits


class TokenSelectionModule(TermGradientAccumulation, L.LightningModule):
    """Base class of every method: trains a causal LM on the response tokens that `select_tokens` keeps.

    Settings, here and in every method, are read from attributes that `__init__` sets once, validated,
    under the argument's name (`self.ratio`, `self.learning_rate`; `dtype` is `self.weights_dtype`, as
    LightningModule's `dtype` is the parameters'). `self.hparams` is only the record written to
    checkpoints (`save_hyperparameters`, with references and LoRA settings as plain data), never read to
    run. A choice is a `Literal` type: jsonargparse checks it for configs, `check_choices` for Python.

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
        betas: AdamW's `(beta1, beta2)`.
        eps: AdamW's epsilon.
        lr_schedule: `cosine`, `linear` or `constant`, each after a linear warmup.
        warmup_ratio: Fraction of the optimizer steps spent warming up.
        min_lr_ratio: Floor of the `cosine`/`linear` decay, as a fraction of the peak (0: decay to 0).
        optimizer: Replaces the default AdamW (a class_path with init_args in YAML). Its settings are
            its own: the four above may then be left at their defaults or set to the block's values,
            anything else is an error rather than silently overridden.
        lr_scheduler: Replaces the default warmup schedule (a class_path with init_args in YAML).
    """

    def __init__(
        self,
        model: str = "builtin:tiny-llama",
        tokenizer: str | None = None,
        gguf_file: str | None = None,
        dtype: WeightDType = "float32",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        chunked_loss: bool = False,
        lora: LoraSettings | dict | None = None,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr_schedule: LRSchedule = "cosine",
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        check_choices(TokenSelectionModule.__init__, locals())
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={warmup_ratio} must lie in [0, 1)")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={min_lr_ratio} must lie in [0, 1]")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={betas} must be two numbers in [0, 1)")
        if eps <= 0:
            raise ValueError(f"eps={eps} must be > 0")
        settings = {"learning_rate": learning_rate, "weight_decay": weight_decay, "betas": betas, "eps": eps}
        check_optimizer_settings(optimizer, settings, _signature_defaults(settings))
        if lr_scheduler is not None and min_lr_ratio != 0.0:
            raise ValueError(
                f"--model.init_args.min_lr_ratio {min_lr_ratio} applies to the built-in schedule; the "
                "`lr_scheduler` block replaces it: set the floor in the block instead"
            )
        if isinstance(lora, dict):  # from a checkpoint's hyper-parameters
            lora = LoraSettings(**lora)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "lora"])
        # Plain data in the checkpoint, so it loads without unpickling our classes.
        self.hparams["lora"] = asdict(lora) if lora is not None else None
        self.model_name_or_path = model
        self.tokenizer_name_or_path = tokenizer or model
        self.gguf_file = gguf_file
        self.weights_dtype = dtype  # `dtype` is LightningModule's (its parameters' dtype)
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.chunked_loss = chunked_loss
        self.lora = lora
        self.learning_rate, self.weight_decay, self.betas, self.eps = (
            learning_rate,
            weight_decay,
            tuple(betas),
            eps,
        )
        self.lr_schedule, self.warmup_ratio, self.min_lr_ratio = lr_schedule, warmup_ratio, min_lr_ratio
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.model: PreTrainedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self._term_grads: dict[str, torch.Tensor] = {}  # per-term gradient sums while accumulating
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
        self.model = load_causal_lm(
            self.model_name_or_path,
            dtype=self.weights_dtype,
            attn_implementation=self.attn_implementation,
            gguf_file=self.gguf_file,
            gradient_checkpointing=self.gradient_checkpointing,
            lora=self.lora,
        )
        self.model.train()  # from_pretrained returns eval mode, which would switch dropout off
        if self.device_mesh is not None:
            from lit_tokensel.distributed.fsdp import data_parallel_mesh, mixed_precision_policy, shard_model

            if self.chunked_loss:
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
        """Callbacks the references need, e.g. the history-model update schedule, and in a Trainer a
        `FiniteGuard` (NaN/inf loss or gradient stops the run) unless the Trainer already has one."""
        callbacks = [cb for reference in self.reference_models() for cb in reference.callbacks()]
        if self._trainer is not None and not any(isinstance(c, FiniteGuard) for c in self._trainer.callbacks):
            callbacks.append(FiniteGuard())
        return callbacks

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

    needs_logits: bool = False
    """True for a method whose `select_tokens` takes a fourth argument, `logits`: the training forward's
    `ResponseLogits` over the response positions (from the `[B, T, V]` logits, or projected chunk by chunk
    from the last hidden state with `chunked_loss`), e.g. EAFT's top-k entropy."""

    def select_tokens(self, batch: Batch, token_losses: torch.Tensor, valid: torch.Tensor) -> Selection:
        """Which response tokens enter the loss, and how. The base keeps every one of them (full SFT).

        `token_losses` and `valid` are `[B, T-1]`; the losses carry the graph, so detach them
        before using them as scores.
        """
        return Selection(keep=valid)

    # ------------------------------------------------------------------ shared step
    def token_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token losses of the trained model and the response mask, both `[B, T-1]`.

        A packed batch gives them in its rows' frame `[R, T-1]`, a sample view of one in the view's frame.
        """
        if self.chunked_loss:
            return response_token_losses(self.model, batch)
        rows = packed_rows(batch)  # a sample view runs on its packed rows
        source = rows.batch if rows is not None else batch
        logits = unflatten(self.model(**model_inputs(self.model, source)).logits, source)  # [B, T, V]
        losses, valid = per_token_cross_entropy(logits, source["labels"])  # [B, T-1] each
        if rows is not None:
            return rows.layout.to_samples(losses), rows.layout.to_samples(valid, False)
        return losses, valid

    def token_losses_and_logits(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, ResponseLogits]:
        """`token_losses` plus the response positions' logits, from the same forward (no extra `[B, T, V]`).

        For a sample view of a packed batch the losses and mask are in the view's frame `[N, L-1]`; the
        logits stay the rows' `[R, T, V]`, read in place through the layout (`ResponseLogits.layout`).
        """
        if self.chunked_loss:
            hidden, head = decoder_hidden_and_head(self.model, batch)  # [B, T, H] (a view's [N, L, H])
            losses, valid = per_token_cross_entropy_chunked(hidden, head.weight, batch["labels"], head.bias)
            return losses, valid, ResponseLogits(hidden, valid, head.weight, head.bias)
        rows = packed_rows(batch)  # a sample view runs on its packed rows
        source = rows.batch if rows is not None else batch
        logits = unflatten(self.model(**model_inputs(self.model, source)).logits, source)  # [B, T, V]
        losses, valid = per_token_cross_entropy(logits, source["labels"])  # [B, T-1] each
        if rows is None:
            return losses, valid, ResponseLogits(logits, valid)
        layout = rows.layout
        valid = layout.to_samples(valid, False)  # [N, L-1]
        return layout.to_samples(losses), valid, ResponseLogits(logits, valid, layout=layout)

    def select_batch(self, batch: Batch) -> SelectedBatch:
        """Select samples, run the forward in the method's context, then select tokens (training and `inspect`).

        Tokens the data weights 0 leave `valid` before the method sees it, so no method ranks or counts them.
        For packed rows the forwards run on the rows and the method selects in the sample view (the padded
        frame of the same samples, `lit_tokensel.selection.segments`), so every ranking and every weight
        stays per sample; samples that `select_samples` drops leave the rows before the training forward.
        """
        packed = is_packed(batch)
        view = sample_view(batch) if packed else batch  # [N, L] frame
        samples = self.select_samples(view)  # [B] bool or None
        if samples is not None:
            if not samples.any():
                raise RuntimeError(f"{type(self).__name__}.select_samples dropped every sample of the batch")
            if packed:
                batch = drop_samples(batch, samples)
                view = sample_view(batch, layout_of(batch, min_width=view["labels"].shape[1]))
            else:
                batch = view = {
                    k: v[samples] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()
                }
        logits = None
        with self.forward_context(batch):  # the packed rows themselves, e.g. for an attention hook's mask
            if self.needs_logits:
                token_losses, valid, logits = self.token_losses_and_logits(view)  # [B', T-1] each
            else:
                token_losses, valid = self.token_losses(view)  # [B', T-1] each
        data_weights = view.get(DATA_WEIGHTS_KEY)  # [B', T-1] or None
        if data_weights is not None:
            data_weights = data_weights.to(device=token_losses.device, dtype=token_losses.dtype)
            valid = valid & (data_weights != 0)
        if logits is not None:
            logits.valid = valid
            selection = self.select_tokens(view, token_losses, valid, logits)
        else:
            selection = self.select_tokens(view, token_losses, valid)
        return SelectedBatch(view, samples, token_losses, valid, selection, data_weights)

    def objective_terms(
        self, selected: SelectedBatch
    ) -> tuple[_TermSums, dict[str, tuple[LossTerm, _TermSums]]]:
        """The micro-batch's main sum and count, and each extra term's, data weights multiplied in."""
        selection, valid, data_weights = selected.selection, selected.valid, selected.data_weights
        keep = selection.keep & valid  # [B', T-1]
        weighted = (
            selected.token_losses if selection.weights is None else selected.token_losses * selection.weights
        )
        if data_weights is not None:
            weighted = weighted * data_weights  # [B', T-1]
        count = keep.sum() if selection.normalizer is None else selection.normalizer
        main = _TermSums(masked_sum(weighted, keep), count)
        terms = {}
        for name in sorted(selection.terms):  # one order on every rank (the step reduces them together)
            term = selection.terms[name]
            mask = term.mask & valid  # [B', T-1]
            values = selected.token_losses if term.losses is None else term.losses  # [B', T-1]
            if term.weights is not None:
                values = values * term.weights
            if data_weights is not None:
                values = values * data_weights
            terms[name] = (term, _TermSums(masked_sum(values, mask), mask.sum()))
        return main, terms

    def token_weights(self, selected: SelectedBatch) -> torch.Tensor | None:
        """Each token's effective weight on its CE in this micro-batch alone, `[B', T-1]` (what `inspect` shows).

        The main weights plus every CE term's `c_k * N_main / N_k` times its weights, with this
        micro-batch's counts (training uses the window's); None for a plain keep mask without data weights.
        """
        selection = selected.selection
        ce_terms = {n: t for n, t in selection.terms.items() if t.losses is None}
        if selection.weights is None and not ce_terms and selected.data_weights is None:
            return None
        keep = (selection.keep & selected.valid).float()  # [B', T-1]
        weights = keep if selection.weights is None else selection.weights.float() * keep
        main, _ = self.objective_terms(selected)
        n_main = float(main.count)
        for term in ce_terms.values():
            mask = (term.mask & selected.valid).float()  # [B', T-1]
            n_term = float(mask.sum())
            if n_term == 0 or (term.needs_main_tokens and n_main == 0):
                continue
            factor = term.coefficient * (1.0 if term.shares_main_count else max(n_main, 1.0) / n_term)
            weights = weights + factor * mask * (1.0 if term.weights is None else term.weights.float())
        if selected.data_weights is not None:
            weights = weights * selected.data_weights
        return weights

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        response_count = (batch["labels"][:, 1:] != -100).sum()  # before any sample is dropped
        token_count = batch["attention_mask"].sum()
        selected = self.select_batch(batch)
        token_losses, valid, selection = selected.token_losses, selected.valid, selected.selection
        keep = selection.keep & valid  # [B', T-1]
        if selection.scores or selected.samples is not None:
            ranked = next(iter(selection.scores.values()), None)
            stats = selection_statistics(keep, valid, token_losses, ranked)
            stats["kept_fraction"] = float(keep.sum()) / max(int(response_count), 1)
            self.log_dict({f"select/{k}": v for k, v in stats.items()}, on_step=True, on_epoch=False)
        if selection.diagnostics:
            self.log_dict(
                {f"select/{k}": float(v) for k, v in selection.diagnostics.items()},
                on_step=True,
                on_epoch=False,
            )
        main, terms = self.objective_terms(selected)
        loss = main.loss_sum + sum(
            (t.coefficient * s.loss_sum for t, s in terms.values() if t.shares_main_count and t.coefficient),
            torch.zeros((), device=main.loss_sum.device),
        )
        own = {n: (t, s) for n, (t, s) in terms.items() if not t.shares_main_count}
        if own:
            loss = loss + self._own_terms_now_or_later(main, own)
        self._window["loss_sum"] += main.loss_sum.detach()
        self._window["kept"] += keep.sum()
        self._window["normalizer"] += main.count
        self._window["response"] += response_count
        self._window["tokens"] += token_count
        for name, (term, sums) in terms.items():
            window = self._term_window.setdefault(
                name,
                {
                    "loss_sum": torch.zeros((), device=self.device),
                    "count": torch.zeros((), device=self.device),
                },
            )
            window["loss_sum"] = window["loss_sum"] + sums.loss_sum.detach()
            window["count"] = window["count"] + (main.count if term.shares_main_count else sums.count)
            window["term"] = term
        # Lightning divides this by accumulate_grad_batches; on_before_optimizer_step undoes that
        # and divides by the window's main-token count instead.
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        names = sorted(self._term_window)
        window = torch.stack(
            [self._window[k].float() for k in WINDOW_KEYS]
            + [self._term_window[n][k].float() for n in names for k in ("loss_sum", "count")]
        )
        if self.trainer.world_size > 1:
            window = self.trainer.strategy.reduce(window, reduce_op="sum")
        values = window.tolist()
        loss_sum, kept, normalizer, response, tokens = values[: len(WINDOW_KEYS)]
        # DDP averages gradients over ranks, and Lightning averaged over the window's micro-batches.
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / max(normalizer, 1.0)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for param in params:
            if param.grad is not None:
                param.grad.mul_(scale)
        term_loss, metrics = self._apply_term_gradients(names, values[len(WINDOW_KEYS) :], normalizer)
        loss = loss_sum / max(normalizer, 1.0) + term_loss
        now = time.perf_counter()
        metrics.update(
            {
                "train/loss": loss,
                "train/kept_fraction": kept / max(response, 1.0),
                "train/kept_tokens": kept,
            }
        )
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
        self._term_window: dict[str, dict[str, Any]] = {}

    def on_train_start(self) -> None:
        self._reset_window()

    def on_train_end(self) -> None:
        self._term_grads.clear()  # the per-term gradient buffers are not needed after fit

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
            optimizer = torch.optim.AdamW(
                params, lr=self.learning_rate, weight_decay=self.weight_decay, betas=self.betas, eps=self.eps
            )
        if self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
        else:
            total = int(self.trainer.estimated_stepping_batches)
            warmup = math.ceil(self.warmup_ratio * total)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                functools.partial(
                    lr_factor,
                    schedule=self.lr_schedule,
                    warmup_steps=warmup,
                    total_steps=total,
                    min_lr_ratio=self.min_lr_ratio,
                ),
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


def _signature_defaults(names: dict[str, Any]) -> dict[str, Any]:
    """`TokenSelectionModule.__init__`'s defaults for `names` (read from the signature, written once)."""
    parameters = inspect.signature(TokenSelectionModule.__init__).parameters
    return {name: parameters[name].default for name in names}
