"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for Hugging Face causal LMs: sharding plan and root handling.

The plan is the usual one for decoder-only models: every decoder layer is its own FSDP group (one
all-gather per layer), then the root takes what is left (embeddings, final norm, output head, tied or
not). Parameters stay DTensor shards of dim 0 over the data-parallel mesh; optimizer states and any
`empty_like(param)` copy (the EMA history) are sharded alike.

Our per-token loss path (`response_token_losses`) calls the decoder directly and reads the output
head's weight, bypassing the root module's forward, so FSDP's root hooks never all-gather the root's
parameters. `shard_model` therefore puts a pre-hook on the decoder that unshards the root group when
it is still sharded (and runs FSDP's lazy root initialization for a model whose root never runs
forward, like a frozen reference).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

_DECODER_HOOK_FLAG = "_lit_tokensel_root_unshard_hook"


def decoder_layer_classes(model: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """Classes of the decoder layers, from Hugging Face's `_no_split_modules` (e.g. `LlamaDecoderLayer`)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(
            f"found no decoder layer class in {type(model).__name__} (looked for `_no_split_modules` = "
            f"{sorted(names) or 'none'}); FSDP needs a transformer block class to shard per layer"
        )
    return classes


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers in module order (LoRA-wrapped models included)."""
    classes = tuple(decoder_layer_classes(model))
    return [m for m in model.modules() if isinstance(m, classes)]


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D data-parallel mesh of Lightning's `ModelParallelStrategy` mesh (tensor parallelism unsupported)."""
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"lit_tokensel shards with FSDP2 only, but the device mesh has tensor_parallel size "
            f"{mesh['tensor_parallel'].size()}. Use `lit_tokensel.distributed.FSDP2Strategy` (or "
            "ModelParallelStrategy(data_parallel_size=<world size>, tensor_parallel_size=1))."
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def mixed_precision_policy(precision: str | None) -> Any:
    """FSDP2 policy for the Trainer's precision: bf16 compute with fp32 gradient reduction for `bf16-*`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision is not None and str(precision).startswith("bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(
    model: torch.nn.Module,
    mesh: DeviceMesh,
    mp_policy: Any = None,
    reshard_root_after_forward: bool | None = None,
) -> torch.nn.Module:
    """Apply `fully_shard` to each decoder layer, then to the root; idempotent.

    Args:
        model: A Hugging Face causal LM (optionally peft-wrapped).
        mesh: The 1-D data-parallel device mesh.
        mp_policy: `MixedPrecisionPolicy` (default: none, compute in the weights' dtype).
        reshard_root_after_forward: FSDP's default (None) keeps the root's parameters unsharded after
            forward, as training needs them again in backward; a frozen model passes True.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return model
    policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_root_after_forward)
    _register_root_unshard_hook(model)
    return model


def is_fsdp(model: torch.nn.Module | None) -> bool:
    """Whether `model` is an FSDP2 root (sharded by `shard_model`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unshard_root(model: torch.nn.Module) -> None:
    """All-gather the root group's parameters (embeddings, final norm, head) if they are sharded.

    Runs FSDP's lazy initialization from the root first, so a model whose root forward never runs
    (only its decoder is called) still gets the right root.
    """
    # FSDP2 internals (stable since torch 2.4): the root's state and its own parameter group.
    state = model._get_fsdp_state()
    if state._is_root is None:
        state._lazy_init()  # must happen from the root, not from the first layer that runs
    group = state._fsdp_param_group
    if group is not None and not group.is_unsharded:
        model.unshard()


def reshard_root(model: torch.nn.Module) -> None:
    """Free the root group's unsharded parameters (they are gathered again when next needed)."""
    model.reshard()


@contextmanager
def fresh_root_gather(model: torch.nn.Module | None) -> Iterator[None]:
    """Drop any unsharded copy of the root's parameters before and after the block.

    For a forward on temporarily swapped sharded values (the EMA history): the root keeps its
    parameters unsharded after the training forward, so without this the swapped-in values would
    never reach the root's embeddings and head, and after the block backward re-gathers the live ones.
    A no-op for a model that is not sharded.
    """
    if not is_fsdp(model):
        yield
        return
    reshard_root(model)
    try:
        yield
    finally:
        reshard_root(model)


def _register_root_unshard_hook(model: torch.nn.Module) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is model or getattr(decoder, _DECODER_HOOK_FLAG, False):
        return

    def hook(module: torch.nn.Module, args: Any) -> None:
        unshard_root(model)  # a no-op inside the root's own forward, where the root is unsharded

    decoder.register_forward_pre_hook(hook, prepend=True)
    setattr(decoder, _DECODER_HOOK_FLAG, True)


def check_fsdp1_references(strategy: Any, references: list[Any]) -> None:
    """Refuse the EMA history under Lightning's FSDP1 strategy (its shadows would not match the flat shards).

    A reference says so with its `shadows_parameters` flag (`ReferenceModel.shadows_parameters`).
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy) and any(
        getattr(r, "shadows_parameters", False) for r in references
    ):
        raise ValueError(
            "HistoryReference (the EMA/lagged history) is not supported under FSDPStrategy (FSDP1). "
            "Use FSDP2: `-c configs/presets/fsdp2.yaml` (strategy lit_tokensel.distributed.FSDP2Strategy)."
        )
