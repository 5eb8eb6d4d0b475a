r"""The real-data study: does any token-selection method beat full SFT on real instruction data?

    python -m lit_tokensel_bench.real_sft --out /work/runs/real_sft           # the CPU budget (~3 h of compute, 2 cores)
    python -m lit_tokensel_bench.real_sft --out runs/real_sft_gpu --gpu       # the larger budget on one CUDA device
    python -m lit_tokensel_bench.real_sft --out runs/real_sft_2k --cpu-2k --only full rho1 --seeds 0
                                                                               # 2,048 training rows on CPU, the
                                                                               # head-to-head rows only
    python -m lit_tokensel_bench.real_sft --out runs/real_sft_2k --cpu-2k --only full rho1 --seeds 0 \
        --report --section real-sft-2k-results                                # its tables, into their own
                                                                               # docs/benchmarks.md section
    python -m lit_tokensel_bench.real_sft --out /work/runs/real_sft --report  # tables from whatever has finished,
                                                                               # into docs/benchmarks.md and the README
    python -m lit_tokensel_bench.real_sft --out /work/runs/real_sft --search  # + the six ssToken variants of
                                                                               # docs/beyond-sstoken.md (3 seeds each)
    python -m lit_tokensel_bench.real_sft --out /work/runs/real_sft --search --report  # their table, into
                                                                               # docs/beyond-sstoken.md

SmolLM2-135M-Instruct with the LoRA preset (`configs/presets/smollm2_lora.yaml`) is fine-tuned on a mix
of Alpaca-demo and NaturalInstructions v1 rows (`data.py`) by every method at its shipped defaults
(`plan.py`); the reference-based methods get a warm-up reference trained on a held-out slice of the same
data. Each run is scored on the AlpacaEval GPT-4-answer NLL proxy (`alpaca_eval.py`) and the offline
suite with fixed per-task limits (`lit_tokensel_eval`, per document). Jobs (a worker process each, two
torch threads): the data, the reference, the base and reference scoring passes, the base model's scores
(once, shared), then every method x seed, seed 0 of every method first. Finished jobs are kept in `--out`
and skipped when the same command runs again; a line per job gives its time and the ETA of the rest.
`--search` adds the pre-registered ssToken variants (`plan.SEARCH_METHODS`) after those jobs, in the same
workdir with the same settings, so the finished study's jobs are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from lit_tokensel_bench.noisy_sft.plan import MethodRow, Settings
from lit_tokensel_bench.noisy_sft.run import (
    Paths,
    Task,
    cache_names,
    finish,
    method_args,
    regime_tasks,
    run_graph,
)
from lit_tokensel_bench.real_sft import jobs
from lit_tokensel_bench.real_sft.plan import (
    CPU,
    CPU_2K,
    GPU,
    METHODS,
    QUICK,
    StudySettings,
    job_order,
    search_job_order,
)

REPO = Path(__file__).resolve().parents[3]
REGIME = "pretrained"
SECTION = "real-sft-results"
STUDY_COMMAND = "command.json"
"""The command that ran the study's jobs (the report's "Produced by"); a `--search` run writes its own
`search-command.json` and keeps this one."""
SEARCH_COMMAND = "search-command.json"
console = Console(stderr=True, highlight=False)


def noisy_settings(settings: StudySettings) -> Settings:
    """The noisy-SFT benchmark's settings that make its run builders (`common_args`, `method_args`,
    `regime_tasks`) train this study's runs: the given pretrained model, the LoRA preset, one regime."""
    device = ["--trainer.accelerator", "gpu"] if settings.device == "cuda" else []
    return Settings(
        seeds=settings.seeds,
        ratios=(0.6,),
        train_rows=settings.train_rows,
        reference_rows=settings.reference_rows,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        learning_rate={REGIME: settings.learning_rate},
        data_seed=settings.data_seed,
        pretrained_model=settings.model,
        extra_configs=("presets/smollm2_lora.yaml",),
        extra_args=(
            "--trainer.accumulate_grad_batches",
            "1",
            "--trainer.precision",
            settings.precision,
            *device,
        ),
        regimes=(REGIME,),
        ablations=False,
    )


def result_path(root: Path, key: str, seed: int) -> Path:
    return root / "results" / key / f"seed{seed}.json"


def base_result(root: Path) -> Path:
    return root / "results" / "base-model" / "seed0.json"


def finished(path: Path, settings: StudySettings) -> Callable[[], bool]:
    """The done-marker of a job: its result file exists and holds every score the settings ask for."""
    required = jobs.required_scores(settings)
    return lambda: path.is_file() and jobs.scored_on(json.loads(path.read_text(encoding="utf-8")), required)


def prepare_data(settings: StudySettings, paths: Paths) -> None:
    from lit_tokensel.modeling.loading import load_tokenizer
    from lit_tokensel_bench.real_sft.data import write_study_data

    paths.data = write_study_data(settings, load_tokenizer(settings.model), paths.root / "data")


