"""Row formats: detect which one a file uses and convert every row to chat `messages`.

Supported formats (all end up as a list of `{"role", "content"}` dicts):
- `messages`: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`, multi-turn.
- `prompt_completion`: `{"prompt": str, "completion": str}` -> user, assistant.
- `alpaca`: `{"instruction": str, "input": str (optional), "output": str}` -> user, assistant, with the
  user content `instruction + "\\n\\n" + input` when `input` is non-empty.

Validation is done here in Python, row by row, so every problem is reported with its field name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from lit_tokensel.data.errors import RowError

Format = Literal["messages", "prompt_completion", "alpaca"]
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}
"""The keys whose presence identifies each format in auto-detection."""

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


def detect_format(keys: Iterable[str], source: str) -> Format:
    """Pick the row format from a row's keys (or a table's columns); error if none or several fit."""
    keys = set(keys)
    matches = [fmt for fmt, needed in FORMAT_KEYS.items() if all(k in keys for k in needed)]
    seen = ", ".join(sorted(keys)) or "(none)"
    if len(matches) == 1:
        return matches[0]  # type: ignore[return-value]
    expected = "; ".join(f"{fmt}: {', '.join(needed)}" for fmt, needed in FORMAT_KEYS.items())
    if not matches:
        raise ValueError(
            f"{source}: cannot detect the row format from the keys seen ({seen}). Expected the keys of one "
            f"of the formats ({expected}); rename the columns or pass --data.format (format=... in Python)."
        )
    raise ValueError(
        f"{source}: the row format is ambiguous, the keys seen ({seen}) fit {' and '.join(matches)}. "
        f"Pass --data.format (format=... in Python)."
    )


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require(row: Mapping[str, Any], key: str, prefix: str = "") -> Any:
    if key not in row:
        raise RowError(
            f"{prefix}{key}", f"missing field '{key}' (keys present: {', '.join(map(str, row)) or 'none'})"
        )
    return row[key]


def _require_str(row: Mapping[str, Any], key: str, prefix: str = "") -> str:
    value = _require(row, key, prefix)
    if not isinstance(value, str):
        raise RowError(f"{prefix}{key}", f"expected a string, got {_type_name(value)} {value!r:.60}")
    return value


def _require_response(row: Mapping[str, Any], key: str, prefix: str = "") -> str:
    value = _require_str(row, key, prefix)
    if not value.strip():
        raise RowError(f"{prefix}{key}", "empty or whitespace-only assistant response")
    return value


def _validate_messages(value: Any) -> list[Message]:
    if not isinstance(value, list):
        raise RowError("messages", f"expected a list of {{role, content}} objects, got {_type_name(value)}")
    if not value:
        raise RowError("messages", "the conversation is empty")
    messages: list[Message] = []
    for i, msg in enumerate(value):
        prefix = f"messages[{i}]."
        if not isinstance(msg, Mapping):
            raise RowError(
                f"messages[{i}]", f"expected an object with role and content, got {_type_name(msg)}"
            )
        role = _require_str(msg, "role", prefix)
        if role not in ROLES:
            raise RowError(f"{prefix}role", f"unknown role '{role}' (expected one of {', '.join(ROLES)})")
        content = (
            _require_response(msg, "content", prefix)
            if role == "assistant"
            else _require_str(msg, "content", prefix)
        )
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("messages", "no assistant turn: nothing to train on")
    return messages


def to_messages(row: Any, fmt: Format, system_prompt: str | None = None) -> list[Message]:
    """Validate one row of format `fmt` and return it as chat messages; raise `RowError` if invalid.

    `system_prompt`, when given, is prepended as a system message to rows that have none.
    """
    if not isinstance(row, Mapping):
        raise RowError(None, f"expected a JSON object, got {_type_name(row)}")
    if fmt == "messages":
        messages = _validate_messages(_require(row, "messages"))
    elif fmt == "prompt_completion":
        prompt = _require_str(row, "prompt")
        completion = _require_response(row, "completion")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    elif fmt == "alpaca":
        instruction = _require_str(row, "instruction")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise RowError("input", f"expected a string or null, got {_type_name(extra)} {extra!r:.60}")
        output = _require_response(row, "output")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        if not user.strip():
            raise RowError("instruction", "the instruction is empty")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMAT_KEYS)}")
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages
