r"""The noisy-SFT benchmark: does each method keep the right tokens, what does it cost, and the table.

    python -m lit_tokensel_bench.noisy_sft                 # full run: 2 regimes x 3 seeds x every method (~45 min, 2 cores)
    python -m lit_tokensel_bench.noisy_sft --quick         # one seed, ratio 0.8, smaller model and data (~5 min)
    python -m lit_tokensel_bench.noisy_sft --only rho1 sstoken --regimes pretrained   # a subset (rows by key prefix)
    python -m lit_tokensel_bench.noisy_sft --only dft --merge benchmarks/results/noisy_sft/results.json
                                                          # re-run some rows, keep the other rows' results

Stages, each a job in a fresh worker process (`--jobs` at a time, one thread each):
  1. data (`lit_tokensel_bench.noisy_sft.data`): noisy SFT rows with every corrupted span recorded, clean
     reference rows, a clean base corpus over disjoint entities; a tokenizer and a random-init model;
  2. per regime: the starting model (`scratch`: the random init; `pretrained`: full SFT of the init on
     the base corpus), a reference (full SFT of the starting model on the clean reference rows, as many
     steps as the methods train) and the base and reference scoring passes over the noisy rows;
  3. every method row x seed (`plan.py`): train, evaluate on the clean test tasks through
     `lit_tokensel_eval`, and `inspect` the selection at even fractions of training;
  4. the report (`report.py`): results.json, results.md, plots, the token HTML page, and (full runs)
     the README's Results section.
Finished jobs are kept in `--workdir` and skipped when the benchmark is run again with the same settings.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from lit_tokensel_bench.noisy_sft import jobs
from lit_tokensel_bench.noisy_sft.plan import (
    FULL,
    QUICK,
    REGIMES,
    SMOLLM2,
    MethodRow,
    Settings,
    regime_rows,
    search_regime_rows,
)
from lit_tokensel_bench.worker_guard import exit_with_parent

REPO = Path(__file__).resolve().parents[3]
METHOD_CONFIGS = REPO / "configs" / "methods"
console = Console(stderr=True, highlight=False)


@dataclass
class Task:
    """One node of the job graph."""

    name: str
    run: Callable[[dict[str, Any]], dict[str, Any]]
    job: dict[str, Any]
    deps: tuple[str, ...] = ()
    done: Callable[[], bool] = lambda: False
    result: dict[str, Any] | None = None
    error: str | None = None
    cost: float = 1.0
    """Relative cost, for the ETA (e.g. 2 for a job twice as long as a cost-1 job)."""


@dataclass
class Paths:
    """Where everything of one benchmark run lives."""

    root: Path
    data: dict[str, Path] = field(default_factory=dict)

    @property
    def init_model(self) -> Path:
        return self.root / "models" / "init"

    @property
    def labels(self) -> Path:
        return self.root / "data" / "train.token_labels.json"

    @property
    def kinds(self) -> Path:
        return self.root / "data" / "train.token_kinds.json"

    def run_dir(self, regime: str, name: str) -> Path:
        return self.root / regime / name

    def cache(self, regime: str, name: str) -> Path:
        return self.root / regime / "cache" / name

    def result(self, regime: str, key: str, seed: int) -> Path:
        return self.root / regime / "results" / key / f"seed{seed}.json"


# ------------------------------------------------------------------------------------------------ stage 1


def prepare_data(settings: Settings, paths: Paths) -> None:
    """Benchmark data, tokenizer and random-init model, and per-token corruption labels (skipped when present)."""
    from lit_tokensel_bench.noisy_sft.data import (
        BenchmarkSizes,
        corruption_token_kinds,
        read_corruption,
        write_benchmark_data,
    )

    sizes = BenchmarkSizes(
        train_rows=settings.train_rows, reference_rows=settings.reference_rows, base_rows=settings.base_rows
    )
    paths.data = write_benchmark_data(paths.root / "data", sizes, seed=settings.data_seed)
    if settings.pretrained_model is None:
        tokenizer = build_init_model(settings, paths)
    else:
        from lit_tokensel.modeling.loading import load_tokenizer

        tokenizer = load_tokenizer(settings.pretrained_model)
    if paths.labels.is_file() and paths.kinds.is_file():
        return
    rows = [json.loads(line) for line in paths.data["train"].read_text(encoding="utf-8").splitlines()]
    spans = read_corruption(paths.data["corruption"])
    kinds = [
        corruption_token_kinds(tokenizer, row["messages"], row_spans, settings.max_length)
        for row, row_spans in zip(rows, spans, strict=True)
    ]
    jobs.write_json(paths.kinds, kinds)
    jobs.write_json(paths.labels, [[int(kind is not None) for kind in row] for row in kinds])


def build_init_model(settings: Settings, paths: Paths) -> Any:
    """A byte-level BPE tokenizer trained on the benchmark's texts and a seeded random-init Llama."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lit_tokensel.builtin.tokenizer import build_chat_tokenizer
    from lit_tokensel_bench.noisy_sft.data import read_corpus

    target = paths.init_model
    if (target / "config.json").is_file():
        return AutoTokenizer.from_pretrained(target)
    texts = read_corpus(paths.data["corpus"])
    shape = settings.model
    tokenizer = build_chat_tokenizer(texts, vocab_size=shape.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=2 * settings.max_length,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(settings.data_seed)
    staging = target.with_name(".init-staging")
    LlamaForCausalLM(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)
    return tokenizer


# ------------------------------------------------------------------------------------------------ stages 2-3


def common_args(
    settings: Settings,
    paths: Paths,
    *,
    config: str,
    model: Path | str,
    train_file: Path,
    seed: int,
    epochs: int,
    learning_rate: float,
    run_dir: Path,
) -> list[str]:
    """`lit-tokensel fit` arguments shared by every run: CPU fp32, no logger or validation, export at the end."""
    stacked = [a for extra in settings.extra_configs for a in ("-c", str(REPO / "configs" / extra))]
    tokenizer = ["--data.tokenizer", str(paths.init_model)] if settings.pretrained_model is None else []
    return [
        "-c",
        str(config if config.endswith(".yaml") else METHOD_CONFIGS / f"{config}.yaml"),
        *stacked,
        "--seed_everything",
        str(seed),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32-true",
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.default_root_dir",
        str(run_dir),
        "--data.train_file",
        str(train_file),
        "--data.max_length",
        str(settings.max_length),
        "--data.batch_size",
        str(settings.batch_size),
        "--data.seed",
        str(seed),
        *tokenizer,
        "--model.init_args.model",
        str(model),
        "--model.init_args.learning_rate",
        str(learning_rate),
        "--export.output_dir",
        str(run_dir / "export"),
        *settings.extra_args,
    ]


def starting_model(settings: Settings, paths: Paths, regime: str) -> Path | str:
    """The model every run of `regime` starts from (and the base model of the cached passes)."""
    if regime == "scratch":
        return paths.init_model
    return settings.pretrained_model or paths.run_dir("pretrained", "base") / "export"


def exported(directory: Path) -> Callable[[], bool]:
    return lambda: (directory / "export" / "config.json").is_file()


def cache_done(directory: Path) -> Callable[[], bool]:
    from lit_tokensel.recipes.stages import cache_complete

    return lambda: cache_complete(directory)


def regime_tasks(settings: Settings, paths: Paths, regime: str, threads: int) -> list[Task]:
    """Starting model (pretrained regime), reference, base and reference scoring passes."""
    tasks = []
    start = starting_model(settings, paths, regime)
    start_deps: tuple[str, ...] = ()
    if regime == "pretrained" and settings.pretrained_model is None:
        base_dir = paths.run_dir(regime, "base")
        tasks.append(
            Task(
                f"{regime}/base",
                jobs.fit_job,
                {
                    "name": "base",
                    "threads": threads,
                    "run_dir": str(base_dir),
                    "result": str(base_dir / "fit.json"),
                    "args": common_args(
                        settings,
                        paths,
                        config="full_sft",
                        model=paths.init_model,
                        train_file=paths.data["base"],
                        seed=settings.data_seed,
                        epochs=settings.base_epochs,
                        learning_rate=settings.learning_rate["scratch"],
                        run_dir=base_dir,
                    ),
                },
                done=exported(base_dir),
            )
        )
        start_deps = (f"{regime}/base",)
    ref_dir = paths.run_dir(regime, "reference")
    ref_steps_per_epoch = math.ceil(settings.reference_rows / settings.batch_size)
    ref_epochs = max(
        1, round(settings.total_steps / ref_steps_per_epoch)
    )  # as many steps as the methods train
    tasks.append(
        Task(
            f"{regime}/reference",
            jobs.fit_job,
            {
                "name": "reference",
                "threads": threads,
                "run_dir": str(ref_dir),
                "result": str(ref_dir / "fit.json"),
                "args": common_args(
                    settings,
                    paths,
                    config="full_sft",
                    model=start,
                    train_file=paths.data["reference"],
                    seed=settings.data_seed,
                    epochs=ref_epochs,
                    learning_rate=settings.learning_rate[regime],
                    run_dir=ref_dir,
                ),
            },
            deps=start_deps,
            done=exported(ref_dir),
        )
    )
    for name, model, deps in (
        ("base", start, start_deps),
        ("reference", ref_dir / "export", (f"{regime}/reference",)),
    ):
        output = paths.cache(regime, name)
        tasks.append(
            Task(
                f"{regime}/score-{name}",
                jobs.score_job,
                {
                    "name": f"score-{name}",
                    "threads": threads,
                    "output": str(output),
                    "args": common_args(
                        settings,
                        paths,
                        config="full_sft",
                        model=model,
                        train_file=paths.data["train"],
                        seed=settings.data_seed,
                        epochs=1,
                        learning_rate=1e-3,
                        run_dir=output,
                    ),
                },
                deps=deps,
                done=cache_done(output),
            )
        )
    for name, model, deps in (
        ("reference", ref_dir / "export", (f"{regime}/reference",)),
        ("base", start, start_deps),
    ):
        if name == "base" and regime == "scratch":
            continue  # a random init: nothing to report
        result = paths.result(regime, name if name == "reference" else "base-model", 0)
        tasks.append(
            Task(
                f"{regime}/eval-{name}",
                jobs.eval_job,
                {"name": name, "threads": threads, "model": str(model), "result": str(result)},
                deps=deps,
                done=result.is_file,
            )
        )
    return tasks


def method_args(
    settings: Settings, paths: Paths, regime: str, row: MethodRow, seed: int, run_dir: Path
) -> list[str]:
    """The row's method config and ratio on top of the common arguments, with the regime's caches and models."""
    config = row.config
    epochs = settings.epochs
    extra: list[str] = []
    if row.family == "oracle":
        config = str(paths.root / "oracle.yaml")
        extra += ["--model.init_args.labels_file", str(paths.labels)]
    if row.family == "tokencleaning-se":
        chunks = settings.self_evolving_chunks
        epochs = settings.epochs * chunks  # one chunk per epoch: as many steps as the others
        extra += ["--model.init_args.chunks", str(chunks), "--data.epoch_chunks", str(chunks)]
    caches = cache_names(row, config)
    if caches:
        extra += ["--data.cached_losses", json.dumps({n: str(paths.cache(regime, n)) for n in caches})]
    substitutions = {
        "{reference}": str(paths.run_dir(regime, "reference") / "export"),
        "{base}": str(starting_model(settings, paths, regime)),
        "{seed}": str(seed),
    }
    overrides = [substitutions.get(a, a) for a in row.overrides]
    return (
        common_args(
            settings,
            paths,
            config=config,
            model=starting_model(settings, paths, regime),
            train_file=paths.data["train"],
            seed=seed,
            epochs=epochs,
            learning_rate=settings.learning_rate[regime],
            run_dir=run_dir,
        )
        + extra
        + overrides
    )


def cache_names(row: MethodRow, config: str) -> list[str]:
    """The cached scoring passes a row reads: those its config joins, plus ssToken's base history."""
    import yaml

    path = Path(config) if config.endswith(".yaml") else METHOD_CONFIGS / f"{config}.yaml"
    data = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data") or {}
    names = sorted((data.get("cached_losses") or {}).keys())
    if any("CachedReference" in o for o in row.overrides):
        names = sorted({*names, "base"})
    return names


def write_oracle_config(paths: Paths) -> None:
    paths.root.mkdir(parents=True, exist_ok=True)
    (paths.root / "oracle.yaml").write_text(
        "model:\n  class_path: lit_tokensel_bench.noisy_sft.oracle.OracleSFT\n  init_args:\n"
        "    learning_rate: 3.0e-3\n    lr_schedule: cosine\n    warmup_ratio: 0.05\n",
        encoding="utf-8",
    )


def method_tasks(
    settings: Settings, paths: Paths, regime: str, rows: list[MethodRow], threads: int, prep: tuple[str, ...]
) -> list[Task]:
    """Every row x seed of `regime`, each after the regime's `prep` tasks (starting model, reference, caches)."""
    tasks = []
    for row in rows:
        if row.config is None:
            continue
        for seed in settings.seeds:
            run_dir = paths.run_dir(regime, f"{row.key}/seed{seed}")
            result = paths.result(regime, row.key, seed)
            tasks.append(
                Task(
                    f"{regime}/{row.key}/seed{seed}",
                    jobs.fit_job,
                    {
                        "name": f"{regime}/{row.key}/seed{seed}",
                        "threads": threads,
                        "run_dir": str(run_dir),
                        "result": str(result),
                        "evaluate": True,
                        "args": method_args(settings, paths, regime, row, seed, run_dir),
                        "inspect": {
                            "points": settings.inspect_points,
                            "limit": settings.inspect_limit,
                            "labels": str(paths.labels),
                            "score": list(row.score) if row.score else None,
                        },
                    },
                    deps=prep,
                    done=result.is_file,
                )
            )
    return tasks


# ------------------------------------------------------------------------------------------------ scheduling


def finish(started: float, outputs: dict[str, Any], failed: list[Task]) -> int:
    """The run's last lines (its time, the files it wrote, the failed jobs with their errors); the exit code."""
    console.rule(f"done in {(time.perf_counter() - started) / 60:.1f} min")
    for name, path in outputs.items():
        console.print(f"{name:<18} {path}")
    if failed:
        console.print(f"[red]{len(failed)} job(s) failed:[/red]")
        for task in failed:
            console.print(f"  {task.name}: {task.error}")
        return 1
    return 0


def run_graph(
    tasks: list[Task], workers: int, describe: Callable[[dict[str, Any]], str] | None = None
) -> list[Task]:
    """Run tasks in dependency order, `workers` at a time, each in a fresh process; return the failed ones.
    A line per finished job: `describe(result)` (default `summary`), its time and the ETA of the rest."""
    describe = describe or summary
    by_name = {t.name: t for t in tasks}
    pending = [t for t in tasks if not t.done()]
    finished = {t.name for t in tasks} - {t.name for t in pending}
    skipped = len(tasks) - len(pending)
    if skipped:
        console.print(f"[dim]{skipped} finished job(s) found in the workdir, skipped[/dim]")
    failed: list[Task] = []
    running: dict[Future, tuple[Task, float]] = {}
    total, count = len(pending), 0
    spent, done_cost, left_cost = 0.0, 0.0, sum(t.cost for t in pending)
    context = mp.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, max_tasks_per_child=1, initializer=exit_with_parent
    ) as pool:
        while pending or running:
            blocked = [
                t for t in pending if any(d in {f.name for f in failed} or by_name[d].error for d in t.deps)
            ]
            for task in blocked:
                task.error = "a job it depends on failed"
                failed.append(task)
                pending.remove(task)
            ready = [t for t in pending if all(d in finished for d in t.deps)]
            for task in ready[: max(0, workers - len(running))]:
                pending.remove(task)
                running[pool.submit(task.run, task.job)] = (task, time.perf_counter())
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task, started = running.pop(future)
                count += 1
                seconds = time.perf_counter() - started
                spent, done_cost, left_cost = spent + seconds, done_cost + task.cost, left_cost - task.cost
                eta = f", ETA {eta_text(spent / done_cost * left_cost / workers)}" if left_cost > 0 else ""
                try:
                    task.result = future.result()
                    finished.add(task.name)
                    console.print(
                        f"[{count}/{total}] {task.name}  {describe(task.result)}  ({seconds:.0f} s{eta})"
                    )
                except Exception as err:  # noqa: BLE001 - reported, the others go on
                    task.error = f"{type(err).__name__}: {err}"
                    failed.append(task)
                    console.print(f"[red][{count}/{total}] {task.name} FAILED: {task.error}[/red]")
    return failed


