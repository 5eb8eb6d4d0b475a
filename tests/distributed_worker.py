"""Runs the training jobs of tests/test_distributed.py: one process, or one rank of a torchrun launch.

    python tests/distributed_worker.py JOBS.json                      # strategy "single" jobs
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py JOBS.json

JOBS.json: {"model": DIR, "reference": DIR, "train_file": FILE, "out": DIR, "world": 2, "jobs": [...]},
each job a dict: name, method (full | terms | rho1 | rho1_ema | rho1_lagged | rho1_lora | sstoken_ema), strategy (single | ddp | fsdp2),
per_rank_batch, max_steps, and optionally packing (packed batches), accumulate, precision, checkpoint_every (ModelCheckpoint every n steps into
`<out>/<name>/step=<n>.ckpt`), resume (a ckpt_path; with consolidate, from its consolidated single file),
export (ExportOnFitEnd into `<out>/<name>_export`).
Rank 0 writes `<out>/<name>.pt` (full weights, full history tensors, losses); every rank writes
`<out>/<name>.rank<r>.json` (what that rank holds of the history).

Data order: each rank of a distributed job reads its part of a seeded `DistributedSampler` shuffle
(Lightning's own default sampler, with an explicit seed). A single-process job with a batch of
W x per_rank_batch replays the same W samplers so that its batch i is rank 0's batch i followed by
rank 1's, ...: the global batch of the distributed run, row for row. A plain sequential or random
sampler in the single process would put other rows together.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, Sampler  # noqa: E402

from lit_tokensel import FullSFT, Rho1SFT, SsTokenSFT  # noqa: E402
from lit_tokensel.callbacks.export import ExportOnFitEnd  # noqa: E402
from lit_tokensel.data import SFTDataModule  # noqa: E402
from lit_tokensel.distributed import FSDP2Strategy  # noqa: E402
from lit_tokensel.methods.base import LossTerm, Selection  # noqa: E402
from lit_tokensel.modeling.loading import LoraSettings  # noqa: E402
from lit_tokensel.reference import AdapterDisabledReference, FrozenModelReference, HistoryReference  # noqa: E402

SEED = 7  # of the data order


class GlobalBatchSampler(Sampler[int]):
    """One process reading the global batches of `world` ranks: batch i is rank 0's batch i, then rank 1's...

    Each simulated rank is a `DistributedSampler` with the same seed as the real ranks', so with a
    batch size of `world * per_rank_batch` this process sees exactly the distributed run's global batches.
    """

    def __init__(self, n: int, world: int, per_rank_batch: int, seed: int) -> None:
        self.ranks = [
            DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=seed)
            for r in range(world)
        ]
        self.per_rank_batch = per_rank_batch

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.ranks:
            sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return sum(len(s) for s in self.ranks)

    def __iter__(self) -> Iterator[int]:
        orders, b = [list(s) for s in self.ranks], self.per_rank_batch
        for start in range(0, len(orders[0]), b):
            for order in orders:
                yield from order[start : start + b]


class OrderedData(SFTDataModule):
    """The SFT data, shuffled by `DistributedSampler(seed=SEED)` on each rank, or by the equivalent
    `GlobalBatchSampler` in one process (`world` > 1 and a single device)."""

    def __init__(self, world: int, per_rank_batch: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.world, self.per_rank_batch = world, per_rank_batch

    def train_dataloader(self) -> DataLoader:
        n, trainer = len(self.train_dataset), self.trainer
        if trainer.world_size > 1:
            sampler: Sampler[int] = DistributedSampler(
                self.train_dataset,
                num_replicas=trainer.world_size,
                rank=trainer.global_rank,
                shuffle=True,
                seed=SEED,
            )
            batch_size = self.per_rank_batch
        else:
            sampler = GlobalBatchSampler(n, self.world, self.per_rank_batch, SEED)
            batch_size = self.world * self.per_rank_batch
        return DataLoader(
            self.train_dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.train_collator or self.collator,
        )


class Collect(L.Callback):
    """At the end of fit: full weights and history (collectives on every rank), saved by rank 0."""

    def __init__(self, out: Path, name: str) -> None:
        self.out, self.name = out, name
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if os.environ.get("DW_DEBUG"):
            print("BATCH", self.name, trainer.global_rank, batch["sample_id"].tolist(), flush=True)
        if "train/loss" in trainer.callback_metrics:
            self.losses.append(float(trainer.callback_metrics["train/loss"]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.tensor import DTensor

        if trainer.world_size > 1:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(pl_module.model, options=options)  # collective under FSDP2
        else:
            weights = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        reference = getattr(pl_module, "reference", getattr(pl_module, "history", None))
        shadows, info = {}, {"rank": trainer.global_rank, "world": trainer.world_size}
        if isinstance(reference, HistoryReference):
            info["updates"] = reference.updates
            info["shadow"] = {n: layout(t) for n, t in zip(reference.names, reference.shadow, strict=True)}
            for name, tensor in zip(reference.names, reference.shadow, strict=True):
                full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                shadows[name] = full.detach().cpu().clone()
        if isinstance(reference, FrozenModelReference):
            info["reference"] = {n: layout(p) for n, p in reference.model.named_parameters()}
        info["model"] = {n: layout(p) for n, p in pl_module.model.named_parameters()}
        (self.out / f"{self.name}.rank{trainer.global_rank}.json").write_text(json.dumps(info))
        if trainer.is_global_zero:
            torch.save(
                {
                    "weights": weights,
                    "history": shadows,
                    "losses": self.losses,
                    "global_step": trainer.global_step,
                },
                self.out / f"{self.name}.pt",
            )


def layout(tensor: torch.Tensor) -> dict[str, Any]:
    """Whether `tensor` is a DTensor, and its local and full shapes."""
    from torch.distributed.tensor import DTensor

    is_dtensor = isinstance(tensor, DTensor)
    local = tensor.to_local() if is_dtensor else tensor
    return {"dtensor": is_dtensor, "local": list(local.shape), "full": list(tensor.shape)}


class SignedTermsSFT(FullSFT):
    """Test-only use of the contract's own-count term: descend on most response tokens, ascend (coefficient
    -0.3) on every third one, each mean over its own tokens of the window and all ranks."""

    def select_tokens(self, batch, token_losses, valid):
        third = valid & (torch.arange(valid.shape[1], device=valid.device) % 3 == 0)  # [B, T-1]
        rest = valid & ~third
        return Selection(
            keep=valid,
            weights=rest.float(),
            normalizer=rest.sum(),
            terms={"third": LossTerm(mask=third, coefficient=-0.3)},
        )


def build_module(spec: dict[str, Any], job: dict[str, Any]) -> L.LightningModule:
    common = {"model": spec["model"], "learning_rate": 1e-2, "lr_schedule": "cosine", "warmup_ratio": 0.0}
    if job["method"] == "full":
        return FullSFT(**common)
    if job["method"] in ("terms", "terms_full"):  # SGD: Adam would blow float noise on near-zero gradients up
        sgd = {
            **{k: v for k, v in common.items() if k != "learning_rate"},
            "optimizer": lambda p: torch.optim.SGD(p, lr=0.5),
            "lr_schedule": "constant",
        }
        return SignedTermsSFT(**sgd) if job["method"] == "terms" else FullSFT(**sgd)
    if job["method"] == "rho1":
        return Rho1SFT(reference=FrozenModelReference(model=spec["reference"]), ratio=0.6, **common)
    if job["method"] == "rho1_ema":
        return Rho1SFT(reference=HistoryReference(mode="ema", decay=0.5), ratio=0.6, **common)
    if job["method"] == "rho1_lagged":
        return Rho1SFT(reference=HistoryReference(mode="lagged", lag=1), ratio=0.6, **common)
    if job["method"] == "rho1_lora":  # reference: the base model with the adapter switched off
        lora = LoraSettings(r=4, alpha=8, dropout=0.0)
        return Rho1SFT(reference=AdapterDisabledReference(), ratio=0.6, lora=lora, **common)
    if job["method"] == "sstoken_ema":  # EMA history plus the attention score of the (sharded) last layer
        return SsTokenSFT(
            history=HistoryReference(mode="ema", decay=0.5), ratio=0.6, gamma=0.5, warmup=0.0, **common
        )
    raise ValueError(f"unknown method {job['method']!r}")


def run_job(spec: dict[str, Any], job: dict[str, Any]) -> None:
    L.seed_everything(0, workers=True, verbose=False)
    out = Path(spec["out"])
    world, single = spec["world"], job["strategy"] == "single"
    data = OrderedData(
        world=world,
        per_rank_batch=job["per_rank_batch"],
        train_file=spec["train_file"],
        tokenizer=spec["model"],
        max_length=128,
        cache_dir=str(out / "hf_cache"),
        packing=job.get("packing", False),
    )
    strategy: Any = {"single": "auto", "ddp": "ddp", "fsdp2": FSDP2Strategy()}[job["strategy"]]
    callbacks: list[L.Callback] = [Collect(out, job["name"])]
    if job.get("export"):
        callbacks.append(ExportOnFitEnd(output_dir=str(out / f"{job['name']}_export")))
    if job.get("checkpoint_every"):
        callbacks.append(
            ModelCheckpoint(
                dirpath=out / job["name"],
                every_n_train_steps=job["checkpoint_every"],
                save_top_k=-1,
                filename="{step}",
            )
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1 if single else world,
        strategy=strategy,
        max_steps=job["max_steps"],
        accumulate_grad_batches=job.get("accumulate", 1),
        precision=job.get("precision", "32-true"),
        logger=False,
        enable_checkpointing=bool(job.get("checkpoint_every")),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out / job["name"]),
        callbacks=callbacks,
    )
    resume = job.get("resume")
    if resume and job.get("consolidate"):  # resume a sharded run from its consolidated single file
        resume = consolidated(resume, out / f"{job['name']}.consolidated.ckpt")
    trainer.fit(build_module(spec, job), datamodule=data, ckpt_path=resume)


def consolidated(dcp_folder: str, target: Path) -> str:
    """Rank 0 consolidates the DCP folder into `target`; the other ranks wait for it."""
    import torch.distributed as dist

    from lit_tokensel.distributed import consolidate_checkpoint

    if not dist.is_initialized() or dist.get_rank() == 0:
        consolidate_checkpoint(dcp_folder, target)
    if dist.is_initialized():
        dist.barrier()
    return str(target)


def main(jobs_file: str) -> None:
    spec = json.loads(Path(jobs_file).read_text())
    for job in spec["jobs"]:
        run_job(spec, job)


if __name__ == "__main__":
    main(sys.argv[1])
