"""Data of the noisy-SFT benchmark: a noisy SFT set whose corrupted tokens are known, and clean test tasks.

The benchmark asks whether a token-selection method drops the corrupted tokens of an SFT set and
whether the model it trains ends up better than plain SFT on the same noisy data. Everything here is
synthetic, so each corrupted character is known exactly.

Four single-turn task families, every answer depending on its prompt:

- `capital` (fact): "What is the capital of Velmora?" -> "The capital of Velmora is Drosvik."
- `birth_year` (fact): "In which year was Tarin Oskel born?" -> "Tarin Oskel was born in 1783."
- `addition` (skill): "What is 12 + 30?" -> "12 + 30 = 42." (addends 0..49)
- `reverse` (skill): "Reverse the list: apple, river, stone" -> "stone, river, apple."

Countries, cities and people are made-up names built from syllables, so no model knows them in advance.
The world (`make_world`) holds two disjoint entity sets: `base` (countries, people, list words used to
pretrain a base model that learns the formats and the skills, not the SFT facts) and `sft` (the facts the
SFT data teaches and the test asks). Addends are shared by both sets.

Files written by `write_benchmark_data` (chat rows `{"messages": [user, assistant]}`, JSON Lines):

- `train.jsonl`: the noisy SFT set (sft entities); `train.corruption.jsonl`, one line per train row in
  order, `{"row": i, "spans": [[start, end, kind], ...]}`: character spans of the assistant content that
  are corrupted, of kind
  `filler` (unlearnable noise: nonsense words from `FILLER_WORDS` inserted at word boundaries) or
  `wrong_answer` (misleading tokens: the answer value replaced by a wrong one: another sft entity's city
  or year, a sum off by 1 to 10, a wrong order of the list; for a list only the misplaced words);
- `reference.jsonl`: clean rows over the same sft facts (other rows than train), for a reference model;
- `base.jsonl`: clean rows over the base entities only; `val.jsonl`: clean rows over the sft entities;
- `tokenizer_corpus.txt`: every text a tokenizer should be trained on, one per line (all message contents
  of the files above, fillers included, and every test question, answer and choice).

The test documents (`test_documents`) are shipped as the lm-eval tasks `noisy_sft_gen` (exact match of the
answer sentence), `noisy_sft_mc` (four answer sentences, one correct) and `noisy_sft_nll` (negative
log-likelihood of the correct answer sentence), under `evaluation/lit_tokensel_eval/tasks/noisy_sft/`.
Fact questions are the sft facts, necessarily the questions trained on; skill questions are fresh
instances that no generated training row (base, train, reference, val) contains.

Everything is deterministic for a seed (string-seeded `random.Random` streams, never the global RNG); the
world, the training rows and the corruption use separate streams, so the noise settings do not change
which clean rows are drawn and the sizes do not change the world. The shipped tasks are those of seed 0
with the default `test_per_task`: generate training data with `seed=0` to evaluate on them.

    python -m lit_tokensel_bench.noisy_sft.data --out runs/noisy_sft/data   # write the benchmark data
    python -m lit_tokensel_bench.noisy_sft.data --write-tasks                # rewrite the shipped task files
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_tokensel.data.tokenization import _mask_from_spans, assistant_char_spans, assistant_token_mask

FAMILIES = ("capital", "birth_year", "addition", "reverse")
FACT_FAMILIES = ("capital", "birth_year")
FILLER = "filler"
WRONG_ANSWER = "wrong_answer"
KINDS = (FILLER, WRONG_ANSWER)

FILLER_WORDS: tuple[str, ...] = (
    "blorp",
    "quazzle",
    "snorf",
    "glimble",
    "wuzzle",
    "zibber",
    "flumox",
    "grotch",
    "plimsk",
    "vorple",
    "snizzle",
    "krampf",
    "yobble",
    "drizzit",
    "mumphle",
    "quimble",
    "skronk",
    "blatch",
    "frobnik",
    "zoggle",
    "twindle",
    "glurb",
    "pazzle",
    "nurfle",
    "shnock",
    "vimble",
    "crunkle",
    "zorp",
    "dwimble",
    "flarn",
    "gribble",
    "throcket",
    "splunge",
    "wibbix",
    "morpel",
    "quonk",
    "jibbet",
    "snargle",
    "plurk",
    "foozle",
)
"""Nonsense words inserted as noise; used nowhere else in the data. Which word goes where is random, so
a filler word's first token cannot be predicted; its later tokens follow from the first."""