def eta_text(seconds: float) -> str:
    """`42 min` or `3.5 h`: the time the remaining jobs take at the finished jobs' pace (per unit of cost)."""
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def summary(result: dict[str, Any]) -> str:
    parts = []
    if "eval" in result:
        e = result["eval"]
        parts.append(f"gen {e['gen_acc']:.1%} mc {e['mc_acc']:.1%} nll {e['nll']:.3f}")
    points = [p for p in result.get("selection", []) if p.get("auc") is not None]
    if points:
        parts.append(
            f"auc {points[-1]['auc']:.3f} dropped corrupt {points[-1]['drop_corrupted']:.0%} "
            f"clean {points[-1]['drop_clean']:.0%}"
        )
    if result.get("step_time_s"):
        parts.append(f"{result['step_time_s'] * 1000:.0f} ms/step")
    return " | ".join(parts) or result.get("name", "")


# ------------------------------------------------------------------------------------------------ main


def load_settings(args: argparse.Namespace) -> Settings:
    settings = SMOLLM2 if args.smollm2 else QUICK if args.quick else FULL
    if args.seeds is not None:
        settings = replace(settings, seeds=tuple(args.seeds))
    if args.ratios is not None:
        settings = replace(settings, ratios=tuple(args.ratios))
    return settings


