"""Lightning strategies preconfigured for lit_tokensel: FSDP2 (`ModelParallelStrategy`) and FSDP1.

`FSDP2Strategy` is `ModelParallelStrategy` with pure data parallelism (the whole world shards the
model; `TokenSelectionModule.configure_model` applies `fully_shard` per decoder layer) and with
callback states that hold DTensors (the EMA history) written into the distributed checkpoint rather
than pickled from rank 0 alone. `FSDPStrategy` is Lightning's FSDP1 strategy that wraps each
decoder layer by default (GPU only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import FSDPStrategy as _LightningFSDPStrategy
from lightning.pytorch.strategies import ModelParallelStrategy

from lit_tokensel.checkpoint_io import check_sharded_checkpoint
from lit_tokensel.distributed.callback_state import (
    DCP_KEY,
    extract_dtensors,
    fill_markers,
    gather_dtensors,
    live_dtensors,
    marker_paths,
)
from lit_tokensel.distributed.fsdp import decoder_layer_classes


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process (`data_parallel_size` = world size, no tensor parallelism).

    Checkpoints are DCP folders (`save_distributed_checkpoint=True`, each rank writes its shards)
    that include the DTensor callback states; `lit-tokensel export --checkpoint <folder>` and
    `lit_tokensel.distributed.consolidate_checkpoint` turn one into a single file.

    Args:
        data_parallel_size: Processes that shard the model; `auto` is the world size.
        save_distributed_checkpoint: Each rank writes its shards (True) or rank 0 writes one full file.
        **kwargs: `process_group_backend`, `timeout` of `ModelParallelStrategy`.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        callbacks = checkpoint.get("callbacks")
        if not callbacks:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if not self._save_distributed_checkpoint:
            checkpoint["callbacks"] = gather_dtensors(callbacks)  # collective: every rank gathers
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        checkpoint["callbacks"], tensors = extract_dtensors(callbacks)
        if not tensors:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not support storage_options")
        from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save

        path = Path(self.broadcast(filepath))
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": checkpoint.pop("state_dict"), DCP_KEY: tensors}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        _distributed_checkpoint_save(state, path)
        if self.global_rank == 0:
            torch.save(checkpoint, path / _METADATA_FILENAME)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if _is_sharded_checkpoint(Path(checkpoint_path)):
            check_sharded_checkpoint(checkpoint_path)  # before torch unpickles its .metadata
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        path = Path(self.broadcast(checkpoint_path))
        paths = marker_paths(checkpoint.get("callbacks", {}))
        if paths and _is_sharded_checkpoint(path):
            targets = load_callback_tensors(
                path, paths, live_dtensors(self.lightning_module.trainer.callbacks)
            )
            checkpoint["callbacks"] = fill_markers(checkpoint["callbacks"], targets)
        return checkpoint


def load_callback_tensors(
    path: Path, paths: list[str], targets: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Read the saved callback tensors `paths` from the DCP folder `path`.

    Each lands in its live DTensor in `targets` (this rank's shard only); one without a live
    counterpart (e.g. a lagged history's snapshot queue, empty before the first step) is read whole.
    """
    from torch.distributed.checkpoint import FileSystemReader, load

    state: dict[str, torch.Tensor] = {}
    metadata = None
    for key in paths:
        if key in targets:
            state[key] = targets[key]
            continue
        metadata = metadata or FileSystemReader(str(path)).read_metadata().state_dict_metadata
        meta = metadata[f"{DCP_KEY}.{key}"]
        state[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    load({DCP_KEY: state}, checkpoint_id=path)
    return state


class FSDPStrategy(_LightningFSDPStrategy):
    """Lightning's FSDP (FSDP1, GPU only) wrapping each decoder layer unless `auto_wrap_policy` is given.

    The decoder layer classes come from the model's `_no_split_modules` (e.g. `LlamaDecoderLayer`).
    Prefer `FSDP2Strategy`: under FSDP1 the EMA history is not supported and a frozen reference
    model is kept whole on every rank.
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.kwargs.get("auto_wrap_policy") is None:
            inner = getattr(self.lightning_module, "model", None)
            if inner is not None:
                from torch.distributed.fsdp.wrap import ModuleWrapPolicy

                self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(decoder_layer_classes(inner))
        return super()._setup_model(model)
