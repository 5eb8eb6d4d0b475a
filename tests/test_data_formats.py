"""Row formats: detection and conversion to chat messages (pure Python, no tokenizer)."""

from __future__ import annotations

import pytest

from lit_tokensel.data import detect_format, to_messages
from lit_tokensel.data.errors import RowError


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["messages"], "messages"),
        (["messages", "id", "source"], "messages"),
        (["prompt", "completion"], "prompt_completion"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output"], "alpaca"),
    ],
)
def test_detect_format(keys, expected):
    assert detect_format(keys, "f.jsonl") == expected


def test_detect_format_unknown_names_file_and_keys():
    with pytest.raises(ValueError, match=r"data/x\.jsonl: cannot detect.*keys seen \(answer, text\)"):
        detect_format(["text", "answer"], "data/x.jsonl")


def test_detect_format_ambiguous_names_both_formats():
    with pytest.raises(
        ValueError, match=r"ambiguous.*completion, messages, prompt.*messages and prompt_completion"
    ):
        detect_format(["messages", "prompt", "completion"], "x.jsonl")


def test_prompt_completion_becomes_user_assistant():
    row = {"prompt": "What is 2+2?", "completion": "The answer is 4."}
    assert to_messages(row, "prompt_completion") == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "The answer is 4."},
    ]


@pytest.mark.parametrize(
    ("extra", "user"),
    [
        ({"input": "2 and 2"}, "Add the numbers.\n\n2 and 2"),
        ({"input": ""}, "Add the numbers."),
        ({}, "Add the numbers."),
    ],
)
def test_alpaca_joins_instruction_and_nonempty_input(extra, user):
    row = {"instruction": "Add the numbers.", "output": "The answer is 4.", **extra}
    assert to_messages(row, "alpaca") == [
        {"role": "user", "content": user},
        {"role": "assistant", "content": "The answer is 4."},
    ]


def test_system_prompt_only_added_when_row_has_none():
    own = {
        "messages": [
            {"role": "system", "content": "Own."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    assert [m["content"] for m in to_messages(own, "messages", system_prompt="Default.")] == [
        "Own.",
        "Hi",
        "Hello",
    ]
    plain = {"prompt": "Hi", "completion": "Hello"}
    assert to_messages(plain, "prompt_completion", system_prompt="Default.")[0] == {
        "role": "system",
        "content": "Default.",
    }


def test_extra_message_keys_are_dropped():
    row = {
        "messages": [{"role": "user", "content": "Hi", "name": "x"}, {"role": "assistant", "content": "Yo"}]
    }
    assert to_messages(row, "messages")[0] == {"role": "user", "content": "Hi"}


@pytest.mark.parametrize(
    ("row", "fmt", "field", "reason"),
    [
        ({"prompt": "x"}, "prompt_completion", "completion", "missing field 'completion'"),
        ({"prompt": 3, "completion": "y"}, "prompt_completion", "prompt", "expected a string, got int"),
        ({"instruction": "x", "output": "  "}, "alpaca", "output", "empty or whitespace"),
        ({"instruction": "x", "input": 7, "output": "y"}, "alpaca", "input", "expected a string or null"),
        ({"messages": "hi"}, "messages", "messages", "expected a list"),
        ({"messages": []}, "messages", "messages", "empty"),
        ({"messages": ["hi"]}, "messages", "messages[0]", "expected an object"),
        ({"messages": [{"content": "hi"}]}, "messages", "messages[0].role", "missing field 'role'"),
        ({"messages": [{"role": "user", "content": None}]}, "messages", "messages[0].content", "got null"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "messages", "no assistant turn"),
        ([1, 2], "messages", None, "expected a JSON object, got list"),
    ],
)
def test_invalid_rows_raise_row_error_with_field(row, fmt, field, reason):
    with pytest.raises(RowError) as info:
        to_messages(row, fmt)
    assert info.value.field == field
    assert reason in info.value.reason
