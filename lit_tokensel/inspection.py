r"""`lit-tokensel inspect`: what a method keeps, token by token, written as JSON lines.

    lit-tokensel inspect -c configs/quickstart.yaml -c configs/methods/rho1.yaml \
        --output runs/rho1_inspect.jsonl --limit 50 [--ckpt_path runs/.../last.ckpt] [--split train]

The method runs its own selection (the same `select_batch` as in training, in eval mode, no grad) on
the split in sample order, in batches of `data.batch_size`, so batch-scope rankings see batches of the
training size. One line per sample: `sample_id`, the target tokens as text, and aligned with them
(response positions only) the position in the `[T-1]` frame, the trained model's loss, every named
score of the method and the keep decision. With `--ckpt_path` the weights and the method's callback
state (e.g. an EMA history) come from that checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from lit_tokensel.checkpoint_io import load_checkpoint_file
from lit_tokensel.selection.segments import as_samples
from lit_tokensel.trusted_classes import dotted_name

if TYPE_CHECKING:
    from lit_tokensel.data.datamodule import SFTDataModule
    from lit_tokensel.methods.base import SelectedBatch, TokenSelectionModule


def load_training_state(module: TokenSelectionModule, checkpoint_path: str | os.PathLike) -> int:
    """Load a Lightning checkpoint's weights and the module's own callbacks' state; return its global step.

    The file is read safely (`load_checkpoint_file`); besides the allow-list it may name `module`'s
    own class, which the caller chose.
    """
    checkpoint = load_checkpoint_file(checkpoint_path, also_trusted=[dotted_name(type(module))])
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    saved = checkpoint.get("callbacks", {})
    for callback in module.configure_callbacks():
        if callback.state_key in saved:
            callback.load_state_dict(saved[callback.state_key])
    return int(checkpoint.get("global_step", 0))


def sample_records(
    selected: SelectedBatch,
    original: dict[str, torch.Tensor],
    tokenizer: Any,
    step: int | None,
    weights: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """One JSON-ready record per sample of `original`; samples the method dropped keep nothing.

    `weights` `[B', T-1]` are the tokens' effective CE weights (`TokenSelectionModule.token_weights`),
    the method's own times the data's; default: the selection's own weights.
    """
    if weights is None:
        weights = selected.selection.weights
    rows = range(original["input_ids"].shape[0])
    kept_rows = selected.samples.nonzero().flatten().tolist() if selected.samples is not None else list(rows)
    position_in_selected = {row: i for i, row in enumerate(kept_rows)}
    targets = original["labels"][:, 1:]  # [B, T-1]
    records = []
    for row in rows:
        valid = targets[row] != -100  # [T-1]
        positions = valid.nonzero().flatten()
        target_ids = targets[row][positions].tolist()
        record: dict[str, Any] = {
            "sample_id": int(original["sample_id"][row]),
            "step": step,
            "sample_kept": row in position_in_selected,
            "positions": positions.tolist(),
            "tokens": tokenizer.convert_ids_to_tokens(target_ids),
            "text": [tokenizer.decode([t]) for t in target_ids],
        }
        if row in position_in_selected:
            i = position_in_selected[row]
            keep = selected.selection.keep[i] & selected.valid[i]
            record["loss"] = _values(selected.token_losses[i], positions)
            record["keep"] = keep[positions].tolist()
            record["scores"] = {
                name: _values(s[i], positions) for name, s in selected.selection.scores.items()
            }
            if weights is not None:
                record["weight"] = _values(weights[i], positions)
            if selected.data_weights is not None:
                record["data_weight"] = _values(selected.data_weights[i], positions)
        else:
            record.update(loss=None, keep=[False] * len(target_ids), scores={})
        records.append(record)
    return records


def _values(row: torch.Tensor, positions: torch.Tensor) -> list[float]:
    return [round(v, 6) for v in row.detach().float()[positions].tolist()]


@torch.no_grad()
def inspect_selection(
    module: TokenSelectionModule,
    datamodule: SFTDataModule,
    output: str | os.PathLike,
    *,
    limit: int | None = None,
    split: str = "train",
    ckpt_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Run `module`'s selection over the first `limit` samples of `split` and write one JSON line per sample."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1")
    if datamodule.tokenizer_source is None:
        datamodule.tokenizer_source = module.tokenizer
    datamodule.setup("fit")
    dataset = datamodule.train_dataset if split == "train" else datamodule.val_dataset
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"the DataModule has no {split} data to inspect")
    collator = datamodule.train_collator if split == "train" else datamodule.collator
    module.configure_model()
    step = load_training_state(module, ckpt_path) if ckpt_path is not None else None
    module.prepare_selection(datamodule)
    module.eval()
    count = len(dataset) if limit is None else min(limit, len(dataset))
    loader = DataLoader(
        Subset(dataset, range(count)), batch_size=datamodule.batch_size, shuffle=False, collate_fn=collator
    )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")  # an interrupted run never clobbers a finished file
    with (
        partial.open("w") as handle,
        tqdm(total=count, desc=f"Inspecting {split}", unit="sample", disable=not progress) as bar,
    ):
        for batch in loader:
            batch = {k: v.to(module.device) for k, v in batch.items()}
            samples = as_samples(batch)  # packed rows: one record per sample all the same
            selected = module.select_batch(batch)
            weights = module.token_weights(selected)  # [B', T-1] or None
            for record in sample_records(selected, samples, module.tokenizer, step, weights):
                handle.write(json.dumps(record) + "\n")
            bar.update(samples["input_ids"].shape[0])
    partial.replace(output)
    return output


SUMMARY_QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def selection_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What an `inspect` file says in a few numbers: samples, response tokens, kept tokens and fraction,
    and quantiles of the ranked score (the method's first score; none for methods without scores)."""
    samples = tokens = kept = 0
    name: str | None = None
    values: list[float] = []
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            samples += 1
            tokens += len(record["keep"])
            kept += sum(record["keep"])
            if record["scores"]:
                name = name or next(iter(record["scores"]))
                values += record["scores"].get(name, [])
    summary: dict[str, Any] = {
        "samples": samples,
        "tokens": tokens,
        "kept": kept,
        "kept_fraction": kept / tokens if tokens else 0.0,
        "score": name,
    }
    if values:
        q = torch.quantile(
            torch.tensor(values, dtype=torch.float64), torch.tensor(SUMMARY_QUANTILES, dtype=torch.float64)
        )
        summary["quantiles"] = dict(zip(SUMMARY_QUANTILES, q.tolist(), strict=True))
    return summary


def format_summary(summary: dict[str, Any]) -> list[str]:
    """The summary as lines for the terminal."""
    lines = [
        f"{summary['samples']} samples, {summary['tokens']} response tokens, kept {summary['kept']} "
        f"({100 * summary['kept_fraction']:.1f}%)"
    ]
    if "quantiles" in summary:
        spread = "  ".join(f"q{round(100 * q)}={v:.4g}" for q, v in summary["quantiles"].items())
        lines.append(f"score {summary['score']}: {spread}")
        if summary["quantiles"][1.0] - summary["quantiles"][0.0] < 1e-4:
            lines.append(
                "every score is equal (within 1e-4): the keep flags are ties broken by position "
                "(is the reference the model itself?)"
            )
    return lines
