"""Step time and peak memory of each method relative to FullSFT, side by side in one run.

    python -m lit_tokensel_bench.step_time            # ~5 minutes on 2 CPU cores
    python -m lit_tokensel_bench.step_time --quick    # fewer steps, smaller model
    python -m lit_tokensel_bench.step_time --only QTuning ProFit   # FullSFT plus the methods matching a substring
    python -m lit_tokensel_bench.step_time --only Forgetting --accumulate 2   # steps of 2 accumulated micro-batches
    python -m lit_tokensel_bench.step_time --only DFT EAFT ASFT   # the token-weighting losses
    python -m lit_tokensel_bench.step_time --threads 1 --clock cpu   # CPU time per step, on a shared machine

Every method trains the same model (a Llama built here, random weights) on the same batches.
Each method runs in its own child process, so its peak resident memory (CPU) or peak allocated
memory (CUDA) is its own; methods are interleaved over rounds so that machine noise hits them
alike, and the reported step time is the median over all timed steps of all rounds. Cached-loss
methods get their cached columns in the batch, as the DataModule's join provides them; the join
itself happens in the data loader, outside the step. ForgettingSFT's dataset-wide threshold is taken
from the benchmark batches' cached columns (normally one pass over the cache files when fit starts).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

METHODS = (
    "FullSFT",
    "Rho1SFT (live reference)",
    "Rho1SFT (cached reference)",
    "TokenCleaningSFT (cached)",
    "ForgettingSFT (cached)",
    "QTuningSFT (r_sample 0.25)",
    "QTuningSFT (r_sample 0.5)",
    "QTuningSFT (r_sample 1.0)",
    "ProFitSFT",
    "DFTSFT",
    "EAFTSFT",
    "ASFTSFT (live frozen reference)",
)


def build_model(directory: Path, hidden: int, layers: int, vocab: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(hidden // 128, 1),
        max_position_embeddings=1024,
    )
    LlamaForCausalLM(config).save_pretrained(directory)


def make_batches(n: int, batch_size: int, length: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    """Random tokens; the first quarter of each row is prompt (-100); plus cached columns."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        input_ids = torch.randint(0, vocab, (batch_size, length), generator=g)
        labels = input_ids.clone()
        labels[:, : length // 4] = -100
        valid = labels[:, 1:] != -100
        batches.append(
            {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "labels": labels,
                "sample_id": torch.arange(batch_size),
                "cached/reference": torch.rand(batch_size, length - 1, generator=g) * 8 * valid,
                "cached/base": torch.rand(batch_size, length - 1, generator=g) * 8 * valid,
            }
        )
    return batches


def make_module(method: str, model_dir: str, batches: list[dict[str, torch.Tensor]]):
    from lit_tokensel import ASFTSFT, DFTSFT, EAFTSFT, FullSFT, Rho1SFT, TokenCleaningSFT
    from lit_tokensel.methods import forgetting
    from lit_tokensel.methods.profit import ProFitSFT
    from lit_tokensel.methods.qtuning import QTuningSFT
    from lit_tokensel.reference import CachedReference, FrozenModelReference

    common = {"model": model_dir, "learning_rate": 1e-4, "lr_schedule": "constant", "warmup_ratio": 0.0}
    if method == "FullSFT":
        return FullSFT(**common)
    if method == "Rho1SFT (live reference)":
        return Rho1SFT(reference=FrozenModelReference(model=model_dir), **common)
    if method == "Rho1SFT (cached reference)":
        return Rho1SFT(reference=CachedReference(name="reference"), **common)
    if method == "TokenCleaningSFT (cached)":
        return TokenCleaningSFT(scope="sequence", **common)
    if method == "ForgettingSFT (cached)":
        scores = torch.cat(
            [(b["cached/base"] - b["cached/reference"])[b["labels"][:, 1:] != -100] for b in batches]
        )
        forgetting.dataset_scores = lambda *args: scores  # no DataModule here: the batches are the dataset
        return forgetting.ForgettingSFT(**common)
    if method.startswith("QTuningSFT"):
        return QTuningSFT(sample_ratio=float(method.split()[-1].rstrip(")")), **common)
    if method == "ProFitSFT":
        return ProFitSFT(**common)
    if method == "DFTSFT":
        return DFTSFT(**common)
    if method == "EAFTSFT":
        return EAFTSFT(**common)
    if method == "ASFTSFT (live frozen reference)":
        return ASFTSFT(reference=FrozenModelReference(model=model_dir), **common)
    raise ValueError(method)


class StepTimer(L.Callback):
    """Time of each training batch (forward, selection, backward, optimizer step).

    `clock` is `time.perf_counter` (wall time, the default) or `time.process_time` (CPU time of this
    process, all threads): on a machine that other jobs share, CPU time counts the step's own work and
    not the time it waited for a core.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__()
        self.times: list[float] = []
        self.clock = clock
        self._start = 0.0

    def on_train_batch_start(self, *args) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = self.clock()

    def on_train_batch_end(self, *args) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(self.clock() - self._start)


def run_method(method: str, model_dir: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    from torch.utils.data import DataLoader

    torch.set_num_threads(args.threads)
    timer_callback = StepTimer(time.process_time if args.clock == "cpu" else time.perf_counter)
    batches = make_batches(
        (args.warmup + args.steps) * args.accumulate, args.batch_size, args.length, args.vocab
    )
    module = make_module(method, model_dir, batches)
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=args.warmup + args.steps,
        logger=False,
        accumulate_grad_batches=args.accumulate,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer_callback],
        precision="bf16-mixed" if torch.cuda.is_available() else "32-true",
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    peak = (
        torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    micro = timer_callback.times  # one per micro-batch; an optimizer step is the sum over its window
    steps = [sum(micro[i : i + args.accumulate]) for i in range(0, len(micro), args.accumulate)]
    queue.put((method, steps[args.warmup :], peak))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--accumulate",
        type=int,
        default=1,
        help="accumulate_grad_batches; the step time is that of a whole optimizer step",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: the process's CPU time per step instead of wall time, for a machine shared with "
        "other jobs (with --threads 1 it is the step's own work; CPU only)",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="run FullSFT and the methods containing NAME"
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.hidden, args.layers, args.length = 2, 4, 128, 2, 128
    methods = [m for m in METHODS if m == "FullSFT" or not args.only or any(n in m for n in args.only)]

    times: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, list[int]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp), args.hidden, args.layers, args.vocab)
        ctx = mp.get_context("spawn")
        for round_index in range(args.rounds):
            for method in methods:
                queue = ctx.Queue()
                child = ctx.Process(target=run_method, args=(method, tmp, args, queue))
                child.start()
                name, step_times, peak = queue.get()
                child.join()
                times[name] += step_times
                peaks[name].append(peak)
                print(
                    f"round {round_index + 1}/{args.rounds} {name:<28} median {statistics.median(step_times) * 1e3:7.1f} ms",
                    flush=True,
                )

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} threads"
    device += ", CPU time per step" if args.clock == "cpu" else ""
    memory = "peak CUDA allocated" if torch.cuda.is_available() else "peak RSS"
    print(
        f"\n{device}; Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}; "
        f"batch {args.batch_size} x {args.length} tokens, accumulate {args.accumulate}; "
        f"{args.rounds} rounds x {args.steps} timed steps\n"
    )
    base_time = statistics.median(times["FullSFT"])
    base_peak = max(peaks["FullSFT"])
    print(f"| method | median step (ms) | vs FullSFT | {memory} (MiB) | vs FullSFT |")
    print("|---|---|---|---|---|")
    for method in methods:
        step, peak = statistics.median(times[method]), max(peaks[method])
        print(
            f"| {method} | {step * 1e3:.1f} | {step / base_time:.3f}x | {peak / 2**20:.0f} | {peak / base_peak:.3f}x |"
        )


if __name__ == "__main__":
    main()
