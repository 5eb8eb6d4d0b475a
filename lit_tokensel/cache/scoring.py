r"""The scoring pass: per-token losses of a frozen model over one data split, written to a token-loss cache.

    lit-tokensel score -c configs/methods/full_sft.yaml -c configs/data/quickstart.yaml \
        --model.init_args.model REF_DIR --output_dir runs/ref_losses [--split train] [--shard_size 256]

The `model:` block's model is scored (eval mode, no grad) with its own `token_losses`, over the split
in sample order. Re-running into the same directory skips the shards already done; a directory made
for other data, tokenizer or model is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from lit_tokensel.cache.fingerprint import model_fingerprint
from lit_tokensel.cache.store import TokenLossCacheWriter
from lit_tokensel.selection.segments import as_samples

if TYPE_CHECKING:
    from lit_tokensel.data.datamodule import SFTDataModule
    from lit_tokensel.methods.base import TokenSelectionModule


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.inference_mode()
def _score_shard(
    module: TokenSelectionModule, dataset: Any, positions: range, datamodule: SFTDataModule
) -> tuple[list[int], list[np.ndarray]]:
    """Sample ids and `[len - 1]` float32 loss rows of the samples at `positions`, in order."""
    loader = DataLoader(
        Subset(dataset, positions),
        batch_size=datamodule.eval_batch_size,
        shuffle=False,
        collate_fn=datamodule.collator,
    )
    ids: list[int] = []
    rows: list[np.ndarray] = []
    for batch in loader:
        batch = as_samples(_to_device(batch, module.device))  # packed rows: their per-sample view
        losses, _ = module.token_losses(batch)  # [B, T-1], 0 off the response
        lengths = batch["attention_mask"].sum(dim=1)  # [B], right padding: the sample's token count
        losses = losses.float().cpu().numpy()
        for i, n in enumerate(lengths.tolist()):
            rows.append(losses[i, : n - 1].copy())
        ids.extend(batch["sample_id"].tolist())
    return ids, rows


def score_to_cache(
    module: TokenSelectionModule,
    datamodule: SFTDataModule,
    output_dir: str | os.PathLike,
    split: str = "train",
    shard_size: int = 256,
    *,
    device: str | torch.device | None = None,
    max_shards: int | None = None,
    progress: bool = True,
) -> Path:
    """Write `module`'s per-token losses on `datamodule`'s `split` to the cache dir `output_dir`; return it.

    Loads the model (`configure_model`), puts the module in eval mode on `device` (default: CUDA when
    available, else the module's device) and scores the shards not yet done. `max_shards` stops after
    that many newly written shards (a partial pass, finished by calling again). When the DataModule has
    no tokenizer of its own it uses the module's, as in training.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if datamodule.tokenizer_source is None:
        datamodule.tokenizer_source = module.tokenizer
    datamodule.setup_data()
    dataset = datamodule.train_dataset if split == "train" else datamodule.val_dataset
    if dataset is None or len(dataset) == 0:
        raise ValueError(
            f"the DataModule has no {split} data to score; configure val_file/val_fraction for 'val'"
        )
    module.configure_model()
    if device is None and torch.cuda.is_available():
        device = "cuda"
    if device is not None:
        module.to(device)
    module.eval()
    fingerprint = {
        **datamodule.loss_cache_fingerprint(split),
        "model": model_fingerprint(module.model, module.model_name_or_path),
    }
    # The writer locks the directory: a second process scoring into it waits, then finds the shards done.
    with TokenLossCacheWriter(output_dir, fingerprint, split, shard_size, num_samples=len(dataset)) as writer:
        todo = [i for i in range(writer.num_shards) if not writer.is_complete(i)]
        done_samples = len(dataset) - sum(len(_positions(i, shard_size, len(dataset))) for i in todo)
        with tqdm(
            total=len(dataset),
            initial=done_samples,
            desc=f"Scoring {split}",
            unit="sample",
            disable=not progress,
        ) as bar:
            for count, index in enumerate(todo):
                if max_shards is not None and count >= max_shards:
                    break
                positions = _positions(index, shard_size, len(dataset))
                ids, rows = _score_shard(module, dataset, positions, datamodule)
                writer.write_shard(index, ids, rows)  # refuses NaN/inf losses, naming the samples
                bar.update(len(positions))
    return writer.path


def _positions(index: int, shard_size: int, total: int) -> range:
    return range(index * shard_size, min((index + 1) * shard_size, total))