def check_workdir(paths: Paths, settings: Settings) -> None:
    """A workdir holds one set of settings: refuse to mix results of another."""
    saved = paths.root / "settings.json"
    current = {k: v for k, v in settings.to_dict().items() if k not in ("seeds", "ratios")}
    if saved.is_file():
        # a field missing from an older settings file did not exist then: it had its default value
        defaults = {k: v for k, v in Settings().to_dict().items() if k in current}
        before = json.loads(json.dumps(defaults)) | json.loads(saved.read_text(encoding="utf-8"))
        if before != json.loads(json.dumps(current)):
            changed = sorted(k for k in current if before.get(k) != json.loads(json.dumps(current[k])))
            raise SystemExit(
                f"{paths.root} holds a benchmark run with other settings (differs in {changed}); "
                f"use another --workdir or delete it"
            )
    jobs.write_json(saved, current)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lit_tokensel_bench.noisy_sft",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one seed, ratio 0.8, smaller model and data")
    mode.add_argument(
        "--smollm2",
        action="store_true",
        help="the real-model run: SmolLM2-135M-Instruct with LoRA (needs the smollm2 extra)",
    )
    parser.add_argument(
        "--search",
        action="store_true",
        help="the pre-registered search beyond ssToken (docs/beyond-sstoken.md): its six variants and "
        "the rows they are compared with; report into docs/beyond-sstoken.md",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="default runs/noisy_sft, runs/noisy_sft_quick or runs/noisy_sft_smollm2",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes, the cores split between them (default 2; 1 with --smollm2)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--ratios", type=float, nargs="+", default=None)
    parser.add_argument("--regimes", nargs="+", choices=REGIMES, default=None)
    parser.add_argument("--only", nargs="+", default=None, help="rows whose key starts with one of these")
    parser.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="README to write the summary into (default: the repo README for full runs, none for "
        "--quick); the full tables go to docs/benchmarks.md beside it",
    )
    parser.add_argument(
        "--no-readme", action="store_true", help="write neither the README nor docs/benchmarks.md"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="keep the rows of this results.json that this run does not have (e.g. the committed "
        "benchmarks/results/noisy_sft/results.json when re-running a few rows with --only); "
        "the token page then shows this run's rows only",
    )
    parser.add_argument(
        "--report-dir",
        type=Path,
        default=None,
        help="where the report goes (default benchmarks/results/<mode> for full and --smollm2 runs, "
        "<workdir>/report for --quick)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from lit_tokensel_bench.noisy_sft.collect import collect_results, collect_samples, merge_results
    from lit_tokensel_bench.noisy_sft.report import write_outputs

    args = parse_args(argv)
    settings = load_settings(args)
    suffix = "_smollm2" if args.smollm2 else "_quick" if args.quick else ""
    name = "beyond_sstoken" if args.search else "noisy_sft"
    paths = Paths((args.workdir or Path("runs") / f"{name}{suffix}").resolve())
    regimes = args.regimes or list(settings.regimes)
    workers = args.jobs or (1 if args.smollm2 else 2)
    threads = max(1, (os.cpu_count() or 2) // workers)
    command = "python -m lit_tokensel_bench.noisy_sft " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    started = time.perf_counter()
    check_workdir(paths, settings)
    console.rule(f"noisy-SFT benchmark → {paths.root}")
    prepare_data(settings, paths)
    write_oracle_config(paths)
    select_rows = search_regime_rows if args.search else regime_rows
    rows = {
        regime: [
            r
            for r in select_rows(settings, regime)
            if args.only is None or r.key in ("full", "reference") or r.key.startswith(tuple(args.only))
        ]
        for regime in regimes
    }
    tasks = []
    for regime in regimes:
        prep = regime_tasks(settings, paths, regime, threads)
        tasks += prep
        tasks += method_tasks(
            settings,
            paths,
            regime,
            rows[regime],
            threads,
            tuple(t.name for t in prep if "/eval-" not in t.name),
        )
    console.print(
        f"{len(tasks)} jobs, {workers} at a time with {threads} thread(s) each; {len(settings.seeds)} seed(s), ratios "
        f"{list(settings.ratios)}, {settings.total_steps} optimizer steps per run"
    )
    failed = run_graph(tasks, workers)
    results = collect_results(settings, paths, rows, command)
    if args.merge is not None:
        earlier = json.loads(args.merge.read_text(encoding="utf-8"))  # read before the report overwrites it
        results = merge_results(results, earlier, str(args.merge))
    samples = [collect_samples(settings, paths, regime, rows[regime]) for regime in regimes]
    readme = None if args.no_readme else (args.readme or (None if args.quick else REPO / "README.md"))
    report_dir = args.report_dir or (
        paths.root / "report" if args.quick else REPO / "benchmarks" / "results" / f"{name}{suffix}"
    )
    page = (
        None
        if readme is None
        else readme.resolve().parent / "docs" / ("beyond-sstoken.md" if args.search else "benchmarks.md")
    )
    section = f"{name.replace('_', '-')}{suffix.replace('_', '-')}-results"
    outputs = write_outputs(
        results, samples, report_dir, page, section=section, summary_readme=None if args.search else readme
    )
    return finish(started, outputs, failed)
