"""The study's report from its finished result files: per method mean ± std over seeds, the difference to
full SFT with a paired bootstrap interval over documents, the minimum detectable difference, cost.

Written into the workdir (`report.md`, `results.json`) and, with `--report`, into docs/benchmarks.md
between `<!-- real-sft-results:start -->` / `:end -->` and a summary into the README between
`<!-- real-sft-results-summary:start -->` / `:end -->` (noisy-SFT's marker mechanism). A run with jobs
missing is marked PARTIAL and lists them.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lit_tokensel_bench.noisy_sft.metrics import stat
from lit_tokensel_bench.noisy_sft.plan import MethodRow
from lit_tokensel_bench.noisy_sft.report import atomic_write_text, update_readme
from lit_tokensel_bench.real_sft.jobs import required_scores, scored_on
from lit_tokensel_bench.real_sft.plan import METHODS, TASKS, StudySettings, method_seeds
from lit_tokensel_bench.real_sft.stats import (
    mdd_paired,
    paired_bootstrap,
    paired_differences,
    seed_mean,
    verdict,
)

NLL = "alpaca_eval_nll"
SECTION = "real-sft-results"
WRITER = "benchmarks/lit_tokensel_bench/real_sft/report.py"
LABELS = {
    NLL: "AlpacaEval NLL ↓",
    "arc_easy": "ARC-E",
    "arc_challenge": "ARC-C",
    "hellaswag": "HellaSwag",
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "winogrande": "Winogr.",
    "truthfulqa_mc2": "TQA-299 mc2",
    "mmlu": "MMLU 5-shot",
    "gsm8k_cot": "GSM8K-cot",
}


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def collect(settings: StudySettings, root: Path, methods: Sequence[MethodRow] = METHODS) -> dict[str, Any]:
    """Every finished result per method (of `methods`) and seed, the base model's, and the jobs still missing.
    A result scored on fewer tasks than the settings' limits (written before the suite grew) counts as missing."""
    tasks = _tasks(settings)

    def load(path: Path) -> dict[str, Any] | None:
        result = _load(path)
        return result if scored_on(result, tasks) else None

    runs: dict[str, dict[int, dict[str, Any]]] = {}
    missing = []
    for row in methods:
        for seed in method_seeds(settings, row.key):
            result = load(root / "results" / row.key / f"seed{seed}.json")
            if result is None:
                missing.append(f"{row.key}/seed{seed}")
            else:
                runs.setdefault(row.key, {})[seed] = result
    base = load(root / "results" / "base-model" / "seed0.json")
    if base is None:
        missing.insert(0, "base-model")
    return {"runs": runs, "base": base, "missing": missing}


def scored_tasks(settings: StudySettings, root: Path, methods: Sequence[MethodRow]) -> dict[str, int]:
    """The settings' limits restricted to the suite tasks every existing result of `methods` (and the base
    model's) was scored on: a table over runs made before and after the suite grew compares them on what
    they share."""
    files = [root / "results" / row.key / f"seed{seed}.json" for row in methods for seed in settings.seeds]
    held = [
        set(r.get("docs", {}))
        for r in map(_load, [*files, root / "results" / "base-model" / "seed0.json"])
        if r
    ]
    return {t: n for t, n in settings.limits.items() if all(t in h for h in held)}


def _tasks(settings: StudySettings) -> list[str]:
    return required_scores(settings)


def _scale(task: str) -> float:
    return 1.0 if task == NLL else 100.0


