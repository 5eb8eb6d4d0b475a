"""Bad input to the data pipeline: huge rows (bounded memory), a UTF-8 BOM, a directory or a missing file given
as data, and error messages that name the setting as a CLI flag."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lit_tokensel.data.errors import InvalidRowError
from lit_tokensel.data.tokenization import (
    IGNORE_INDEX,
    assistant_token_mask,
    bound_messages,
    char_budget,
    tokenize_conversation,
)
from tests.conftest import CHAT_CORPUS

REPO = Path(__file__).parents[1]


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


# ------------------------------------------------------------------------------------- truncation first


def _unbounded(tokenizer, messages, max_length, train_on):
    """Independent reference: tokenize the whole conversation, then keep the first `max_length` tokens."""
    ids, mask = assistant_token_mask(tokenizer, messages, train_on)
    ids, mask = ids[:max_length], mask[:max_length]
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]


LONG = " ".join(CHAT_CORPUS) * 40  # ~7,000 characters


@pytest.mark.parametrize("tags", [True, False], ids=["generation_tags", "prefix_rendering"])
@pytest.mark.parametrize("train_on", ["all_turns", "last_turn"])
@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": LONG}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": LONG}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello " * 30},
            {"role": "user", "content": LONG},
            {"role": "assistant", "content": "c b a"},
        ],
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": LONG[:200]},
            {"role": "user", "content": LONG},
            {"role": "assistant", "content": LONG},
        ],
    ],
    ids=["long_prompt", "long_response", "long_middle_turn", "long_tail"],
)
@pytest.mark.parametrize("max_length", [16, 96])
def test_cutting_long_conversations_before_tokenizing_changes_no_kept_token(
    chat_tokenizer, chat_tokenizer_no_tags, tags, train_on, messages, max_length
):
    tokenizer = chat_tokenizer if tags else chat_tokenizer_no_tags
    total = sum(len(m["content"]) for m in messages)
    assert char_budget(tokenizer, max_length) < total  # the bounded path is exercised
    assert len(bound_messages(messages, char_budget(tokenizer, max_length))) <= len(messages)
    result = tokenize_conversation(tokenizer, messages, max_length, train_on)
    ids, labels = _unbounded(tokenizer, messages, max_length, train_on)
    assert result.input_ids == ids and result.labels == labels
    assert result.truncated and result.num_tokens > max_length


def test_a_budget_that_does_not_hold_enough_tokens_falls_back_to_the_whole_conversation(
    chat_tokenizer, monkeypatch
):
    """A tokenizer whose tokens cover more characters than its vocabulary entries (a normalizer deleting
    characters) would leave too few tokens after the cut: detected by counting, then tokenized in full."""
    import lit_tokensel.data.tokenization as tokenization

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": LONG}]
    monkeypatch.setattr(tokenization, "max_token_chars", lambda tokenizer: 1)  # budget: 80 characters
    calls = []
    original = tokenization.assistant_token_mask
    monkeypatch.setattr(
        tokenization,
        "assistant_token_mask",
        lambda tok, msgs, train_on: (
            calls.append(sum(len(m["content"]) for m in msgs)) or original(tok, msgs, train_on)
        ),
    )
    result = tokenization.tokenize_conversation(chat_tokenizer, messages, 16)
    assert calls == [80, 2 + len(LONG)]  # the cut render had < 16 + 64 tokens, so the whole one was tokenized
    ids, labels = _unbounded(chat_tokenizer, messages, 16, "all_turns")
    assert result.input_ids == ids and result.labels == labels


def test_conversations_within_the_budget_are_not_touched(chat_tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    bounded = bound_messages(messages, char_budget(chat_tokenizer, 8))
    assert bounded == messages and all(a is b for a, b in zip(bounded, messages, strict=True))


MEMORY_PROBE = textwrap.dedent("""
    import resource, sys, time
    from lit_tokensel.builtin.tokenizer import build_chat_tokenizer
    from lit_tokensel.data import SFTDataModule
    from tests.conftest import CHAT_CORPUS

    start = time.perf_counter()
    dm = SFTDataModule(train_file=sys.argv[1], tokenizer=build_chat_tokenizer(CHAT_CORPUS), max_length=256,
                       cache_dir=sys.argv[2])
    dm.setup("fit")
    stats = dm.stats["train"]
    lengths = sorted(len(ids) for ids in dm.train_dataset["input_ids"])
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(peak_mib, time.perf_counter() - start, stats.truncated, stats.samples, lengths[-1])
""")


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_a_50_mb_row_stays_under_1_gb_peak_memory(tmp_path):
    """Before: the whole conversation was tokenized, then truncated (13 GB and 3 minutes for this row)."""
    text = ("hello world the answer is four " * (50 * 2**20 // 31 + 1))[: 50 * 2**20]
    data = tmp_path / "train.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        f.write(json.dumps(chat("hi", text)) + "\n" + json.dumps(chat("What is 2+2?", "4")) + "\n")
    del text
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(data), str(tmp_path / "hf")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    peak_mib, seconds, truncated, samples, longest = out.stdout.split()
    # the whole process: interpreter, torch/transformers/datasets imports (~550 MiB) and the 50 MB row
    assert float(peak_mib) < 1024, f"peak {float(peak_mib):.0f} MiB in {float(seconds):.1f} s"
    assert (int(truncated), int(samples), int(longest)) == (1, 2, 256)


# ------------------------------------------------------------------------------------- files


def _bom_file(path: Path, rows: list[dict], as_list: bool) -> Path:
    body = json.dumps(rows) if as_list else "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    return path


@pytest.mark.parametrize("on_invalid", ["error", "skip"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_utf8_bom_is_accepted_and_row_0_kept(
    make_sft_datamodule, chat_tokenizer, tmp_path, suffix, on_invalid
):
    rows = [chat("What is 2+2?", "4"), chat("Say hello.", "hello"), chat("Add 2 and 2.", "4")]
    path = _bom_file(tmp_path / f"bom{suffix}", rows, as_list=suffix == ".json")
    dm = make_sft_datamodule([], chat_tokenizer, train_file=str(path), on_invalid=on_invalid)
    assert dm.stats["train"].rejected == 0 and sorted(dm.train_dataset["sample_id"]) == [0, 1, 2]
    plain = make_sft_datamodule(rows, chat_tokenizer, cache_dir=str(tmp_path / "plain"))
    assert dm.train_dataset["input_ids"] == plain.train_dataset["input_ids"]


@pytest.mark.parametrize("setting", ["train_file", "val_file"])
def test_a_directory_as_data_file_says_it_is_a_directory(
    make_sft_datamodule, chat_tokenizer, tmp_path, setting
):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(chat("hi", "hello")) + "\n")
    kwargs = {setting: str(folder)}
    if setting == "val_file":
        kwargs["train_file"] = str(folder / "train.jsonl")
    with pytest.raises(
        IsADirectoryError,
        match=rf"--data\.{setting}: .*data is a directory, not a data file.*"
        r"\(this directory has: train\.jsonl\)",
    ):
        make_sft_datamodule([], chat_tokenizer, **kwargs)


def test_a_missing_file_names_the_setting(make_sft_datamodule, chat_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data\.val_file: data file not found: .*nope\.jsonl"):
        make_sft_datamodule([chat("hi", "hello")], chat_tokenizer, val_file=str(tmp_path / "nope.jsonl"))


def test_row_errors_in_the_val_file_name_the_setting_and_the_flag(
    make_sft_datamodule, chat_tokenizer, tmp_path
):
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps(chat("hi", "hello")) + "\n" + json.dumps(chat("hi", 5)) + "\n")
    with pytest.raises(InvalidRowError) as error:
        make_sft_datamodule([chat("hi", "hello")], chat_tokenizer, val_file=str(val))
    assert str(error.value).startswith(
        f"--data.val_file: {val} row 1, field 'messages[1].content': expected a string"
    )
    assert "--data.on_invalid skip" in str(error.value)


def test_format_hints_are_cli_flags(make_sft_datamodule, chat_tokenizer):
    with pytest.raises(ValueError, match=r"--data\.format messages\|prompt_completion\|alpaca"):
        make_sft_datamodule([{"text": "x"}], chat_tokenizer)