WORD_POOL: tuple[str, ...] = (
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "table",
    "music",
    "light",
    "paper",
    "garden",
    "winter",
    "bread",
    "silver",
    "horse",
    "window",
    "summer",
    "ocean",
    "forest",
    "candle",
    "rocket",
    "tiger",
    "yellow",
    "planet",
    "bottle",
    "mirror",
    "pencil",
    "button",
    "jacket",
    "ladder",
    "basket",
    "castle",
    "dragon",
    "feather",
    "hammer",
    "island",
    "kettle",
    "lemon",
    "monkey",
    "needle",
    "orange",
    "pillow",
    "rabbit",
    "saddle",
    "tunnel",
    "violin",
    "wagon",
    "zebra",
    "anchor",
)
"""List words of the `reverse` family, split half and half between the base and the sft entity sets."""

ENTITIES_PER_SET = 24
YEARS = range(1700, 2000)
ADDENDS = range(0, 50)
LIST_LENGTH = 3
SUM_OFFSETS = range(1, 11)  # a wrong sum is off by 1 to 10
NUM_CHOICES = 4
SHIPPED_SEED = 0
TASK_NAMES = ("noisy_sft_gen", "noisy_sft_mc", "noisy_sft_nll")
TASKS_DIR = Path(__file__).resolve().parents[3] / "evaluation" / "lit_tokensel_eval" / "tasks" / "noisy_sft"

_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "tr",
    "st",
    "th",
    "sh",
)
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m")
_COUNTRY_SUFFIXES = ("ia", "ora", "and", "esh", "istan", "onia")
_CITY_SUFFIXES = ("vik", "burg", "ton", "grad", "mouth", "polis")

