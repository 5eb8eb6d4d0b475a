"""lit_tokensel_bench.noisy_sft.data: determinism, disjoint entity sets, exact corruption spans, token labels that line up
with the SFT pipeline's, shipped task data in sync with the generator, and the three lm-eval tasks end to end."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from lit_tokensel.builtin.tokenizer import build_chat_tokenizer
from lit_tokensel.data.tokenization import IGNORE_INDEX, tokenize_conversation
from lit_tokensel_bench.noisy_sft import data

SMALL = data.BenchmarkSizes(train_rows=400, reference_rows=80, base_rows=200, val_rows=40)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def qa(row: dict) -> tuple[str, str]:
    user, assistant = row["messages"]
    assert (user["role"], assistant["role"]) == ("user", "assistant")
    return user["content"], assistant["content"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict[str, Path]:
    return data.write_benchmark_data(tmp_path_factory.mktemp("noisy_sft"))


@pytest.fixture(scope="module")
def tokenizer(bench):
    return build_chat_tokenizer(data.read_corpus(bench["corpus"]), vocab_size=512)


def true_answer(question: str, world: data.World) -> str:
    """The correct answer, computed from the question alone (independently of the generator's code)."""
    if m := re.fullmatch(r"What is the capital of (\w+)\?", question):
        return f"The capital of {m[1]} is {world.sft.capitals[m[1]]}."
    if m := re.fullmatch(r"In which year was (\w+ \w+) born\?", question):
        return f"{m[1]} was born in {world.sft.birth_years[m[1]]}."
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", question):
        return f"{m[1]} + {m[2]} = {int(m[1]) + int(m[2])}."
    if m := re.fullmatch(r"Reverse the list: (\w+), (\w+), (\w+)", question):
        return f"{m[3]}, {m[2]}, {m[1]}."
    raise AssertionError(f"unexpected question {question!r}")


# ---------------------------------------------------------------------------------------------- files


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    first = data.write_benchmark_data(tmp_path / "a", SMALL, seed=3)
    again = data.write_benchmark_data(tmp_path / "b", SMALL, seed=3)
    other = data.write_benchmark_data(tmp_path / "c", SMALL, seed=4)
    assert set(first) == {"train", "corruption", "reference", "base", "val", "corpus"}
    for key in first:
        assert first[key].read_bytes() == again[key].read_bytes(), key
    assert first["train"].read_bytes() != other["train"].read_bytes()
    assert data.test_documents(seed=3) == data.test_documents(seed=3) != data.test_documents(seed=4)


def test_sizes_and_clean_splits(bench):
    sizes = data.BenchmarkSizes()
    for key, n in (
        ("train", sizes.train_rows),
        ("corruption", sizes.train_rows),
        ("reference", sizes.reference_rows),
        ("base", sizes.base_rows),
        ("val", sizes.val_rows),
    ):
        assert len(bench[key].read_text().splitlines()) == n, key
    world = data.make_world(0)
    for key in ("reference", "val"):
        for row in read_rows(bench[key]):
            question, answer = qa(row)
            assert answer == true_answer(question, world), key
    # the reference set is other rows than train, over the same facts
    assert read_rows(bench["reference"]) != read_rows(bench["train"])[: sizes.reference_rows]
    facts = {qa(r)[0] for r in read_rows(bench["reference"]) if "capital" in qa(r)[0] or "born" in qa(r)[0]}
    assert len(facts) == 2 * data.ENTITIES_PER_SET


def test_base_and_sft_entities_are_disjoint_and_base_data_never_mentions_sft_ones(bench):
    world = data.make_world(0)
    base, sft = world.base.names(), world.sft.names()
    assert len(base) == len(sft) == 4 * data.ENTITIES_PER_SET
    parts = lambda names: {part.lower() for name in names for part in name.split()}  # noqa: E731
    assert not parts(base) & parts(sft)
    assert not (parts(base) | parts(sft)) & set(data.FILLER_WORDS)
    base_text = bench["base"].read_text()
    assert not [name for name in sft if re.search(rf"\b{re.escape(name)}\b", base_text)]
    assert not [w for w in data.FILLER_WORDS if w in base_text]
    # and the SFT files mention no base entity
    sft_text = "".join(bench[k].read_text() for k in ("train", "reference", "val"))
    assert not [name for name in base if re.search(rf"\b{re.escape(name)}\b", sft_text)]


def test_spans_mark_exactly_the_inserted_fillers_and_the_wrong_values(bench):
    world = data.make_world(0)
    rows, spans = read_rows(bench["train"]), data.read_corruption(bench["corruption"])
    assert len(rows) == len(spans)
    kinds = {"filler": 0, "wrong_answer": 0}
    wrong_facts = 0
    for row, row_spans in zip(rows, spans):
        question, content = qa(row)
        fillers = [(s, e) for s, e, k in row_spans if k == "filler"]
        wrong = [(s, e) for s, e, k in row_spans if k == "wrong_answer"]
        assert len(fillers) + len(wrong) == len(row_spans)
        kinds["filler"] += bool(fillers)
        kinds["wrong_answer"] += bool(wrong)
        # each filler span is a whole filler word, and every filler word of the text is a span
        for s, e in fillers:
            assert content[s:e] in data.FILLER_WORDS
            assert (s == 0 or content[s - 1] == " ") and (e == len(content) or content[e] == " ")
        assert len(fillers) == sum(w in data.FILLER_WORDS for w in content.split())
        # remove the fillers: same words as the true answer, except exactly the words holding a wrong span
        words, labels, position = [], [], 0
        for word in content.split(" "):
            start, end = position, position + len(word)
            position = end + 1
            if (start, end) in fillers:
                continue
            words.append(word)
            labels.append(any(s < end and e > start for s, e in wrong))
        truth = true_answer(question, world).split(" ")
        assert len(words) == len(truth), (content, truth)
        assert [w != t for w, t in zip(words, truth)] == labels, (content, truth)
        for s, e in wrong:  # a wrong value: a fact of another entity, a number, or a list word
            value = content[s:e]
            assert re.fullmatch(r"\w+", value)
            if "capital" in question:
                wrong_facts += 1
                assert value in world.sft.capitals.values()
            elif "born" in question:
                wrong_facts += 1
                assert int(value) in world.sft.birth_years.values()
    noise = data.NoiseConfig()
    assert kinds["filler"] == pytest.approx(noise.filler_row_share * len(rows), rel=0.2)
    assert kinds["wrong_answer"] == pytest.approx(noise.wrong_answer_share * len(rows), rel=0.2)
    assert wrong_facts > 0


def test_noise_free_config_gives_the_clean_version_of_the_same_rows(tmp_path):
    noisy = data.write_benchmark_data(tmp_path / "noisy", SMALL)
    clean = data.write_benchmark_data(tmp_path / "clean", SMALL, noise=data.NoiseConfig(0.0, 1, 0.0))
    world = data.make_world(0)
    clean_rows = read_rows(clean["train"])
    assert [qa(r)[0] for r in clean_rows] == [qa(r)[0] for r in read_rows(noisy["train"])]
    assert all(qa(r)[1] == true_answer(qa(r)[0], world) for r in clean_rows)
    assert data.read_corruption(clean["corruption"]) == [[] for _ in clean_rows]


def test_skill_test_questions_are_in_no_training_file_and_fact_questions_are_the_sft_facts(bench):
    docs = data.test_documents()
    trained = {qa(r)[0] for key in ("train", "reference", "base", "val") for r in read_rows(bench[key])}
    families = {}
    for doc in docs["noisy_sft_gen"]:
        families.setdefault(doc["family"], []).append(doc["question"])
    assert {f: len(q) for f, q in families.items()} == {
        "capital": 24,
        "birth_year": 24,
        "addition": 40,
        "reverse": 40,
    }
    for family in ("addition", "reverse"):
        assert len(set(families[family])) == 40 and not set(families[family]) & trained
    for family in ("capital", "birth_year"):
        assert set(families[family]) <= trained


def test_corpus_holds_every_text(bench):
    corpus = set(data.read_corpus(bench["corpus"]))
    for key in ("train", "reference", "base", "val"):
        assert all(m["content"] in corpus for r in read_rows(bench[key]) for m in r["messages"]), key
    docs = data.test_documents()
    assert all(c in corpus for d in docs["noisy_sft_mc"] for c in (d["question"], *d["choices"]))


# ---------------------------------------------------------------------------------------------- token labels


def test_corruption_token_labels_line_up_with_the_pipeline_labels(tokenizer):
    content = "The capital of blorp Velmora is quazzle Drosvik."
    messages = data.chat_row("What is the capital of Velmora?", content)["messages"]
    spans = [(15, 20, "filler"), (32, 39, "filler"), (40, 47, "wrong_answer")]
    assert [content[s:e] for s, e, _ in spans] == ["blorp", "quazzle", "Drosvik"]
    full = tokenize_conversation(tokenizer, messages, max_length=512)
    labels = data.corruption_token_labels(tokenizer, messages, spans, max_length=512)
    labeled = [t for t in full.labels if t != IGNORE_INDEX]
    assert len(labels) == len(labeled) and labels[-1] == 0  # the end-of-turn token is clean
    assert tokenizer.convert_ids_to_tokens(labeled[-1]) == "<|im_end|>"
    corrupted = tokenizer.decode([t for t, c in zip(labeled, labels) if c])
    clean = tokenizer.decode([t for t, c in zip(labeled, labels) if not c])
    assert "".join(corrupted.split()) == "blorpquazzleDrosvik"
    assert clean.replace(" ", "") == "ThecapitalofVelmorais.<|im_end|>"
    kinds = data.corruption_token_kinds(tokenizer, messages, spans, max_length=512)
    assert {k for k in kinds if k} == {"filler", "wrong_answer"}
    for max_length in range(1, full.num_tokens + 2):  # right truncation: the first tokens' labels
        truncated = tokenize_conversation(tokenizer, messages, max_length=max_length)
        cut = data.corruption_token_labels(tokenizer, messages, spans, max_length=max_length)
        assert len(cut) == truncated.num_label_tokens and cut == labels[: len(cut)]
    assert data.corruption_token_labels(tokenizer, messages, [], max_length=512) == [0] * len(labels)


def test_corrupted_token_share_is_about_a_fifth_mostly_fillers(bench, tokenizer):
    rows, spans = read_rows(bench["train"]), data.read_corruption(bench["corruption"])
    for row, row_spans in zip(rows[:50], spans[:50]):
        labels = data.corruption_token_labels(tokenizer, row["messages"], row_spans, max_length=256)
        assert len(labels) == tokenize_conversation(tokenizer, row["messages"], 256).num_label_tokens
        assert any(labels) == bool(row_spans)
    share = data.corrupted_token_share(tokenizer, rows, spans)
    assert 0.17 <= share["total"] <= 0.23
    assert 0.12 <= share["filler"] <= 0.16 and 0.04 <= share["wrong_answer"] <= 0.07


# ---------------------------------------------------------------------------------------------- tasks


def test_shipped_task_data_is_the_generators_output():
    docs = data.test_documents()
    assert set(docs) == set(data.TASK_NAMES)
    for name in data.TASK_NAMES:
        shipped = read_rows(data.TASKS_DIR / f"{name}.jsonl")
        assert shipped == docs[name], (
            f"{name}.jsonl is stale: run python -m lit_tokensel_bench.noisy_sft.data --write-tasks"
        )
        assert (data.TASKS_DIR / f"{name}.yaml").is_file()


def test_mc_docs_have_one_correct_choice_equal_to_the_gen_answer():
    docs = data.test_documents()
    world = data.make_world(0)
    assert [d["question"] for d in docs["noisy_sft_mc"]] == [d["question"] for d in docs["noisy_sft_gen"]]
    assert docs["noisy_sft_nll"] == docs["noisy_sft_gen"]
    for mc, gen in zip(docs["noisy_sft_mc"], docs["noisy_sft_gen"]):
        assert gen["answer"] == true_answer(gen["question"], world)
        assert len(mc["choices"]) == data.NUM_CHOICES == len(set(mc["choices"]))
        assert [c == gen["answer"] for c in mc["choices"]].count(True) == 1
        assert mc["choices"][mc["answer"]] == gen["answer"]
    answers = [d["answer"] for d in docs["noisy_sft_mc"]]
    assert all(answers.count(i) > len(answers) / 8 for i in range(data.NUM_CHOICES))  # shuffled positions


def test_cli_writes_data_and_tasks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "TASKS_DIR", tmp_path / "tasks")
    data.main(["--out", str(tmp_path / "out"), "--write-tasks"])
    assert (tmp_path / "out" / "train.corruption.jsonl").is_file()
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == sorted(
        f"{n}.jsonl" for n in data.TASK_NAMES
    )


