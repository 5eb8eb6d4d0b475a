"""A history of the trained weights (ssToken's theta_his): EMA or a lagged copy, trainable tensors only.

Only the trainable parameters get shadow tensors (with LoRA: the adapter weights; the frozen base
is shared). Shadows are `empty_like` copies of the parameters, so they share dtype, device and
tensor type (a DTensor shard under FSDP2, updated on its local shard) and the model is never deep-copied. Losses swap the
shadows into the parameters in place for one no-grad forward and copy the live values back
(in place, so FSDP2's sharded storage sees them; through `.data`, so autograd's saved tensors of
the training forward stay valid).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch

from lit_tokensel.choices import check_choices
from lit_tokensel.distributed.fsdp import fresh_root_gather
from lit_tokensel.reference.base import Batch, ReferenceModel, model_token_losses
from lit_tokensel.reference.history_update import HistoryUpdate

if TYPE_CHECKING:
    from lit_tokensel.methods.base import TokenSelectionModule

Shadow = list[torch.Tensor]


class HistoryReference(ReferenceModel):
    """Losses of a history of the trained model, updated after each optimizer step.

    `ema`: `his <- decay * his + (1 - decay) * theta`; `lagged`: the weights of `lag` optimizer
    steps ago (theta_0 until `lag` steps have passed). At step 0 the history equals theta_0. The
    schedule and checkpointing belong to the `HistoryUpdate` callback returned by `callbacks()`.

    Args:
        mode: `ema` (exponential moving average) or `lagged` (a copy from `lag` steps ago).
        decay: EMA decay per optimizer step, in [0, 1).
        lag: Optimizer steps of delay in `lagged` mode (>= 1); keeps `lag + 1` copies.
    """

    shadows_parameters = True

    def __init__(self, mode: Literal["ema", "lagged"] = "ema", decay: float = 0.99, lag: int = 1) -> None:
        check_choices(HistoryReference.__init__, locals())
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay} must lie in [0, 1)")
        if lag < 1:
            raise ValueError(f"lag={lag} must be >= 1")
        self._init_args = {"mode": mode, "decay": decay, "lag": lag}
        self.mode, self.decay, self.lag = mode, decay, lag
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.shadow: Shadow = []  # the history used for losses
        self.pending: deque[Shadow] = deque()  # lagged: the newer snapshots, oldest first
        self.updates = 0
        self.swapped_in = False  # True only while `token_losses` runs on the history's weights
        self._loaded: dict[str, Any] | None = None

    # ------------------------------------------------------------------ lifecycle
    def setup(self, module: TokenSelectionModule) -> None:
        if not self.params:
            named = [(n, p) for n, p in module.model.named_parameters() if p.requires_grad]
            if not named:
                raise ValueError("HistoryReference found no trainable parameters in the module's model")
            self.names = [n for n, _ in named]
            self.params = [p for _, p in named]
            self.shadow = self._snapshot()  # theta_his = theta_0
        if self._loaded is not None:
            self._apply(self._loaded)
            self._loaded = None

    def callbacks(self) -> list[L.Callback]:
        return [HistoryUpdate(self)]

    @torch.no_grad()
    def _snapshot(self) -> Shadow:
        shadow = [torch.empty_like(p) for p in self.params]
        torch._foreach_copy_(_local(shadow), _local([p.detach() for p in self.params]))
        return shadow

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self) -> None:
        """Advance the history by one optimizer step (called by `HistoryUpdate`)."""
        self._require_setup()
        live = _local([p.detach() for p in self.params])
        if self.mode == "ema":
            torch._foreach_lerp_(_local(self.shadow), live, 1.0 - self.decay)  # his + (1-d)(theta - his)
        elif len(self.pending) < self.lag:
            self.pending.append(self._snapshot())
        else:  # recycle the oldest buffer for the newest snapshot
            recycled, self.shadow = self.shadow, self.pending.popleft()
            torch._foreach_copy_(_local(recycled), live)
            self.pending.append(recycled)
        self.updates += 1

    # ------------------------------------------------------------------ losses
    @torch.no_grad()
    def token_losses(self, module: TokenSelectionModule, batch: Batch) -> torch.Tensor:
        self._require_setup()
        # `.data` shares storage but not the version counter: the training forward that already
        # saved these parameters for backward sees the exact values again after the restore.
        live = _local([p.data for p in self.params])
        saved = [torch.empty_like(t) for t in live]
        torch._foreach_copy_(saved, live)
        try:
            torch._foreach_copy_(live, _local(self.shadow))
            self.swapped_in = True  # `HistoryUpdate.on_before_backward` refuses a backward now
            # FSDP2: the root keeps live unsharded values after the training forward; gather afresh.
            with fresh_root_gather(module.model):
                losses = model_token_losses(module.model, batch)  # [B, T-1]
        finally:
            torch._foreach_copy_(live, saved)  # bit-identical restore
            self.swapped_in = False
        return self.checked(module, batch, losses)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        if not self.params:  # not set up yet: hand back what a resume left pending, if anything
            return self._loaded or {}
        self._require_setup()
        return {
            "mode": self.mode,
            "lag": self.lag,
            "updates": self.updates,
            "names": list(self.names),
            "shadow": dict(zip(self.names, self.shadow, strict=True)),
            "pending": [dict(zip(self.names, snap, strict=True)) for snap in self.pending],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved history; before `setup` (Lightning resume) it is kept and applied in `setup`."""
        if not state:
            return
        if self.params:
            self._apply(state)
        else:
            self._loaded = state

    @torch.no_grad()
    def _apply(self, state: dict[str, Any]) -> None:
        if (state["mode"], state["lag"]) != (self.mode, self.lag):
            raise ValueError(
                f"checkpointed history is mode={state['mode']!r}, lag={state['lag']}; this run has "
                f"mode={self.mode!r}, lag={self.lag}: keep them equal when resuming"
            )
        if list(state["names"]) != self.names:
            missing = sorted(set(self.names) ^ set(state["names"]))[:5]
            raise ValueError(f"checkpointed history covers other trainable parameters (differing: {missing})")

        def restore(saved: dict[str, torch.Tensor], into: Shadow | None = None) -> Shadow:
            into = into if into is not None else [torch.empty_like(p) for p in self.params]
            for target, name in zip(into, self.names, strict=True):
                target.copy_(_laid_out_like(saved[name], target))
            return into

        restore(state["shadow"], self.shadow)
        self.pending = deque(restore(snap) for snap in state["pending"])
        self.updates = int(state["updates"])

    def _require_setup(self) -> None:
        if not self.params:
            raise RuntimeError("HistoryReference.setup(module) was not called (call it in configure_model)")
        # Lightning moves the model to its device after configure_model; follow it.
        device = self.params[0].device
        if self.shadow[0].device != device:
            self.shadow = [t.to(device) for t in self.shadow]
            self.pending = deque([t.to(device) for t in snap] for snap in self.pending)


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's local storage: a DTensor's shard (foreach ops have no DTensor rule), others as they are."""
    from torch.distributed.tensor import DTensor

    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def _laid_out_like(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`source` as `target` is laid out: a full tensor (from a consolidated or single-process
    checkpoint) restoring a sharded history is cut to this rank's shard, without communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor) and not isinstance(source, DTensor):
        return distribute_tensor(
            source.to(target.device), target.device_mesh, target.placements, src_data_rank=None
        )
    return source