def study_tasks(
    settings: StudySettings, paths: Paths, only: list[str] | None = None, search: bool = False
) -> list[Task]:
    """The job graph: reference and scoring passes (noisy-SFT's builders) that the runs need, the base
    model's scores, then every method x seed in `job_order`, then (`search`) every variant x seed in
    `search_job_order`. A run waits for its own prerequisites only, and a prerequisite no selected method
    reads is left out (`--only full rho1` trains the reference but no scoring pass). Costs (for the ETA)
    are relative to one training-and-scoring job."""
    noisy = noisy_settings(settings)
    shared = {"settings": settings.to_dict()}
    order = [
        (row, seed)
        for row, seed in job_order(settings) + (search_job_order(settings) if search else [])
        if only is None or row.key in only
    ]
    needs = {row.key: prerequisites(row) for row, _ in order}
    wanted = {name for names in needs.values() for name in names}
    prep = [t for t in regime_tasks(noisy, paths, REGIME, settings.threads) if t.name in wanted]
    for task in prep:
        task.cost = 0.5 if "/reference" in task.name else 0.15
    base = base_result(paths.root)
    tasks = [
        *prep,
        Task(
            "base-model",
            jobs.eval_job,
            {"name": "base-model", "model": settings.model, "result": str(base), **shared},
            done=finished(base, settings),
            cost=0.6,
        ),
    ]
    for row, seed in order:
        run_dir = paths.run_dir(REGIME, f"{row.key}/seed{seed}")
        result = result_path(paths.root, row.key, seed)
        tasks.append(
            Task(
                f"{row.key}/seed{seed}",
                jobs.train_eval_job,
                {
                    "name": f"{row.key}/seed{seed}",
                    "run_dir": str(run_dir),
                    "result": str(result),
                    **shared,
                    "args": method_args(noisy, paths, REGIME, row, seed, run_dir),
                },
                deps=needs[row.key],
                done=finished(result, settings),
            )
        )
    return tasks


def prerequisites(row: MethodRow) -> tuple[str, ...]:
    """The prep jobs a method row reads: the warm-up reference when its arguments name it, and the scoring
    pass of each cached loss its config joins (the reference's pass needs the reference too)."""
    caches = cache_names(row, row.config)
    names = [f"{REGIME}/reference"] if "{reference}" in row.overrides or "reference" in caches else []
    return (*names, *(f"{REGIME}/score-{name}" for name in caches))


def describe(result: dict[str, Any]) -> str:
    """A finished job's line: its proxy NLL, suite average, step time."""
    scores = result.get("scores", {})
    parts = []
    if "alpaca_eval_nll" in scores:
        parts.append(f"AlpacaEval NLL {scores['alpaca_eval_nll']:.3f}")
    suite = [v for k, v in scores.items() if k != "alpaca_eval_nll"]
    if suite:
        parts.append(f"suite avg {100 * sum(suite) / len(suite):.1f}")
    fit = result.get("fit") or {}
    if fit.get("step_time_s"):
        parts.append(f"{fit['step_time_s']:.2f} s/step")
    again = result.get("reproduces_previous")
    if again:
        worst = max(again["docs_max_abs_diff"].values(), default=0.0)
        loss = again.get("train_loss_diff")
        parts.append(
            f"vs its earlier result: max |Δ| per document {worst:.2g}"
            + ("" if loss is None else f", train loss Δ {loss:.2g}")
        )
    return " | ".join(parts) or result.get("name", result.get("cache", ""))


def check_workdir(root: Path, settings: StudySettings) -> None:
    """A workdir holds one set of settings: refuse to mix results of another. Seeds may grow, and so may the
    suite (tasks added to `limits`, the others' limits unchanged): runs scored on fewer tasks then run again."""
    saved = root / "settings.json"
    current = json.loads(json.dumps(settings.to_dict()))
    current.pop("seeds")
    if saved.is_file():
        before = json.loads(saved.read_text(encoding="utf-8"))
        changed = sorted(k for k in current if k != "limits" and before.get(k) != current[k])
        old_limits, new_limits = before.get("limits", {}), current["limits"]
        if any(new_limits.get(task) != limit for task, limit in old_limits.items()):
            changed = sorted([*changed, "limits"])
        if changed:
            raise SystemExit(
                f"{root} holds a study run with other settings (differs in {changed}); "
                "use another --out or delete it"
            )
        added = [task for task in new_limits if task not in old_limits]
        if added:
            console.print(
                f"the suite grows by {', '.join(added)}: runs scored on fewer tasks run again "
                "(their earlier results are kept as seedN.prev.json)"
            )
    jobs.write_json(saved, current)


