"""Invalid rows: errors naming file, row and field; `on_invalid="skip"` counts them and writes rejects."""

from __future__ import annotations

import json

import pytest

from lit_tokensel.data import InvalidRowError, SFTDataModule


def chat(user: str, assistant, role: str = "assistant") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": role, "content": assistant}]}


VALID = [chat("What is 2+2?", "The answer is 4."), chat("Say hello.", "hello"), chat("Hi", "world")]

BAD_ROWS = [
    # (row at index 3, field in the message, reason fragment)
    pytest.param(chat("Hi", 5), "messages[1].content", "expected a string, got int", id="content-is-number"),
    pytest.param({"messages": "Hi"}, "messages", "expected a list", id="messages-not-list"),
    pytest.param({"id": 3}, "messages", "missing field 'messages'", id="missing-field"),
    pytest.param(
        chat("Hi", "x", role="bot"),
        "messages[1].role",
        "unknown role 'bot' (expected one of system, user, assistant)",
        id="unknown-role",
    ),
    pytest.param(
        chat("Hi", "  \n"),
        "messages[1].content",
        "empty or whitespace-only assistant response",
        id="empty-response",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": "Hi"}]}, "messages", "no assistant turn", id="no-assistant"
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": "Hi"}, "oops"]},
        "messages[1]",
        "expected an object",
        id="message-not-object",
    ),
]


@pytest.mark.parametrize(("bad", "field", "reason"), BAD_ROWS)
def test_bad_row_error_names_file_row_and_field(make_sft_datamodule, chat_tokenizer, bad, field, reason):
    with pytest.raises(InvalidRowError) as info:
        make_sft_datamodule([*VALID, bad, VALID[0]], chat_tokenizer)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"train.jsonl row 3, field '{field}': {reason}" in message
    assert str(info.value.row) == "3" and info.value.field == field
    assert info.value.source.endswith("train.jsonl") and info.value.source in message
    assert "--data.on_invalid skip" in message and "--data.train_file: " in message


def test_invalid_json_line_names_row_and_line(make_sft_datamodule, chat_tokenizer):
    rows = [VALID[0], "", VALID[1], '{"messages": [', VALID[2]]  # the blank line is not a row
    with pytest.raises(InvalidRowError, match=r"train\.jsonl row 2: invalid JSON on line 4"):
        make_sft_datamodule(rows, chat_tokenizer)


def test_error_counts_all_invalid_rows(make_sft_datamodule, chat_tokenizer):
    with pytest.raises(InvalidRowError, match=r"row 1, .*\(2 invalid rows in this split in total\)"):
        make_sft_datamodule([VALID[0], chat("Hi", 5), chat("Hi", "x", role="bot")], chat_tokenizer)


def test_skip_counts_logs_and_writes_rejects(make_sft_datamodule, chat_tokenizer, tmp_path):
    bad_role = chat("Hi", "x", role="bot")
    rows = [VALID[0], bad_role, VALID[1], "not json", "", VALID[2], chat("Hi", 5)]
    with pytest.warns(
        UserWarning, match=r"skipped invalid rows \{'train': 3\}; see .*train\.jsonl\.rejects\.jsonl"
    ):
        dm = make_sft_datamodule(rows, chat_tokenizer, on_invalid="skip")
    stats = dm.stats["train"]
    assert (stats.rows_read, stats.rejected, stats.samples) == (6, 3, 3)
    assert sorted(dm.train_dataset["sample_id"]) == [0, 2, 4]
    rejects_path = tmp_path / "train.jsonl.rejects.jsonl"
    assert dm.rejects_paths == [str(rejects_path)]
    records = [json.loads(line) for line in rejects_path.read_text().splitlines()]
    assert [(r["split"], r["row"], r["field"]) for r in records] == [
        ("train", 1, "messages[1].role"),
        ("train", 3, None),
        ("train", 5, "messages[1].content"),
    ]
    assert records[0]["raw"] == bad_role and "unknown role 'bot'" in records[0]["reason"]
    assert records[1]["raw"] == "not json" and "invalid JSON on line 4" in records[1]["reason"]
    assert records[2]["raw"] == chat("Hi", 5)


def test_skip_with_explicit_rejects_file_and_val_file(write_jsonl, chat_tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [*VALID, chat("Hi", 5)])
    val = write_jsonl(tmp_path / "val.jsonl", [{"messages": "x"}, VALID[0]])
    dm = SFTDataModule(
        train_file=str(train),
        val_file=str(val),
        tokenizer=chat_tokenizer,
        on_invalid="skip",
        rejects_file=str(tmp_path / "out" / "rejects.jsonl"),
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.warns(UserWarning, match="skipped invalid rows"):
        dm.setup("fit")
    records = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["split"], r["source"], r["row"]) for r in records] == [
        ("train", str(train), 3),
        ("val", str(val), 0),
    ]
    assert (dm.stats["train"].rejected, dm.stats["val"].rejected) == (1, 1)
    assert list(dm.val_dataset["sample_id"]) == [1]


def test_template_failure_is_a_row_error(make_sft_datamodule, chat_tokenizer):
    chat_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    rows = [VALID[0], {"messages": [{"role": "system", "content": "S"}, *VALID[1]["messages"]]}]
    with pytest.raises(InvalidRowError, match=r"row 1, field 'messages': .*System role not supported"):
        make_sft_datamodule(rows, chat_tokenizer)
    with pytest.warns(UserWarning, match="skipped invalid rows"):
        dm = make_sft_datamodule(rows, chat_tokenizer, on_invalid="skip")
    assert dm.stats["train"].rejected == 1 and list(dm.train_dataset["sample_id"]) == [0]


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (
            [{"text": "x", "answer": "y"}],
            r"train\.jsonl: cannot detect the row format .*keys seen \(answer, text\)",
        ),
        ([{"messages": [], "prompt": "a", "completion": "b"}], r"train\.jsonl: the row format is ambiguous"),
    ],
)
def test_format_detection_errors_name_file_and_keys(make_sft_datamodule, chat_tokenizer, rows, match):
    with pytest.raises(ValueError, match=match):
        make_sft_datamodule(rows, chat_tokenizer)
