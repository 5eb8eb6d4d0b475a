"""Stop a run at the first non-finite training loss or gradient, before the bad update reaches the weights."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_tokensel.choices import check_choices
from lit_tokensel.selection.finite import NonFiniteError, describe_nonfinite


class FiniteGuard(L.Callback):
    """Check every micro-batch's training loss (before backward) and the gradient norm (before each optimizer
    step); a NaN or inf stops the run within that optimizer step, naming the step, the samples and the source.

    Every `TokenSelectionModule` adds one by default (`configure_callbacks`); configure one yourself in
    `trainer.callbacks` to change `on_nonfinite`. Non-finite reference losses and selection scores are
    refused where they are computed (`lit_tokensel.selection.finite`), always as errors: they come from a
    model or a cache that will give the same values again, so skipping cannot help.

    Args:
        on_nonfinite: `error` (default) raises `NonFiniteError`; `skip` drops that optimizer step (no
            update: the gradients are discarded; the schedule and the step counter still advance), warns,
            counts it and logs the count as `train/skipped_nonfinite_steps`.
    """

    def __init__(self, on_nonfinite: Literal["error", "skip"] = "error") -> None:
        check_choices(FiniteGuard.__init__, locals())
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        self._window_ids: list[int] = []  # sample ids of the accumulation window so far
        self._batch_ids: list[int] = []
        self._bad_loss: str | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        ids = batch.get("sample_id") if isinstance(batch, dict) else None
        self._batch_ids = [int(i) for i in ids.tolist()] if torch.is_tensor(ids) else []
        self._window_ids.extend(self._batch_ids)

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        if bool(torch.isfinite(loss.detach()).all()) or self._bad_loss is not None:
            return
        self._bad_loss = (
            f"non-finite training loss ({describe_nonfinite(loss.detach())}) at optimizer step {trainer.global_step} "
            f"in the micro-batch of sample_id {self._batch_ids}; source: the trained model "
            f"({_model_name(pl_module)}): its token losses on these samples, or the learning rate made its "
            f"weights diverge"
        )
        if trainer.world_size == 1 and self.on_nonfinite == "error":
            raise NonFiniteError(self._bad_loss + ". " + _HINT)
        # Several processes: decide together at the optimizer step, so no rank is left waiting in a collective.

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        problem = self._bad_loss
        if problem is None:
            norm = _grad_norm(optimizer)
            if not bool(torch.isfinite(norm)):
                problem = (
                    f"non-finite gradient norm ({norm.item()}) at optimizer step {trainer.global_step} for the "
                    f"samples {self._window_ids}; source: the backward pass of the trained model "
                    f"({_model_name(pl_module)})"
                )
        bad = torch.tensor(float(problem is not None), device=pl_module.device)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
            if problem is None and bool(bad > 0):
                problem = (
                    f"non-finite loss or gradient on another process at optimizer step {trainer.global_step}"
                )
        self._window_ids, self._bad_loss = [], None
        if problem is None:
            return
        if self.on_nonfinite == "error":
            raise NonFiniteError(problem + ". " + _HINT)
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None  # the optimizer skips parameters without a gradient: no update at all
        self.skipped_steps += 1
        rank_zero_warn(
            f"skipped optimizer step {trainer.global_step} ({self.skipped_steps} so far): {problem}"
        )
        pl_module.log(
            "train/skipped_nonfinite_steps",
            float(self.skipped_steps),
            on_step=True,
            on_epoch=False,
            rank_zero_only=True,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window_ids, self._bad_loss = [], None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))


_HINT = (
    "Lower the learning rate (or enable gradient clipping: --trainer.gradient_clip_val 1.0), check these samples, "
    "or skip such steps with the callback "
    "lit_tokensel.callbacks.finite.FiniteGuard(on_nonfinite=skip) in --trainer.callbacks"
)


def _model_name(pl_module: L.LightningModule) -> str:
    return str(getattr(pl_module, "model_name_or_path", type(pl_module).__name__))


@torch.no_grad()
def _grad_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """L2 norm of this process's gradients (local shards under FSDP), as a 0-dim tensor."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
