"""Generate the quickstart's small instruction dataset (shipped in `assets/quickstart/`).

Every answer depends on its prompt, so a model that learns the tasks shows it on held-out rows.
Families: addition, comparison, capital letters, list reversal, next letter, capital cities.
About a tenth of the rows carry a system prompt and a tenth are two-turn conversations.
Regenerate with `python -m lit_tokensel.builtin.quickstart_data` (deterministic for a seed).
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections.abc import Callable
from pathlib import Path

WORDS = (
    "apple river stone cloud green table music light paper garden winter bread silver horse "
    "window summer ocean forest candle rocket tiger yellow planet bottle"
).split()
CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Canada": "Ottawa",
    "Germany": "Berlin",
    "Greece": "Athens",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Poland": "Warsaw",
    "Ireland": "Dublin",
    "Austria": "Vienna",
}
SYSTEM_PROMPT = "You are a concise assistant."


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."


def _comparison(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(100), 2)
    return f"Which number is larger: {a} or {b}?", f"{max(a, b)} is larger."


def _capital_letters(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 2)
    return f"Write in capital letters: {' '.join(words)}", " ".join(words).upper()


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 3)
    return f"Reverse the list: {', '.join(words)}", ", ".join(reversed(words))


def _next_letter(rng: random.Random) -> tuple[str, str]:
    letter = rng.choice(string.ascii_lowercase[:-1])
    return f"Which letter comes after {letter}?", f"The letter after {letter} is {chr(ord(letter) + 1)}."


def _capital_city(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "addition": _addition,
    "comparison": _comparison,
    "capital_letters": _capital_letters,
    "reverse": _reverse,
    "next_letter": _next_letter,
    "capital_city": _capital_city,
}


def make_row(rng: random.Random) -> dict:
    """One chat row: optional system prompt, one or two user/assistant exchanges."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.1 else []
    for _ in range(2 if rng.random() < 0.1 else 1):
        question, answer = FAMILIES[rng.choice(sorted(FAMILIES))](rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_split(path: Path, n_rows: int, seed: int) -> None:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(n_rows):
            f.write(json.dumps(make_row(rng)) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "assets" / "quickstart")
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--val-rows", type=int, default=300)
    args = parser.parse_args()
    write_split(args.out / "train.jsonl", args.train_rows, seed=0)
    write_split(args.out / "val.jsonl", args.val_rows, seed=1)


if __name__ == "__main__":
    main()
