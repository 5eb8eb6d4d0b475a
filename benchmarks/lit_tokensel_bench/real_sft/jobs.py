"""The study's units of work, each in a fresh worker process: score a model (the AlpacaEval NLL proxy and
the offline suite, per document), and train-then-score one method x seed.

A job writes its result file atomically at the very end (the done-marker), so an interrupted study
redoes only unfinished jobs. The trained model is exported with LoRA merged (lm-eval then runs a plain
model, no adapter hooks) and the export is deleted once scored: only the result file is kept. A job whose
result was scored on fewer tasks than the study now holds (its task list grew) runs again; the earlier
result is kept beside the new one (`seedN.prev.json`) and the new one records how closely it reproduces it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from lit_tokensel_bench.noisy_sft.jobs import fit_job, quiet_worker, write_json
from lit_tokensel_bench.real_sft.plan import TASKS, StudySettings

LONG_PROMPT_TASKS = ("mmlu", "gsm8k_cot")
"""Few-shot tasks whose prompts run to 1,000-2,000 tokens. lm-eval's HF model holds a batch's full logits in
fp32 (batch x tokens x 49,152 vocabulary): at batch 32 a 5-shot MMLU batch took the 24 GiB machine out of
memory, so these run at a quarter of the batch."""


def task_batch_size(settings: StudySettings, task: str) -> int:
    """The eval batch for `task`: the study's, a quarter of it for the long few-shot prompts."""
    return max(1, settings.eval_batch_size // 4) if task in LONG_PROMPT_TASKS else settings.eval_batch_size


def eval_suite(settings: StudySettings) -> Any:
    """The offline suite (its few-shot counts and headline metrics) with the study's per-task limits; tasks
    without a limit are left out."""
    from lit_tokensel_eval.suites import Suite, load_suite

    offline = load_suite("offline")
    specs = [
        dataclasses.replace(spec, limit=settings.limits[spec.task])
        for spec in offline.tasks
        if spec.task in settings.limits
    ]
    return Suite(name="real_sft", tasks=specs, description="the offline suite with the study's limits")


def per_document(results: dict[str, Any], suite: Any) -> dict[str, dict[str, float]]:
    """Per suite task: document key -> headline-metric value, from lm-eval's logged samples. Group tasks
    (MMLU) pool their subtasks' documents under `subtask/doc_id`; with several filters (GSM8K) the first
    one of the task's records is used."""
    metric = {spec.task: spec.metric for spec in suite.tasks}
    out: dict[str, dict[str, float]] = {task: {} for task in metric}
    for name, records in results.get("samples", {}).items():
        task = (
            name
            if name in metric
            else next((t for t in metric if name.startswith(f"{t}_") or name.startswith(f"{t}-")), None)
        )
        if task is None:  # lit_tokensel_eval's offline rename (truthfulqa_mc2 -> truthfulqa_mc2_bb299)
            task = next((t for t in metric if name.startswith(t)), None)
        if task is None:
            raise ValueError(f"lm-eval samples of {name!r} belong to no task of the suite ({list(metric)})")
        first_filter = records[0].get("filter") if records else None
        for record in records:
            if record.get("filter") != first_filter:
                continue
            key = str(record["doc_id"]) if name == task else f"{name}/{record['doc_id']}"
            out[task][key] = float(record[metric[task]])
    return out


def score_suite(
    model: torch.nn.Module, tokenizer: Any, suite: Any, batch_size: int, name: str
) -> dict[str, dict[str, float]]:
    """Per task of `suite`: document key -> headline-metric value, one lm-eval call offline at `batch_size`."""
    from lit_tokensel_eval import InMemoryModel, evaluate

    run = evaluate(
        InMemoryModel(model, tokenizer, name=name),
        suite=suite,
        batch_size=batch_size,
        bootstrap_iters=0,
        offline=True,
        log_samples=True,
        progress=False,
    )
    return per_document(run.results, suite)


def score_model(model: torch.nn.Module, tokenizer: Any, settings: StudySettings, name: str) -> dict[str, Any]:
    """The NLL proxy and the offline suite, per document and in total, with the seconds each took."""
    from lit_tokensel_bench.real_sft.alpaca_eval import alpaca_eval_rows, answer_nll, proxy_subset

    started = time.perf_counter()
    rows = proxy_subset(alpaca_eval_rows(), settings.proxy_rows, settings.proxy_seed)
    nll = answer_nll(
        model,
        tokenizer,
        rows,
        max_answer_tokens=settings.proxy_max_tokens,
        batch_size=settings.eval_batch_size // 2,
    )
    docs: dict[str, dict[str, float]] = {"alpaca_eval_nll": {str(r["index"]): v for r, v in zip(rows, nll)}}
    seconds = {"alpaca_eval_nll": time.perf_counter() - started}
    suite = eval_suite(settings)
    for batch_size in sorted({task_batch_size(settings, spec.task) for spec in suite.tasks}, reverse=True):
        part = dataclasses.replace(
            suite, tasks=[s for s in suite.tasks if task_batch_size(settings, s.task) == batch_size]
        )
        started = time.perf_counter()
        docs |= score_suite(model, tokenizer, part, batch_size, name)
        seconds[f"suite_batch{batch_size}"] = time.perf_counter() - started
    return {
        "docs": docs,
        "scores": {task: sum(v.values()) / len(v) for task, v in docs.items() if v},
        "eval_seconds": seconds,
    }


def required_scores(settings: StudySettings) -> list[str]:
    """What a finished job's result holds: the NLL proxy and every suite task of the settings' limits (in the
    suite's order)."""
    return ["alpaca_eval_nll", *(t for t in TASKS if t in settings.limits)]


def scored_on(result: dict[str, Any] | None, tasks: Iterable[str]) -> bool:
    """Whether `result` holds per-document scores of every one of `tasks` (a result written before the study's
    task list grew does not)."""
    return result is not None and all(result.get("docs", {}).get(task) for task in tasks)


def reproduction(previous: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """How closely a rerun reproduces its earlier result: per task both hold, the largest absolute difference of
    a document's value; and the difference of the training loss (the fits are seeded; on the same machine and
    thread count they should match to the bit)."""
    out: dict[str, Any] = {
        "docs_max_abs_diff": {
            task: max(
                (abs(values[k] - result["docs"][task].get(k, float("inf"))) for k in values), default=0.0
            )
            for task, values in previous.get("docs", {}).items()
            if task in result.get("docs", {})
        }
    }
    before, after = (previous.get("fit") or {}).get("train_loss"), (result.get("fit") or {}).get("train_loss")
    if before is not None and after is not None:
        out["train_loss_diff"] = after - before
    return out


def write_result(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Write `result` (the done-marker) atomically. An earlier result at `path` (scored on fewer tasks) is kept
    as `<name>.prev.json` first, and the new result records how closely it reproduces it."""
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        write_json(path.with_suffix(".prev.json"), previous)
        result = {**result, "reproduces_previous": reproduction(previous, result)}
    write_json(path, result)
    return result


def load_for_eval(path: str, settings: StudySettings) -> tuple[torch.nn.Module, Any]:
    from lit_tokensel.modeling.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(path).to(device=settings.device, dtype=getattr(torch, settings.eval_dtype))
    model.eval()
    return model, load_tokenizer(path)


def eval_job(job: dict[str, Any]) -> dict[str, Any]:
    """Score the model `job["model"]` (an export directory or a `builtin:` name) into `job["result"]`."""
    settings = StudySettings(**job["settings"])
    quiet_worker(settings.threads, Path(job["result"]).with_suffix(".log"))
    model, tokenizer = load_for_eval(job["model"], settings)
    result = {"name": job["name"], **score_model(model, tokenizer, settings, job["name"])}
    return write_result(Path(job["result"]), result)


def train_eval_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one method x seed (noisy-SFT's fit job: step times, peak memory, export), score the export,
    write the result, delete the export. A finished fit (its `fit.json` and export) is not redone."""
    settings = StudySettings(**job["settings"])
    run_dir = Path(job["run_dir"])
    fit_file, export = run_dir / "fit.json", run_dir / "export"
    started = time.perf_counter()
    if not (fit_file.is_file() and (export / "config.json").is_file()):
        fit_job(
            {
                "name": job["name"],
                "args": job["args"],
                "run_dir": str(run_dir),
                "threads": settings.threads,
                "result": str(fit_file),
            }
        )
    else:
        quiet_worker(settings.threads, run_dir / "worker.log")
    fit = json.loads(fit_file.read_text(encoding="utf-8"))
    model, tokenizer = load_for_eval(str(export), settings)
    result = {
        "name": job["name"],
        "fit": fit,
        **score_model(model, tokenizer, settings, job["name"]),
        "seconds": time.perf_counter() - started,
    }
    result = write_result(Path(job["result"]), result)
    shutil.rmtree(export, ignore_errors=True)
    return result