Span = tuple[int, int, str]
Piece = tuple[str, "str | None"]  # text and its corruption kind (None: clean)
Word = tuple[Piece, ...]  # one whitespace-separated word of an answer, in pieces
Key = Any  # what identifies an instance: a country, a person, (a, b), a tuple of list words
Value = Any  # an answer's value: a city, a year, a sum, a tuple of list words in answer order


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class NoiseConfig:
    """How the training set is corrupted.

    The defaults corrupt about 20% of the labeled response tokens (end-of-turn tokens included) with the
    benchmark's tokenizer, `build_chat_tokenizer` on the corpus with 512 tokens: for seed 0, 13.9% filler
    and 5.5% wrong answer (19.4%). That tokenizer splits a filler word into ~4.8 tokens, so a quarter of
    the rows with 1 to 3 fillers already make up the larger part.
    """

    filler_row_share: float = 0.25  # share of rows with 1 to `max_fillers` filler words inserted
    max_fillers: int = 3
    wrong_answer_share: float = 0.2  # share of rows whose answer value is wrong

    def __post_init__(self) -> None:
        for name in ("filler_row_share", "wrong_answer_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_fillers < 1:
            raise ValueError(f"max_fillers must be >= 1, got {self.max_fillers}")


@dataclass(frozen=True)
class BenchmarkSizes:
    """Rows per file; `test_per_task` is the documents per family in the test set (a fact family has at most
    one document per sft entity, `ENTITIES_PER_SET`)."""

    train_rows: int = 1600
    reference_rows: int = 400
    base_rows: int = 3000
    test_per_task: int = 40
    val_rows: int = 100


# ---------------------------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class EntitySet:
    """The facts and list words of one side of the world."""

    capitals: dict[str, str] = field(hash=False)
    birth_years: dict[str, int] = field(hash=False)
    words: tuple[str, ...] = ()

    def names(self) -> list[str]:
        """Every entity string of this set: countries, cities, people and list words."""
        return [*self.capitals, *self.capitals.values(), *self.birth_years, *self.words]


@dataclass(frozen=True)
class World:
    base: EntitySet
    sft: EntitySet


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _unique_names(rng: random.Random, n: int, make: Any, taken: set[str]) -> list[str]:
    """`n` names from `make(rng)` that are not in `taken` (compared lowercased); adds them to `taken`."""
    names = []
    while len(names) < n:
        name = make(rng)
        if name.lower() not in taken:
            taken.add(name.lower())
            names.append(name)
    return names


def make_world(seed: int = 0) -> World:
    """Two disjoint entity sets of `ENTITIES_PER_SET` countries (with capitals), people (with distinct birth
    years) and list words each; no name occurs twice anywhere (not as a country, city, first or last name)."""
    rng = random.Random(f"noisy_sft:{seed}:world")
    n = 2 * ENTITIES_PER_SET
    taken = {w.lower() for w in FILLER_WORDS + WORD_POOL}
    countries = _unique_names(
        rng, n, lambda r: (_syllable(r) + _syllable(r)).capitalize() + r.choice(_COUNTRY_SUFFIXES), taken
    )
    cities = _unique_names(
        rng, n, lambda r: (_syllable(r) + _syllable(r)).capitalize() + r.choice(_CITY_SUFFIXES), taken
    )
    firsts = _unique_names(rng, n, lambda r: (_syllable(r) + _syllable(r)).capitalize(), taken)
    lasts = _unique_names(rng, n, lambda r: (_syllable(r) + _syllable(r)).capitalize(), taken)
    years = rng.sample(list(YEARS), n)
    words = list(WORD_POOL)
    rng.shuffle(words)

    def side(part: slice) -> EntitySet:
        people = [f"{first} {last}" for first, last in zip(firsts[part], lasts[part])]
        return EntitySet(
            capitals=dict(zip(countries[part], cities[part])),
            birth_years=dict(zip(people, years[part])),
            words=tuple(words[part]),
        )

    half = len(WORD_POOL) // 2
    assert half == ENTITIES_PER_SET
    return World(base=side(slice(0, ENTITIES_PER_SET)), sft=side(slice(ENTITIES_PER_SET, n)))


# ---------------------------------------------------------------------------------------------- instances


def question(family: str, key: Key) -> str:
    if family == "capital":
        return f"What is the capital of {key}?"
    if family == "birth_year":
        return f"In which year was {key} born?"
    if family == "addition":
        return f"What is {key[0]} + {key[1]}?"
    if family == "reverse":
        return f"Reverse the list: {', '.join(key)}"
    raise ValueError(f"unknown family {family!r}")


def true_value(entities: EntitySet, family: str, key: Key) -> Value:
    if family == "capital":
        return entities.capitals[key]
    if family == "birth_year":
        return entities.birth_years[key]
    if family == "addition":
        return key[0] + key[1]
    if family == "reverse":
        return tuple(reversed(key))
    raise ValueError(f"unknown family {family!r}")


def wrong_values(rng: random.Random, entities: EntitySet, family: str, key: Key, k: int) -> list[Value]:
    """`k` distinct values that are not the true one: other sft entities' cities or years, sums off by 1 to 10,
    other orders of the list."""
    truth = true_value(entities, family, key)
    if family == "capital":
        pool = [city for country, city in entities.capitals.items() if country != key]
    elif family == "birth_year":
        pool = [year for person, year in entities.birth_years.items() if person != key]
    elif family == "addition":
        pool = [s for d in SUM_OFFSETS for s in (truth - d, truth + d) if s >= 0]
    elif family == "reverse":
        pool = [p for p in itertools.permutations(key) if p != truth]
    else:
        raise ValueError(f"unknown family {family!r}")
    return rng.sample(pool, k)


def _words(text: str) -> tuple[Word, ...]:
    return tuple(((w, None),) for w in text.split())


def answer_words(family: str, key: Key, value: Value, truth: Value) -> tuple[Word, ...]:
    """The answer sentence for `value`, word by word; the pieces that differ from `truth` are `wrong_answer`."""
    if family == "reverse":
        return tuple(
            ((shown, None if shown == right else WRONG_ANSWER), ("," if i < len(value) - 1 else ".", None))
            for i, (shown, right) in enumerate(zip(value, truth))
        )
    kind = None if value == truth else WRONG_ANSWER
    prefix = {
        "capital": f"The capital of {key} is",
        "birth_year": f"{key} was born in",
        "addition": f"{key[0]} + {key[1]} =",
    }[family]
    return (*_words(prefix), ((str(value), kind), (".", None)))


def render(words: Sequence[Word]) -> tuple[str, list[Span]]:
    """The words joined by single spaces, and the `[start, end, kind)` span of every corrupted piece."""
    text, spans = [], []
    position = 0
    for i, word in enumerate(words):
        if i:
            text.append(" ")
            position += 1
        for piece, kind in word:
            if kind is not None:
                spans.append((position, position + len(piece), kind))
            text.append(piece)
            position += len(piece)
    return "".join(text), spans


def answer(entities: EntitySet, family: str, key: Key) -> str:
    """The correct answer sentence."""
    truth = true_value(entities, family, key)
    return render(answer_words(family, key, truth, truth))[0]


def chat_row(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


# ---------------------------------------------------------------------------------------------- sampling


def _cycle_shuffled(rng: random.Random, items: Sequence[Any]) -> Iterator[Any]:
    """Every item once in random order, again and again (balanced exposure of each fact)."""
    while True:
        order = list(items)
        rng.shuffle(order)
        yield from order


def _sample_skill(rng: random.Random, entities: EntitySet, family: str) -> Key:
    if family == "addition":
        return (rng.choice(ADDENDS), rng.choice(ADDENDS))
    return tuple(rng.sample(entities.words, LIST_LENGTH))


def sample_keys(
    rng: random.Random, entities: EntitySet, n: int, exclude: AbstractSet[tuple[str, Key]] = frozenset()
) -> list[tuple[str, Key]]:
    """`n` (family, key) pairs: families in equal shares, shuffled; each fact family cycles through all its
    entities; skill instances are drawn at random, never one in `exclude`."""
    families = [FAMILIES[i % len(FAMILIES)] for i in range(n)]
    rng.shuffle(families)
    facts = {
        "capital": _cycle_shuffled(rng, sorted(entities.capitals)),
        "birth_year": _cycle_shuffled(rng, sorted(entities.birth_years)),
    }
    keys = []
    for family in families:
        if family in facts:
            key = next(facts[family])
        else:
            key = _sample_skill(rng, entities, family)
            while (family, key) in exclude:
                key = _sample_skill(rng, entities, family)
        keys.append((family, key))
    return keys


def evaluation_keys(world: World, seed: int = 0, per_task: int = 40) -> dict[str, list[Key]]:
    """The test instances: the first `per_task` sft entities (sorted) of each fact family, `per_task` distinct
    fresh skill instances (the first ones stay the same when `per_task` grows)."""
    rng = random.Random(f"noisy_sft:{seed}:test")
    keys: dict[str, list[Key]] = {
        "capital": sorted(world.sft.capitals)[:per_task],
        "birth_year": sorted(world.sft.birth_years)[:per_task],
    }
    for family in ("addition", "reverse"):
        keys[family] = []
        while len(keys[family]) < per_task:
            key = _sample_skill(rng, world.sft, family)
            if key not in keys[family]:
                keys[family].append(key)
    return keys


def _skill_test_set(world: World, seed: int, per_task: int) -> set[tuple[str, Key]]:
    keys = evaluation_keys(world, seed, per_task)
    return {(f, k) for f in ("addition", "reverse") for k in keys[f]}


def corrupt(
    rng: random.Random, entities: EntitySet, family: str, key: Key, noise: NoiseConfig
) -> tuple[str, list[Span]]:
    """One noisy answer: maybe a wrong value, then maybe 1 to `max_fillers` filler words at word boundaries."""
    truth = true_value(entities, family, key)
    value = (
        wrong_values(rng, entities, family, key, 1)[0] if rng.random() < noise.wrong_answer_share else truth
    )
    words = list(answer_words(family, key, value, truth))
    if rng.random() < noise.filler_row_share:
        for _ in range(rng.randint(1, noise.max_fillers)):
            words.insert(rng.randint(0, len(words)), ((rng.choice(FILLER_WORDS), FILLER),))
    return render(words)


def clean_rows(entities: EntitySet, keys: Sequence[tuple[str, Key]]) -> list[dict]:
    return [chat_row(question(f, k), answer(entities, f, k)) for f, k in keys]


def noisy_rows(
    rng: random.Random, entities: EntitySet, keys: Sequence[tuple[str, Key]], noise: NoiseConfig
) -> tuple[list[dict], list[list[Span]]]:
    rows, spans = [], []
    for family, key in keys:
        content, row_spans = corrupt(rng, entities, family, key, noise)
        rows.append(chat_row(question(family, key), content))
        spans.append(row_spans)
    return rows, spans


# ---------------------------------------------------------------------------------------------- test documents


def test_documents(seed: int = 0, per_task: int = 40) -> dict[str, list[dict]]:
    """The clean test documents of `noisy_sft_gen`, `noisy_sft_mc` and `noisy_sft_nll`, same questions in all
    three: gen and nll `{"family", "question", "answer"}` (the correct answer sentence); mc adds `choices`, four
    answer sentences in the trained format (the correct one and three with wrong values) and `answer`, the
    index of the correct one."""
    world = make_world(seed)
    entities = world.sft
    rng = random.Random(f"noisy_sft:{seed}:choices")
    gen, mc = [], []
    for family, keys in evaluation_keys(world, seed, per_task).items():
        for key in keys:
            truth = true_value(entities, family, key)
            options = [truth, *wrong_values(rng, entities, family, key, NUM_CHOICES - 1)]
            rng.shuffle(options)
            doc = {
                "family": family,
                "question": question(family, key),
                "answer": answer(entities, family, key),
            }
            gen.append(doc)
            mc.append(
                {
                    **doc,
                    "choices": [render(answer_words(family, key, o, o))[0] for o in options],
                    "answer": options.index(truth),
                }
            )
    return {"noisy_sft_gen": gen, "noisy_sft_mc": mc, "noisy_sft_nll": [dict(d) for d in gen]}


def evaluation_texts(docs: dict[str, list[dict]]) -> list[str]:
    """Every question, answer and choice of the test documents, each once, in order."""
    texts: dict[str, None] = {}
    for task_docs in docs.values():
        for doc in task_docs:
            for text in (doc["question"], *doc.get("choices", [doc["answer"]])):
                texts.setdefault(text)
    return list(texts)


# ---------------------------------------------------------------------------------------------- files


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_benchmark_data(
    out_dir: Path, sizes: BenchmarkSizes = BenchmarkSizes(), noise: NoiseConfig = NoiseConfig(), seed: int = 0
) -> dict[str, Path]:
    """Write the benchmark's files under `out_dir` (see the module docstring); their paths by key: "train",
    "corruption", "reference", "base", "val", "corpus"."""
    out_dir = Path(out_dir)
    world = make_world(seed)
    held_out = _skill_test_set(world, seed, sizes.test_per_task)

    def keys(stream: str, entities: EntitySet, n: int) -> list[tuple[str, Key]]:
        return sample_keys(random.Random(f"noisy_sft:{seed}:{stream}"), entities, n, held_out)

    train, spans = noisy_rows(
        random.Random(f"noisy_sft:{seed}:noise"), world.sft, keys("train", world.sft, sizes.train_rows), noise
    )
    splits = {
        "train": train,
        "reference": clean_rows(world.sft, keys("reference", world.sft, sizes.reference_rows)),
        "base": clean_rows(world.base, keys("base", world.base, sizes.base_rows)),
        "val": clean_rows(world.sft, keys("val", world.sft, sizes.val_rows)),
    }
    paths = {name: write_jsonl(out_dir / f"{name}.jsonl", rows) for name, rows in splits.items()}
    paths["corruption"] = write_jsonl(
        out_dir / "train.corruption.jsonl",
        [{"row": i, "spans": [list(s) for s in row]} for i, row in enumerate(spans)],
    )
    texts = [
        m["content"]
        for name in ("base", "train", "reference", "val")
        for row in splits[name]
        for m in row["messages"]
    ]
    texts += evaluation_texts(test_documents(seed, sizes.test_per_task))
    paths["corpus"] = out_dir / "tokenizer_corpus.txt"
    paths["corpus"].write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return {k: paths[k] for k in ("train", "corruption", "reference", "base", "val", "corpus")}


def read_corpus(path: Path) -> list[str]:
    """The texts of `tokenizer_corpus.txt`, one per line."""
    return Path(path).read_text(encoding="utf-8").splitlines()


def read_corruption(path: Path) -> list[list[tuple[int, int, str]]]:
    """The corrupted spans of each train row, in row order (checks that the rows are numbered 0, 1, ...)."""
    spans = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        record = json.loads(line)
        if record["row"] != number:
            raise ValueError(f"{path}:{number + 1}: row {record['row']}, expected {number}")
        spans.append([(int(s), int(e), str(kind)) for s, e, kind in record["spans"]])
    return spans


# ---------------------------------------------------------------------------------------------- token labels


def corruption_token_kinds(
    tokenizer: Any, messages: Sequence[dict[str, str]], spans: Sequence[Span], max_length: int
) -> list[str | None]:
    """The corruption kind (None: clean) of each labeled token of `tokenize_conversation(tokenizer, messages,
    max_length)`, in order. `spans` are character spans of the (single) assistant message's content; a token
    overlapping a span's character takes its kind (the first such span's); the end-of-turn token is clean."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if len(turns) != 1:
        raise ValueError(f"expected exactly one assistant message, got {len(turns)}")
    text, turn_spans = assistant_char_spans(tokenizer, messages)
    content = messages[turns[0]]["content"]
    start = text.find(content, turn_spans[0][0]) if turn_spans else -1
    if start < 0:
        raise ValueError("the assistant content does not occur verbatim in the rendered conversation")
    input_ids, mask = assistant_token_mask(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(input_ids):
        raise ValueError(
            "tokenizing the rendered text does not give the pipeline's tokens; cannot map offsets"
        )
    offsets = encoded["offset_mapping"][:max_length]
    kinds: list[str | None] = [None] * len(offsets)
    for s, e, kind in reversed(list(spans)):  # the first span wins where spans share a token
        for i, hit in enumerate(_mask_from_spans(offsets, [(start + s, start + e)])):
            if hit:
                kinds[i] = kind
    return [kind for kind, m in zip(kinds, mask[:max_length]) if m]


def corruption_token_labels(
    tokenizer: Any, messages: Sequence[dict[str, str]], spans: Sequence[Span], max_length: int
) -> list[int]:
    """1 (corrupted) or 0 per labeled response token, in the order `tokenize_conversation` labels them."""
    return [int(kind is not None) for kind in corruption_token_kinds(tokenizer, messages, spans, max_length)]


def corrupted_token_share(
    tokenizer: Any, rows: Sequence[dict], spans: Sequence[Sequence[Span]], max_length: int = 256
) -> dict[str, float]:
    """Share of the labeled response tokens (end-of-turn tokens included) that are corrupted, per kind and in
    total, plus the token counts."""
    counts = dict.fromkeys(KINDS, 0)
    total = 0
    for row, row_spans in zip(rows, spans, strict=True):
        kinds = corruption_token_kinds(tokenizer, row["messages"], row_spans, max_length)
        total += len(kinds)
        for kind in kinds:
            if kind is not None:
                counts[kind] += 1
    corrupted = sum(counts.values())
    return {
        **{k: v / total for k, v in counts.items()},
        "total": corrupted / total,
        "labeled_tokens": total,
        "corrupted_tokens": corrupted,
    }


# ---------------------------------------------------------------------------------------------- CLI


def write_task_files(out_dir: Path | None = None) -> list[Path]:
    """Write the shipped task data `<task>.jsonl` (to `TASKS_DIR` by default): `test_documents` of `SHIPPED_SEED`
    with the default `test_per_task`."""
    out_dir = Path(out_dir) if out_dir is not None else TASKS_DIR
    docs = test_documents(SHIPPED_SEED, BenchmarkSizes().test_per_task)
    return [write_jsonl(out_dir / f"{name}.jsonl", docs[name]) for name in TASK_NAMES]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="write the benchmark data to this folder")
    parser.add_argument("--seed", type=int, default=0, help="data seed (the shipped tasks are seed 0's)")
    parser.add_argument(
        "--write-tasks", action="store_true", help=f"(re)write the shipped task data files under {TASKS_DIR}"
    )
    parser.add_argument(
        "--stats",
        action="store_true",
        help="with --out: print the corrupted-token share with a 512-token BPE on the corpus",
    )
    args = parser.parse_args(argv)
    if args.out is None and not args.write_tasks:
        parser.error("give --out DIR and/or --write-tasks")
    if args.write_tasks:
        for path in write_task_files():
            print(f"wrote {path}")
    if args.out is not None:
        paths = write_benchmark_data(args.out, seed=args.seed)
        for key, path in paths.items():
            print(f"{key}: {path}")
        if args.stats:
            from lit_tokensel.builtin.tokenizer import build_chat_tokenizer

            tokenizer = build_chat_tokenizer(read_corpus(paths["corpus"]), vocab_size=512)
            rows = [json.loads(line) for line in paths["train"].read_text(encoding="utf-8").splitlines()]
            share = corrupted_token_share(tokenizer, rows, read_corruption(paths["corruption"]))
            print(
                "corrupted response tokens: "
                + ", ".join(f"{k} {v:.1%}" if isinstance(v, float) else f"{k} {v}" for k, v in share.items())
            )


if __name__ == "__main__":
    main()
