"""TyDiQA-GoldP as open-instruct evaluates it, as an lm-eval task group (`tydiqa_goldp_oi`).

ssToken, TokenCleaning and Forgetting report TyDiQA from open-instruct's `eval/tydiqa/run_eval.py`, not
from lm-eval. This reproduces its setup on lm-eval's data source (`google-research-datasets/tydiqa`,
`secondary_task`): the gold passage is given; per-language instruction and field labels; one
demonstration per language, the same for every question (a seeded draw from the training split); greedy
generation up to 50 tokens, stopped at a newline; SQuAD exact match and F1 (SQuAD's English
normalization for every language, as `evaluate.load("squad")` does there), averaged per language and
then over the nine languages. Per-language subsampling (the papers used 100 or 200 questions per
language) is a suite's `limit`: the test documents are shuffled with a fixed seed, so the first N are a
seeded random sample. Not reproduced: the 512-token passage truncation, which depends on the tokenizer.

The prompt strings are open-instruct's (Apache-2.0). The YAMLs in `tasks/tydiqa_oi/` are generated from
`LANGUAGES` by `python -m lit_tokensel_eval.tydiqa_oi`.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

TASK_DIR = Path(__file__).parent / "tasks" / "tydiqa_oi"
GROUP = "tydiqa_goldp_oi"
SEED = 42

# language (the id prefix in the data) -> (instruction, passage label, question label, answer label)
LANGUAGES: dict[str, tuple[str, str, str, str]] = {
    "arabic": (
        "أجب على السؤال التالي بناءً على المعلومات في المقطع المعطى.",
        "المقطع:",
        "السؤال:",
        "الإجابة:",
    ),
    "bengali": ("প্রদত্ত অধ্যায়ের তথ্যের উপর ভিত্তি করে নিম্নলিখিত প্রশ্নের উত্তর দিন।", "অধ্যায়:", "প্রশ্ন:", "উত্তর:"),
    "english": (
        "Answer the following question based on the information in the given passage.",
        "Passage:",
        "Question:",
        "Answer:",
    ),
    "finnish": (
        "Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.",
        "Kappale:",
        "Kysymys:",
        "Vastaus:",
    ),
    "indonesian": (
        "Jawab pertanyaan berikut berdasarkan informasi di bagian yang diberikan.",
        "Bagian:",
        "Pertanyaan:",
        "Jawaban:",
    ),
    "korean": ("주어진 문단의 정보에 기반하여 다음 질문에 답하십시오.", "문단:", "질문:", "답변:"),
    "russian": (
        "Ответьте на следующий вопрос на основе информации в данном отрывке.",
        "Отрывок:",
        "Вопрос:",
        "Ответ:",
    ),
    "swahili": (
        "Jibu swali lifuatalo kulingana na habari kwenye kifungu kilichotolewa.",
        "Kifungu:",
        "Swali:",
        "Jibu:",
    ),
    "telugu": ("ఇచ్చిన పేరాలోని సమాచారం ఆధారంగా కింది ప్రశ్నకు సమాధానం ఇవ్వండి.", "పేరా:", "ప్రశ్న:", "సమాధానం:"),
}


# ---------------------------------------------------------------------------------------------- documents


def _language_docs(dataset: Any, language: str) -> Any:
    """Rows of one language, flattened to `context`, `question`, `answers` (list of strings), shuffled (seeded)."""
    rows = dataset.filter(lambda doc: doc["id"].startswith(f"{language}-"))
    rows = rows.map(lambda doc: {"answers": doc["answers"]["text"]})
    return rows.shuffle(seed=SEED)


def _make_process_docs(language: str):
    def process_docs(dataset: Any) -> Any:
        return _language_docs(dataset, language)

    process_docs.__name__ = f"docs_{language}"
    return process_docs


# One `docs_<language>` function per language, which the task YAMLs name in `process_docs`.
for _language in LANGUAGES:
    globals()[f"docs_{_language}"] = _make_process_docs(_language)


# ---------------------------------------------------------------------------------------------- scoring


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no English articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, truth: str) -> float:
    pred_tokens, truth_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Best exact match and F1 of the generation over the gold answers."""
    prediction = results[0].strip()
    answers = doc["answers"] or [""]
    return {
        "exact_match": max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers),
        "f1": max(f1(prediction, a) for a in answers),
    }


# ---------------------------------------------------------------------------------------------- YAML files

_COMMON = """\
# Shared settings of the tydiqa_goldp_oi_<language> tasks (generated by python -m lit_tokensel_eval.tydiqa_oi).
dataset_path: google-research-datasets/tydiqa
dataset_name: secondary_task
output_type: generate_until
training_split: train
validation_split: validation
fewshot_split: train
num_fewshot: 1
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
doc_to_target: "{{answers[0]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 50
  do_sample: false
process_results: !function lit_tokensel_eval.tydiqa_oi.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: f1
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _quoted(text: str) -> str:
    """A double-quoted YAML scalar (JSON strings are valid YAML)."""
    return json.dumps(text, ensure_ascii=False)


def task_yaml(language: str) -> str:
    instruction, passage, question, answer = LANGUAGES[language]
    return (
        f"# TyDiQA-GoldP ({language}) in open-instruct's format; see lit_tokensel_eval/tydiqa_oi.py.\n"
        f"include: _tydiqa_goldp_oi_common_yaml\n"
        f"task: {GROUP}_{language}\n"
        f"description: {_quoted(instruction + chr(10) + chr(10))}\n"
        f"doc_to_text: {_quoted(passage + ' {{context}}' + chr(10) + question + ' {{question}}' + chr(10) + answer)}\n"
        f"process_docs: !function lit_tokensel_eval.tydiqa_oi.docs_{language}\n"
        f"fewshot_config:\n"
        f"  sampler: first_n\n"
    )


def group_yaml() -> str:
    tasks = "".join(f"  - {GROUP}_{language}\n" for language in LANGUAGES)
    return (
        "# TyDiQA-GoldP as open-instruct evaluates it: nine languages, averaged with equal weight.\n"
        f"group: {GROUP}\n"
        f"task:\n{tasks}"
        "aggregate_metric_list:\n"
        "  - {metric: f1, aggregation: mean, weight_by_size: false}\n"
        "  - {metric: exact_match, aggregation: mean, weight_by_size: false}\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


def write_task_yamls(directory: Path = TASK_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "_tydiqa_goldp_oi_common_yaml").write_text(_COMMON, encoding="utf-8")
    (directory / f"{GROUP}.yaml").write_text(group_yaml(), encoding="utf-8")
    for language in LANGUAGES:
        (directory / f"{GROUP}_{language}.yaml").write_text(task_yaml(language), encoding="utf-8")


if __name__ == "__main__":
    write_task_yamls()
