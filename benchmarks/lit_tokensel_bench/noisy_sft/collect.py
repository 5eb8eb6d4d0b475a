"""Turn the per-job result files into the report's inputs: rows with mean and spread over seeds, and samples."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lit_tokensel_bench.noisy_sft.metrics import stat
from lit_tokensel_bench.noisy_sft.plan import FULL, REGIMES, MethodRow, Settings, method_rows

if TYPE_CHECKING:
    from lit_tokensel_bench.noisy_sft.run import Paths

HTML_SAMPLES = 4


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _mean_over_points(points: list[dict[str, Any]], key: str) -> float | None:
    values = [p[key] for p in points if p.get(key) is not None]
    return statistics.fmean(values) if values else None


def row_result(settings: Settings, paths: Paths, regime: str, row: MethodRow) -> dict[str, Any] | None:
    """One table row: test metrics, selection quality (averaged over the inspect points) and cost ratios."""
    if row.kind == "reference":
        seeds_results = {0: _load(paths.result(regime, row.key, 0))}
    else:
        seeds_results = {seed: _load(paths.result(regime, row.key, seed)) for seed in settings.seeds}
    seeds_results = {s: r for s, r in seeds_results.items() if r is not None}
    if not seeds_results:
        return None
    results = list(seeds_results.values())
    out: dict[str, Any] = {
        "regime": regime,
        "method": row.name,
        "key": row.key,
        "family": row.family,
        "ratio": row.ratio,
        "kind": row.kind,
        "seeds": sorted(seeds_results),
        **{metric: stat([r["eval"][metric] for r in results]) for metric in ("gen_acc", "mc_acc", "nll")},
        "drop_corrupted": None,
        "drop_clean": None,
        "auc": None,
        "auc_curve": [],
        "step_time_ratio": None,
        "peak_memory_ratio": None,
        "step_time_ms": None,
        "peak_extra_mib": None,
    }
    selections = [r.get("selection") or [] for r in results]
    if any(selections):
        for key in ("drop_corrupted", "drop_clean", "auc"):
            out[key] = stat([_mean_over_points(points, key) for points in selections])
        fractions = sorted({p["fraction"] for points in selections for p in points})
        out["auc_curve"] = [
            {"fraction": f, "auc": a}
            for f in fractions
            if (a := stat([p["auc"] for points in selections for p in points if p["fraction"] == f]))
            is not None
        ]
    if row.kind != "reference":
        ratios_time, ratios_memory = [], []
        for seed, result in seeds_results.items():
            full = _load(paths.result(regime, "full", seed))
            if full and full.get("step_time_s") and result.get("step_time_s"):
                ratios_time.append(result["step_time_s"] / full["step_time_s"])
                ratios_memory.append(max(result["peak_extra_mib"], 1.0) / max(full["peak_extra_mib"], 1.0))
        out["step_time_ratio"] = statistics.median(ratios_time) if ratios_time else None
        out["peak_memory_ratio"] = statistics.median(ratios_memory) if ratios_memory else None
        out["step_time_ms"] = statistics.median(
            r["step_time_s"] * 1000 for r in results if r.get("step_time_s")
        )
        out["peak_extra_mib"] = statistics.median(r["peak_extra_mib"] for r in results)
    return out


def collect_results(
    settings: Settings, paths: Paths, rows: dict[str, list[MethodRow]], command: str
) -> dict[str, Any]:
    """The report's `results` dict: every row with at least one finished seed, per regime, in plan order."""
    table = []
    for regime, regime_rows in rows.items():
        for row in regime_rows:
            if (result := row_result(settings, paths, regime, row)) is not None:
                table.append(result)
        if regime == "pretrained":
            base = row_result(
                settings,
                paths,
                regime,
                MethodRow("base-model", "Base model before SFT", "base", None, kind="reference"),
            )
            if base is not None:
                table.append(base)
    return {"command": command, "settings": settings.to_dict(), "rows": table}


def collect_samples(settings: Settings, paths: Paths, regime: str, rows: list[MethodRow]) -> dict[str, Any]:
    """A few corrupted training samples with every method's final selection (first seed, last inspect point)."""
    labels = json.loads(paths.labels.read_text(encoding="utf-8"))
    kinds = json.loads(paths.kinds.read_text(encoding="utf-8"))
    train = paths.data["train"].read_text(encoding="utf-8").splitlines()
    seed = settings.seeds[0]
    per_method: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        if row.config is None or (row.ratio is not None and row.ratio != settings.ratios[0]):
            continue
        files = sorted(paths.run_dir(regime, f"{row.key}/seed{seed}").glob("inspect/*.jsonl"))
        if files:
            records = [json.loads(line) for line in files[-1].read_text(encoding="utf-8").splitlines()]
            per_method[row.name] = {r["sample_id"]: r for r in records}
    if not per_method:
        return {"regime": regime, "samples": []}
    common = set.intersection(*(set(m) for m in per_method.values()))
    with_both = [i for i in sorted(common) if {"filler", "wrong_answer"} <= set(kinds[i])]
    with_any = [i for i in sorted(common) if any(labels[i]) and i not in with_both]
    chosen = (with_both[: HTML_SAMPLES // 2] + with_any)[:HTML_SAMPLES]
    samples = []
    for sample_id in chosen:
        messages = json.loads(train[sample_id])["messages"]
        first = next(iter(per_method.values()))[sample_id]
        methods = {}
        for name, records in per_method.items():
            record = records[sample_id]
            scores = record.get("scores") or {}
            score = next((r.score for r in rows if r.name == name and r.score), None)
            values = scores.get(score[0]) if score else None  # oriented: high = keep
            methods[name] = {
                "keep": record["keep"],
                "score": [score[1] * v for v in values] if values else None,
                "weight": record.get("weight"),
            }
        samples.append(
            {
                "sample_id": sample_id,
                "prompt": next(m["content"] for m in messages if m["role"] == "user"),
                "tokens": first["text"],
                "corrupted": labels[sample_id],
                "kinds": kinds[sample_id],
                "methods": methods,
            }
        )
    return {"regime": regime, "samples": samples}


def merge_results(results: dict[str, Any], earlier: dict[str, Any], source: str) -> dict[str, Any]:
    """`results` with every row of `earlier` (a results.json) that it lacks, by (regime, key), in plan order.

    For re-running a few rows (`--only`) without losing the others' committed results: this run's rows
    replace the earlier ones of the same key, the rest are kept as they were (their step-time ratios are
    to the full SFT of the run that measured them). The command says which rows came from where.
    """
    fresh = {(r["regime"], r["key"]) for r in results["rows"]}
    kept = [r for r in earlier["rows"] if (r["regime"], r["key"]) not in fresh]
    order = [r.key for r in method_rows(FULL)] + ["base-model"]
    regimes = list(REGIMES)

    def position(row: dict[str, Any]) -> tuple[int, int]:
        regime = regimes.index(row["regime"]) if row["regime"] in regimes else len(regimes)
        return regime, order.index(row["key"]) if row["key"] in order else len(order)

    rows = sorted(results["rows"] + kept, key=position)  # stable: unknown keys keep their order
    keys = sorted({r["key"] for r in kept})
    command = (
        (
            f"{results['command']}; the rows {keys} are kept from {source} "
            f"({earlier.get('command', 'command not recorded')})"
        )
        if kept
        else results["command"]
    )
    return {**results, "command": command, "rows": rows}