def method_rows(
    settings: StudySettings,
    collected: dict[str, Any],
    iters: int = 2000,
    methods: Sequence[MethodRow] = METHODS,
) -> list[dict[str, Any]]:
    """Per method of `methods` with a finished run, in their order: per task the mean/std over seeds, the suite average, the paired
    difference to full SFT (per task and on the suite average) with its bootstrap interval and MDD, cost."""
    tasks = _tasks(settings)
    suite = [t for t in tasks if t != NLL]
    runs = collected["runs"]
    full = runs.get("full", {})
    full_docs = {t: seed_mean([r["docs"][t] for r in full.values()]) for t in tasks} if full else None
    rows = []
    for method in methods:
        seeds = runs.get(method.key)
        if not seeds:
            continue
        results = list(seeds.values())
        row: dict[str, Any] = {
            "key": method.key,
            "name": method.name,
            "seeds": sorted(seeds),
            "scores": {t: stat([_scale(t) * r["scores"][t] for r in results]) for t in tasks},
        }
        row["average"] = stat(
            [statistics.fmean(_scale(t) * r["scores"][t] for t in suite) for r in results] if suite else []
        )
        if full_docs is not None and method.key != "full":
            docs = {t: seed_mean([r["docs"][t] for r in results]) for t in tasks}
            diffs = {t: _scale(t) * paired_differences(docs[t], full_docs[t]) for t in tasks}
            row["diff"] = {
                t: {
                    **paired_bootstrap([diffs[t]], iters=iters),
                    "mdd": mdd_paired(diffs[t]),
                    "n": int(diffs[t].size),
                }
                for t in tasks
            }
            if suite:
                row["diff"]["average"] = paired_bootstrap([diffs[t] for t in suite], iters=iters)
        row["cost"] = cost(method.key, seeds, full)
        if method.key == "full":
            row["se"] = {t: standard_error([r["docs"][t] for r in results], _scale(t)) for t in tasks}
        rows.append(row)
    return rows


def standard_error(per_seed: list[dict[str, float]], scale: float) -> float:
    """The standard error of one run's score over its documents (the first seed's): sd / sqrt(n), which for
    0/1 accuracies is the binomial sqrt(p (1 - p) / n)."""
    values = np.array(list(per_seed[0].values()), dtype=np.float64) * scale  # [D]
    return float(values.std(ddof=0) / math.sqrt(values.size)) if values.size else math.nan


