"""The benchmark's units of work, each run in a fresh worker process: a training run (with its step
times, peak memory, test evaluation and selection inspections), a scoring pass, an evaluation.

Every job takes and returns plain dicts (they cross process boundaries) and writes its result file
atomically, so an interrupted benchmark keeps every finished job and redoes only the others.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lit_tokensel_bench.noisy_sft.report import atomic_write_text
from lit_tokensel_bench.step_time import StepTimer  # one timing callback for every benchmark

EVAL_TASKS = ("noisy_sft_gen", "noisy_sft_mc", "noisy_sft_nll")
TIMED_AFTER = 5  # first steps excluded from the step time (allocator and autotuning warm-up)


def quiet_worker(threads: int, log: Path) -> None:
    """One worker's process settings: its share of the cores, and its output (progress bars of lm-eval,
    scoring, warnings) in `log` instead of the benchmark's console. Errors still reach the parent."""
    log.parent.mkdir(parents=True, exist_ok=True)
    stream = open(log, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the worker process
    os.dup2(stream.fileno(), 1)
    os.dup2(stream.fileno(), 2)
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["TQDM_DISABLE"] = (
        "1"  # lm-eval's and transformers' progress bars, one per job, drown the summary
    )
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    for name in (
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "lm_eval",
        "lit_tokensel",
        "transformers",
        "datasets",
        "lit_tokensel_eval",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=1))


def rss_mib() -> float:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class FractionCheckpoints(L.Callback):
    """Save full checkpoints (callback state included, e.g. an EMA history) at `points` even fractions of training."""

    def __init__(self, directory: Path, points: int) -> None:
        self.directory, self.points = directory, points
        self.targets: dict[int, float] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        total = int(trainer.estimated_stepping_batches)
        self.targets = {
            max(1, round(total * k / self.points)): k / self.points for k in range(1, self.points + 1)
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        fraction = self.targets.get(trainer.global_step)
        if fraction is not None and not (self.directory / f"{fraction:.3f}.ckpt").is_file():
            trainer.save_checkpoint(self.directory / f"{fraction:.3f}.ckpt")


def evaluate_model(model: torch.nn.Module, tokenizer: Any, name: str) -> dict[str, float]:
    """Clean-test metrics through `lit_tokensel_eval`: gen exact match, MC accuracy, answer NLL."""
    from lit_tokensel_eval import InMemoryModel, evaluate

    run = evaluate(
        InMemoryModel(model, tokenizer, name=name), tasks=list(EVAL_TASKS), batch_size=32, bootstrap_iters=0
    )
    values = {(row.task, row.metric): row.value for row in run.rows}
    return {
        "gen_acc": values[("noisy_sft_gen", "exact_match")],
        "mc_acc": values[("noisy_sft_mc", "acc")],
        "nll": values[("noisy_sft_nll", "nll")],
    }


def fit_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration; optionally evaluate it and inspect its selection at the saved fractions.

    `job`: `args` (LightningCLI arguments), `run_dir`, `threads`, `result` (file to write), and optionally
    `evaluate` (bool), `inspect` (`{"points", "limit", "labels", "score"}`).
    """
    from lit_tokensel.cli import build_cli

    run_dir = Path(job["run_dir"])
    quiet_worker(job["threads"], run_dir / "worker.log")
    started = time.perf_counter()
    cli = build_cli(job["args"])
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    inspect = job.get("inspect")
    if inspect:
        cli.trainer.callbacks.append(FractionCheckpoints(run_dir / "inspect_ckpts", inspect["points"]))
    resident_before = rss_mib()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    result: dict[str, Any] = {
        "name": job["name"],
        "steps": cli.trainer.global_step,
        "step_time_s": statistics.median(timer.times[TIMED_AFTER:]) if timer.times[TIMED_AFTER:] else None,
        "peak_extra_mib": peak_rss_mib() - resident_before,
        "train_loss": float(cli.trainer.callback_metrics.get("train/loss", float("nan"))),
    }
    if job.get("evaluate"):
        result["eval"] = evaluate_model(cli.model.model, cli.model.tokenizer, job["name"])
    if inspect:
        result["selection"] = inspect_points(cli.model, cli.datamodule, run_dir, inspect)
    result["seconds"] = time.perf_counter() - started
    write_json(Path(job["result"]), result)
    return result


def inspect_points(
    module: Any, datamodule: Any, run_dir: Path, inspect: dict[str, Any]
) -> list[dict[str, Any]]:
    """Selection quality at each saved fraction of training (weights and method state from the checkpoint)."""
    from lit_tokensel.inspection import inspect_selection
    from lit_tokensel_bench.noisy_sft.metrics import selection_quality

    labels = json.loads(Path(inspect["labels"]).read_text(encoding="utf-8"))
    score = tuple(inspect["score"]) if inspect.get("score") else None
    points = []
    for checkpoint in sorted((run_dir / "inspect_ckpts").glob("*.ckpt")):
        output = run_dir / "inspect" / f"{checkpoint.stem}.jsonl"
        inspect_selection(
            module, datamodule, output, limit=inspect["limit"], ckpt_path=checkpoint, progress=False
        )
        records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
        round_state = getattr(module, "round", None)  # self-evolving: only the round's chunk is scored
        if isinstance(round_state, dict):
            in_round = set(round_state["sample_ids"].tolist())
            records = [r for r in records if r["sample_id"] in in_round]
        elif hasattr(module, "chunks"):  # round 0 trains every token unscored: nothing to rank yet
            continue
        quality = selection_quality(records, labels, score)
        points.append({"fraction": float(checkpoint.stem), **quality, "samples": len(records)})
        checkpoint.unlink()  # optimizer state included; the inspect output is what we keep
    return points


def score_job(job: dict[str, Any]) -> dict[str, Any]:
    """A scoring pass (`lit-tokensel score`) of `args`' model over the training data into `output`."""
    from lit_tokensel.cli import build_cli
    from lit_tokensel.recipes.stages import score

    quiet_worker(job["threads"], Path(job["output"]).with_suffix(".log"))
    path = score(build_cli(job["args"]), Path(job["output"]), shard_size=512)
    return {"name": job["name"], "cache": str(path)}


def eval_job(job: dict[str, Any]) -> dict[str, Any]:
    """Evaluate an exported model directory on the clean test tasks."""
    from lit_tokensel.modeling.loading import load_causal_lm, load_tokenizer

    quiet_worker(job["threads"], Path(job["result"]).with_suffix(".log"))
    model = load_causal_lm(job["model"])  # an export directory or a `builtin:` name
    result = {"name": job["name"], "eval": evaluate_model(model, load_tokenizer(job["model"]), job["name"])}
    write_json(Path(job["result"]), result)
    return result