def test_tasks_run_offline_with_the_chat_template_on_a_tiny_untrained_model(bench, tmp_path):
    pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")
    from lit_tokensel.builtin.models import build_model_dir
    from lit_tokensel_eval import registry
    from lit_tokensel_eval.runner import evaluate
    from tests.eval_fixtures import EVAL_SPEC, torch_threads

    assert set(data.TASK_NAMES) <= set(registry.bundled_task_names())
    assert "noisy_sft" in registry.shipped_names()  # the tag
    model_dir = tmp_path / "untrained"
    build_model_dir(EVAL_SPEC, bench["train"], model_dir)
    with torch_threads(1):
        run = evaluate(
            model_dir,
            tasks=list(data.TASK_NAMES),
            limit=4,
            bootstrap_iters=0,
            log_samples=True,
            output_dir=tmp_path / "evals",
            run_name="untrained",
        )
    assert all(r.apply_chat_template for r in run.requests)
    primary = run.primary()
    assert set(primary) == set(data.TASK_NAMES)
    assert 0.0 <= primary["noisy_sft_gen"] <= 1.0 and 0.0 <= primary["noisy_sft_mc"] <= 1.0
    assert math.isfinite(primary["noisy_sft_nll"]) and primary["noisy_sft_nll"] > 0
    assert {r.task: r.metric for r in run.rows if r.primary}["noisy_sft_nll"] == "nll"
    sample = json.loads((run.output_dir / "samples_noisy_sft_nll.jsonl").read_text().splitlines()[0])
    context, continuation = sample["arguments"][0]
    assert context == f"<|im_start|>user\n{sample['doc']['question']}<|im_end|>\n<|im_start|>assistant\n"
    assert continuation == sample["doc"]["answer"]  # no space: the answer follows the header as in training