def study_methods(only: list[str] | None) -> tuple:
    """The study's method rows, restricted to `only` (their keys) when given."""
    return METHODS if only is None else tuple(row for row in METHODS if row.key in only)


def load_settings(args: argparse.Namespace) -> StudySettings:
    settings = GPU if args.gpu else QUICK if args.quick else CPU_2K if args.cpu_2k else CPU
    if args.device:
        settings = dataclasses.replace(settings, device=args.device)
    if args.seeds is not None:
        settings = dataclasses.replace(settings, seeds=tuple(args.seeds))
    if args.fp32:
        settings = dataclasses.replace(settings, precision="32-true", eval_dtype="float32")
    return settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lit_tokensel_bench.real_sft",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/real_sft"), help="the workdir (default runs/real_sft)"
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--gpu", action="store_true", help="the larger budget, on a CUDA device")
    budget.add_argument(
        "--quick", action="store_true", help="a smoke run: 4 steps per method, a few documents"
    )
    budget.add_argument(
        "--cpu-2k",
        action="store_true",
        help="the CPU budget with 2,048 training rows (plan.CPU_2K; ~20 min of training a run on 2 cores)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        choices=[row.key for row in METHODS],
        metavar="KEY",
        help="only these methods (keys, e.g. full rho1); the report then tables these only",
    )
    parser.add_argument(
        "--section",
        default=None,
        help="--report writes docs/benchmarks.md between the markers of this section instead of "
        "'real-sft-results', and leaves the README summary alone",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="override the budget's device"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="train and score in fp32 instead of bf16: for a CPU without AMX/AVX512-BF16, where bf16 is "
        "emulated and slower (check with python -m lit_tokensel_bench.real_sft.dtype_speed)",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="run nothing: write the report from the finished jobs into the workdir, "
        "docs/benchmarks.md and the README",
    )
    parser.add_argument(
        "--readme",
        type=Path,
        default=REPO / "README.md",
        help="README for the summary (--report); docs/benchmarks.md beside it gets the tables",
    )
    parser.add_argument("--no-readme", action="store_true", help="--report writes the workdir only")
    parser.add_argument(
        "--search",
        action="store_true",
        help="also run the six ssToken variants of the search beyond ssToken (docs/beyond-sstoken.md), 3 seeds "
        "each, after the study's jobs (finished ones are reused); with --report: their table into "
        "docs/beyond-sstoken.md beside the README, instead of the study's tables",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from lit_tokensel_bench.real_sft.report import write_report
    from lit_tokensel_bench.real_sft.search import write_search_report

    args = parse_args(argv)
    settings = load_settings(args)
    root = args.out.resolve()
    command = "python -m lit_tokensel_bench.real_sft " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    paths = Paths(root)
    if args.report:
        if not (root / "settings.json").is_file():
            raise SystemExit(f"{root} holds no study run (no settings.json)")
        saved = json.loads((root / "settings.json").read_text(encoding="utf-8"))
        settings = StudySettings(**{**saved, "seeds": settings.seeds})
        readme = None if args.no_readme else args.readme
        ran = root / (
            SEARCH_COMMAND if args.search else STUDY_COMMAND
        )  # what ran the jobs, not this --report
        command = json.loads(ran.read_text(encoding="utf-8")) if ran.is_file() else command
        if args.search:
            page = None if readme is None else Path(readme).resolve().parent / "docs" / "beyond-sstoken.md"
            outputs = write_search_report(settings, root, page=page, command=command)
        else:
            outputs = write_report(
                settings,
                root,
                readme=readme,
                command=command,
                methods=study_methods(args.only),
                section=args.section,
            )
        for name, path in outputs.items():
            console.print(f"{name:<10} {path}")
        return 0
    check_workdir(root, settings)
    study_command = root / STUDY_COMMAND
    if args.search:
        jobs.write_json(root / SEARCH_COMMAND, command)
        if not study_command.is_file():  # a fresh workdir: this command runs the study's jobs too
            jobs.write_json(study_command, command)
    else:
        jobs.write_json(study_command, command)
    started = time.perf_counter()
    console.rule(f"real-data study → {root}")
    prepare_data(settings, paths)
    tasks = study_tasks(settings, paths, args.only, search=args.search)
    console.print(
        f"{len(tasks)} jobs, one at a time with {settings.threads} torch threads; seeds {list(settings.seeds)}; "
        f"{settings.steps} optimizer steps of {settings.batch_size} rows per run on {settings.device}"
    )
    failed = run_graph(tasks, 1, describe=describe)
    ran = json.loads(study_command.read_text(encoding="utf-8"))
    outputs = write_report(settings, root, readme=None, command=ran, methods=study_methods(args.only))
    if args.search:
        outputs |= {f"search {k}": v for k, v in write_search_report(settings, root, command=command).items()}
    return finish(started, outputs, failed)