def cost(key: str, seeds: dict[int, dict[str, Any]], full: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Median over seeds of the step time relative to full SFT of the same seed, and of the extra peak
    resident memory over full SFT's (MiB); the absolute step time (s)."""
    ratios, extra = [], []
    for seed, result in seeds.items():
        base = full.get(seed)
        fit, base_fit = result.get("fit") or {}, (base or {}).get("fit") or {}
        if fit.get("step_time_s") and base_fit.get("step_time_s"):
            ratios.append(fit["step_time_s"] / base_fit["step_time_s"])
            extra.append(fit["peak_extra_mib"] - base_fit["peak_extra_mib"])
    times = [r["fit"]["step_time_s"] for r in seeds.values() if (r.get("fit") or {}).get("step_time_s")]
    return {
        "step_time_ratio": statistics.median(ratios) if ratios else None,
        "extra_peak_mib": statistics.median(extra) if extra else None,
        "step_time_s": statistics.median(times) if times else None,
    }


def _ms(s: dict[str, Any] | None, digits: int) -> str:
    if s is None:
        return "–"
    return (
        f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
        if len(s["values"]) > 1
        else f"{s['mean']:.{digits}f}"
    )


def _diff(d: dict[str, Any] | None, digits: int) -> str:
    if d is None:
        return "–"
    return f"{d['diff']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _digits(task: str) -> int:
    return 3 if task == NLL else 1


def scores_table(settings: StudySettings, rows: list[dict[str, Any]], base: dict[str, Any] | None) -> str:
    tasks = _tasks(settings)
    head = ["Method", "seeds", *(LABELS[t] for t in tasks), "suite avg", "step time ×", "extra MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base is not None:
        suite = [t for t in tasks if t != NLL]
        avg = statistics.fmean(100 * base["scores"][t] for t in suite) if suite else None
        lines.append(
            "| Base model (no SFT) | – | "
            + " | ".join(f"{_scale(t) * base['scores'][t]:.{_digits(t)}f}" for t in tasks)
            + f" | {'–' if avg is None else f'{avg:.1f}'} | – | – |"
        )
    for row in rows:
        c = row["cost"]
        lines.append(
            f"| {row['name']} | {len(row['seeds'])} | "
            + " | ".join(_ms(row["scores"][t], _digits(t)) for t in tasks)
            + f" | {_ms(row['average'], 1)} | "
            f"{_num(c['step_time_ratio'], '.2f')} | {_num(c['extra_peak_mib'], '+.0f')} |"
        )
    full = next((row for row in rows if "se" in row), None)
    if full is not None:
        lines.append(
            "| *standard error of one run* | | "
            + " | ".join(_num(full["se"][t], f".{_digits(t)}f") for t in tasks)
            + " | | | |"
        )
    return "\n".join(lines)


def diff_table(settings: StudySettings, rows: list[dict[str, Any]]) -> str:
    tasks = _tasks(settings)
    head = ["Method − full SFT", *(LABELS[t] for t in tasks), "suite avg", "verdict (NLL / suite avg)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mdd: dict[str, list[float]] = {t: [] for t in tasks}
    for row in rows:
        if "diff" not in row:
            continue
        for t in tasks:
            mdd[t].append(row["diff"][t]["mdd"])
        avg = row["diff"].get("average")
        verdicts = [verdict(row["diff"][NLL], higher_is_better=False)]
        verdicts.append(verdict(avg, higher_is_better=True) if avg else "–")
        lines.append(
            f"| {row['name']} | "
            + " | ".join(_diff(row["diff"][t], _digits(t)) for t in tasks)
            + f" | {_diff(avg, 1)} | {' / '.join(verdicts)} |"
        )
    if any(mdd.values()):
        lines.append(
            "| *MDD (median over methods)* | "
            + " | ".join(f"{statistics.median(v):.{_digits(t)}f}" if v else "–" for t, v in mdd.items())
            + " | | |"
        )
        n = next(row["diff"] for row in rows if "diff" in row)
        lines.append("| *documents* | " + " | ".join(str(n[t]["n"]) for t in tasks) + " | | |")
    return "\n".join(lines)


def verdict_text(rows: list[dict[str, Any]]) -> str:
    """Which methods beat full SFT beyond the document noise, which lose, which are indistinguishable."""
    groups: dict[str, dict[str, list[str]]] = {"AlpacaEval NLL": {}, "suite average": {}}
    for row in rows:
        if "diff" not in row:
            continue
        groups["AlpacaEval NLL"].setdefault(verdict(row["diff"][NLL], higher_is_better=False), []).append(
            row["name"]
        )
        if "average" in row["diff"]:
            groups["suite average"].setdefault(verdict(row["diff"]["average"], True), []).append(row["name"])
    lines = []
    for measure, by in groups.items():
        if by:
            lines.append(
                f"- **{measure}**: better than full SFT: {', '.join(by.get('better', [])) or 'none'}; "
                f"worse: {', '.join(by.get('worse', [])) or 'none'}; "
                f"indistinguishable: {', '.join(by.get('same', [])) or 'none'}."
            )
    return "\n".join(lines)


STUDY_SEEDS = (
    "Seeds {seeds} for full SFT, random, Rho-1, TokenCleaning, ssToken base history, Forgetting; "
    "seed {first} for the rest."
)


def settings_text(
    settings: StudySettings, root: Path, collected: dict[str, Any], seeds_text: str = STUDY_SEEDS
) -> str:
    """The study's setup in one paragraph; `seeds_text` (formatted with `seeds`, `first`) says who ran which
    seeds."""
    manifest = _load(root / "data" / "manifest.json") or {}
    mix = ", ".join(f"{k} {v}" for k, v in (manifest.get("train") or {}).items())
    ref = ", ".join(f"{k} {v}" for k, v in (manifest.get("reference") or {}).items())
    seconds = [r.get("seconds", 0) for runs in collected["runs"].values() for r in runs.values()]
    limits = ", ".join(
        f"{LABELS[t]} {settings.limits[t]}" + (" per subject" if t == "mmlu" else "")
        for t in TASKS
        if t in settings.limits
    )
    return (
        f"SmolLM2-135M-Instruct (`{settings.model}`) + LoRA (`configs/presets/smollm2_lora.yaml`), "
        f"{settings.steps} optimizer steps of {settings.batch_size} rows (max {settings.max_length} tokens, "
        f"lr {settings.learning_rate:g}, {settings.epochs} epoch(s)) on {settings.device}. Training rows: {mix} "
        f"(of a shuffled pool of Alpaca-demo and NaturalInstructions v1 rows whose prompt leaves "
        f"{settings.min_answer_tokens} of the {settings.max_length} tokens to the answer); "
        f"warm-up reference (Rho-1, TokenCleaning, Forgetting) trained on a held-out slice: {ref}. "
        f"{seeds_text.format(seeds=list(settings.seeds), first=settings.seeds[0])} Documents per task: {limits} (lm-eval's first N; the same for "
        f"every run); AlpacaEval NLL: {settings.proxy_rows} instructions (seed {settings.proxy_seed}), the first "
        f"{settings.proxy_max_tokens} tokens of each GPT-4 answer. Wall time of the method jobs: "
        f"{sum(seconds) / 3600:.2f} h on {platform.machine()} ({platform.node() or 'this machine'}), torch threads "
        f"{settings.threads}."
    )


def partial_text(collected: dict[str, Any]) -> str:
    """The PARTIAL line naming the unfinished jobs (empty when none is missing)."""
    missing = collected["missing"]
    if not missing:
        return ""
    return (
        f"**PARTIAL**: {len(missing)} job(s) not finished (or scored on fewer tasks than this table): "
        f"{', '.join(missing)}.\n\n"
    )


def tables_markdown(settings: StudySettings, rows: list[dict[str, Any]], collected: dict[str, Any]) -> str:
    """The scores table, the difference-to-full-SFT table and the verdicts, each with its explanation."""
    return (
        "Scores (accuracy in %, mean ± std over seeds; AlpacaEval NLL in nats/token, lower is better; step time "
        "and extra peak memory relative to full SFT of the same seed):\n\n"
        f"{scores_table(settings, rows, collected['base'])}\n\n"
        "Difference to full SFT (per document, seeds averaged on each side; 95% paired bootstrap interval over "
        "documents, 2,000 resamples; the suite average resamples documents within each task). MDD: the smallest "
        "difference a two-sided 5% test would detect with 80% power at these document counts. The intervals "
        "hold document noise only; seed-to-seed spread is in the table above.\n\n"
        f"{diff_table(settings, rows)}\n\n{verdict_text(rows)}\n"
    )


def report_markdown(
    settings: StudySettings,
    root: Path,
    command: str,
    iters: int = 2000,
    methods: Sequence[MethodRow] = METHODS,
) -> tuple[str, str, dict]:
    """(full section, README summary, the numbers) of the study in `root`, over `methods` (a run with
    `--only` tables its own rows and does not list the others as missing)."""
    collected = collect(settings, root, methods)
    rows = method_rows(settings, collected, iters=iters, methods=methods)
    partial = partial_text(collected)
    seeds_text = STUDY_SEEDS if tuple(methods) == METHODS else "Seed(s) {seeds}."
    body = (
        f"{partial}{settings_text(settings, root, collected, seeds_text)}\n\n"
        f"{tables_markdown(settings, rows, collected)}"
    )
    summary_rows = ["| Method | Δ AlpacaEval NLL | Δ suite avg (points) |", "|---|---|---|"]
    for row in rows:
        if "diff" in row:
            summary_rows.append(
                f"| {row['name']} | {_diff(row['diff'][NLL], 3)} | {_diff(row['diff'].get('average'), 1)} |"
            )
    summary = (
        f"{partial}Real-data study (SmolLM2-135M-Instruct + LoRA, Alpaca-demo + NaturalInstructions; "
        "difference to full SFT with a 95% paired bootstrap interval; full tables in "
        "[docs/benchmarks.md](docs/benchmarks.md#real-data-study)):\n\n"
        + "\n".join(summary_rows)
        + f"\n\n{verdict_text(rows)}\n"
    )
    numbers = {
        "command": command,
        "settings": settings.to_dict(),
        "missing": collected["missing"],
        "rows": rows,
        "base": None if collected["base"] is None else collected["base"]["scores"],
    }
    return body, summary, numbers


def write_report(
    settings: StudySettings,
    root: Path,
    readme: Path | None = None,
    command: str = "python -m lit_tokensel_bench.real_sft",
    methods: Sequence[MethodRow] = METHODS,
    section: str | None = None,
) -> dict[str, Path]:
    """`report.md` and `results.json` in `root`; with `readme`, the section in docs/benchmarks.md beside it and
    the README summary. Another `section` (a supplementary run, e.g. `--cpu-2k`) writes the page between its
    own markers and leaves the README summary, which speaks for the main study, alone."""
    body, summary, numbers = report_markdown(settings, root, command, methods=methods)
    paths = {"report": root / "report.md", "results": root / "results.json"}
    atomic_write_text(paths["report"], f"# Real-data study\n\n{body}")
    atomic_write_text(paths["results"], json.dumps(numbers, indent=1, default=float) + "\n")
    if readme is not None:
        page = Path(readme).resolve().parent / "docs" / "benchmarks.md"
        update_readme(page, body, command, section or SECTION, writer=WRITER)
        paths["page"] = page
        if section in (None, SECTION):
            update_readme(Path(readme), summary, command, f"{SECTION}-summary", writer=WRITER)
            paths["readme"] = Path(readme)
    return paths
