"""The study's training data: a seeded mix of Alpaca-demo and a NaturalInstructions v1 sample, split into
the training rows and a held-out slice that trains the warm-up reference.

Both sources come from PyPI archives through `lit_tokensel.data.real_sources` (prepared once into the
cache, never fetched from a hub). Rows are rendered to chat `messages`; a row is kept when its prompt
leaves at least `min_answer_tokens` of `max_length` to the answer (the DataModule right-truncates the
rest of a long answer; NaturalInstructions' task definitions alone often run to hundreds of tokens, and a
row cut inside its prompt would train nothing). The pool is shuffled with the data seed and cut into
train and reference, so both hold the same mix in expectation; the realised counts per source are
written to `data/manifest.json` and into the report.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from lit_tokensel.data.formats import to_messages
from lit_tokensel.data.real_sources import alpaca_rows, natural_instruction_rows
from lit_tokensel_bench.noisy_sft.report import atomic_write_text
from lit_tokensel_bench.real_sft.plan import StudySettings


def prompt_length(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    """Tokens of the chat-template rendering up to the assistant turn (generation prompt included)."""
    ids = tokenizer.apply_chat_template(
        [m for m in messages if m["role"] != "assistant"], tokenize=True, add_generation_prompt=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return len(ids)


def pool(settings: StudySettings, tokenizer: Any) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every candidate row (with its `source`) whose prompt leaves `min_answer_tokens` to the answer,
    shuffled with the data seed; and per source the number of rows left out for length."""
    rows = [
        {"messages": to_messages(r, "alpaca"), "source": "alpaca_en_demo"}
        for r in alpaca_rows()[: settings.alpaca_rows]
    ]
    rows += [
        {"messages": r["messages"], "source": "natural_instructions", "task": r["task"]}
        for r in natural_instruction_rows(settings.ni_rows, seed=settings.data_seed)
    ]
    kept, too_long = [], Counter()
    for row in rows:
        if prompt_length(tokenizer, row["messages"]) <= settings.max_length - settings.min_answer_tokens:
            kept.append(row)
        else:
            too_long[row["source"]] += 1
    random.Random(settings.data_seed).shuffle(kept)
    return kept, dict(too_long)


def write_study_data(settings: StudySettings, tokenizer: Any, directory: Path) -> dict[str, Path]:
    """`train.jsonl`, `reference.jsonl` and `manifest.json` under `directory` (kept when already written)."""
    paths = {name: directory / f"{name}.jsonl" for name in ("train", "reference")}
    manifest = directory / "manifest.json"
    if manifest.is_file() and all(p.is_file() for p in paths.values()):
        return paths
    rows, too_long = pool(settings, tokenizer)
    need = settings.train_rows + settings.reference_rows
    if len(rows) < need:
        raise ValueError(
            f"the data pool holds {len(rows)} rows whose prompt fits {settings.max_length} - "
            f"{settings.min_answer_tokens} tokens, "
            f"{need} needed (train {settings.train_rows} + reference {settings.reference_rows})"
        )
    splits = {"train": rows[: settings.train_rows], "reference": rows[settings.train_rows : need]}
    directory.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        atomic_write_text(paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split))
    atomic_write_text(
        manifest,
        json.dumps(
            {
                "sources": {
                    "alpaca_en_demo": "builtin:alpaca_en_demo (llamafactory==0.9.5 data/alpaca_en_demo.json)",
                    "natural_instructions": f"builtin:natural_instructions-n{settings.ni_rows}-seed"
                    f"{settings.data_seed} (bigbench==1.0.0)",
                },
                "too_long": too_long,
                **{name: dict(Counter(r["source"] for r in split)) for name, split in splits.items()},
            },
            indent=1,
        ),
    )
    return paths
