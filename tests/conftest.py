"""Shared pytest fixtures. Tests run offline: tokenizers and models are built here, never downloaded."""

from __future__ import annotations

import os
import tempfile

# Before anything imports `datasets`/`transformers`: without these, `load_dataset` and a mistyped hub id
# make network calls and retry for about a minute.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Keep test runs out of the user's caches (datasets' Arrow files, built-in models).
_TEST_CACHE = tempfile.mkdtemp(prefix="lit_tokensel-tests-")
os.environ["HF_DATASETS_CACHE"] = os.path.join(_TEST_CACHE, "datasets")
os.environ["LIT_TOKENSEL_CACHE"] = os.path.join(_TEST_CACHE, "lit_tokensel")

pytest_plugins = ["tests.model_fixtures"]

import json  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from lit_tokensel.builtin.tokenizer import build_chat_tokenizer  # noqa: E402
from lit_tokensel.data.templates import CHATML_TEMPLATE  # noqa: E402

# ---------------------------------------------------------------------------------------------- tokenizers

CHAT_CORPUS = (
    "What is 2+2? The answer is 4.",
    "Add the numbers. 2 and 2. Say hello. hello world",
    "You are terse. You are a helpful assistant. Reverse the list: a b c. c b a",
    "Which number is larger: 5 or 33? 33 is larger. The letter after e is f.",
)
"""Fixed corpus of the test tokenizers: same vocabulary in every fixture and every run."""

CHATML_TEMPLATE_NO_TAGS = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
"""ChatML without `{% generation %}` tags: renders identically, labels come from prefix rendering."""


@pytest.fixture
def chat_tokenizer():
    """Byte-level BPE (512 tokens) with the ChatML template that has generation tags."""
    return build_chat_tokenizer(CHAT_CORPUS)


@pytest.fixture
def chat_tokenizer_no_tags():
    """Same vocabulary as `chat_tokenizer`, template without generation tags."""
    return build_chat_tokenizer(CHAT_CORPUS, chat_template=CHATML_TEMPLATE_NO_TAGS)


@pytest.fixture
def tokenizer_without_template():
    """Same vocabulary (including `<|im_start|>`/`<|im_end|>`), no chat template, like many base models."""
    return build_chat_tokenizer(CHAT_CORPUS, chat_template=None)


# ---------------------------------------------------------------------------------------------- data files


def _write_jsonl(path: str | Path, rows: Iterable[Any]) -> Path:
    """Write rows as JSON Lines; a `str` row is written verbatim (to make invalid JSON lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture
def write_jsonl() -> Callable[[str | Path, Iterable[Any]], Path]:
    """`write_jsonl(path, rows)`: write rows as JSON Lines (a `str` row verbatim); returns the path."""
    return _write_jsonl


@pytest.fixture
def make_sft_datamodule(tmp_path: Path) -> Callable[..., Any]:
    """`make_sft_datamodule(rows, tokenizer, **kwargs)`: write `rows` to `tmp_path/train.jsonl`, build an
    `SFTDataModule` on it (datasets cache under `tmp_path/hf_cache`), run `setup("fit")`, return it."""
    from lit_tokensel.data import SFTDataModule

    def make(rows: Iterable[Any], tokenizer: Any, *, setup: bool = True, **kwargs: Any) -> SFTDataModule:
        kwargs.setdefault("train_file", str(_write_jsonl(tmp_path / "train.jsonl", rows)))
        kwargs.setdefault("cache_dir", str(tmp_path / "hf_cache"))
        dm = SFTDataModule(tokenizer=tokenizer, **kwargs)
        if setup:
            dm.setup("fit")
        return dm

    return make
