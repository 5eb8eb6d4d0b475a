"""Multi-process training: FSDP2 sharding, strategies, global-batch selection, sharded checkpoints."""

from lit_tokensel.distributed.checkpoint import consolidate_checkpoint, load_checkpoint_dict
from lit_tokensel.distributed.fsdp import shard_model
from lit_tokensel.distributed.strategies import FSDP2Strategy, FSDPStrategy
from lit_tokensel.distributed.topk import (
    all_gather_padded,
    check_selection_group,
    global_top_k_per_batch,
    resolve_process_group,
)

__all__ = [
    "FSDP2Strategy",
    "FSDPStrategy",
    "all_gather_padded",
    "check_selection_group",
    "consolidate_checkpoint",
    "global_top_k_per_batch",
    "load_checkpoint_dict",
    "resolve_process_group",
    "shard_model",
]
