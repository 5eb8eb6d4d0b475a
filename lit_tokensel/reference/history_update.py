"""Schedule and checkpointing of a `HistoryReference`: one update per optimizer step, state in checkpoints.

Not Lightning's `WeightAveraging`: that deep-copies the whole model (fails under FSDP2) and swaps
the average in for validation, which is wrong for a history model that only scores tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L

if TYPE_CHECKING:
    from lit_tokensel.reference.history import HistoryReference


class HistoryUpdate(L.Callback):
    """Update `history` after every optimizer step (not every micro-batch) and checkpoint its tensors.

    A step is detected by `trainer.global_step` advancing, so gradient accumulation, skipped steps
    and the flush at an epoch's end all count correctly. On resume the saved history is restored
    (kept pending until the reference's `setup` when the checkpoint loads first).

    Args:
        history: The reference whose shadow weights this callback advances.
    """

    def __init__(self, history: HistoryReference) -> None:
        self.history = history
        self._last_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Any) -> None:
        """The live weights must be back before backward: the swap goes through `.data`, which autograd
        does not track, so a backward on swapped-in weights would give wrong gradients without an error."""
        if self.history.swapped_in:
            raise RuntimeError(
                "backward while the history weights are swapped into the model: HistoryReference.token_losses "
                "must return (restoring the live weights) before the loss is backpropagated"
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._last_step is None:
            self._last_step = trainer.global_step
            return
        for _ in range(trainer.global_step - self._last_step):
            self.history.update()
        self._last_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return self.history.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history.load_state_dict(state_dict)
