"""Generate the bundled offline tasks' data (shipped in `tasks/quickstart/*.jsonl`).

Drawn from the quickstart's families that its tiny model learns (capital cities, next letter), with
the exact question and answer strings of `lit_tokensel.builtin.quickstart_data`, so a model trained
on the quickstart answers in the format it was trained on. Every question of both families is
enumerated once (16 countries + 25 letters = 41 documents per task), so the tasks are small, exact
and deterministic. Regenerate with `python -m lit_tokensel_eval.bundled_data` (seeded).
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

from lit_tokensel.builtin.quickstart_data import CAPITALS

TASK_DATA_DIR = Path(__file__).parent / "tasks" / "quickstart"
NUM_CHOICES = 4


def capital_question(country: str) -> str:
    return f"What is the capital of {country}?"


def capital_answer(country: str, city: str) -> str:
    return f"The capital of {country} is {city}."


def next_letter_question(letter: str) -> str:
    return f"Which letter comes after {letter}?"


def next_letter_answer(letter: str, following: str) -> str:
    return f"The letter after {letter} is {following}."


def _choices(correct: str, pool: list[str], rng: random.Random) -> tuple[list[str], int]:
    """`correct` plus `NUM_CHOICES - 1` distinct distractors from `pool`, shuffled; the correct index."""
    options = [correct, *rng.sample([p for p in pool if p != correct], NUM_CHOICES - 1)]
    rng.shuffle(options)
    return options, options.index(correct)


def generation_docs() -> list[dict]:
    """Question and the exact expected answer sentence, for exact-match scoring."""
    docs = [
        {"family": "capital_city", "question": capital_question(c), "answer": capital_answer(c, CAPITALS[c])}
        for c in sorted(CAPITALS)
    ]
    docs += [
        {
            "family": "next_letter",
            "question": next_letter_question(x),
            "answer": next_letter_answer(x, chr(ord(x) + 1)),
        }
        for x in string.ascii_lowercase[:-1]
    ]
    return docs


def multiple_choice_docs(seed: int = 0) -> list[dict]:
    """Question, four answer sentences in the trained format (one correct), and the correct index."""
    rng = random.Random(seed)
    cities = sorted(CAPITALS.values())
    docs = []
    for country in sorted(CAPITALS):
        options, answer = _choices(CAPITALS[country], cities, rng)
        docs.append(
            {
                "family": "capital_city",
                "question": capital_question(country),
                "choices": [capital_answer(country, o) for o in options],
                "answer": answer,
            }
        )
    letters = list(string.ascii_lowercase)
    for letter in string.ascii_lowercase[:-1]:
        options, answer = _choices(chr(ord(letter) + 1), [x for x in letters if x != letter], rng)
        docs.append(
            {
                "family": "next_letter",
                "question": next_letter_question(letter),
                "choices": [next_letter_answer(letter, o) for o in options],
                "answer": answer,
            }
        )
    return docs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=TASK_DATA_DIR)
    args = parser.parse_args()
    write_jsonl(args.out / "quickstart_gen.jsonl", generation_docs())
    write_jsonl(args.out / "quickstart_mc.jsonl", multiple_choice_docs())


if __name__ == "__main__":
    main()
