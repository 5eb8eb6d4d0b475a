"""Per-token loss weights given by the data: a `weight` per assistant message and character spans in it.

Format (the `messages` row format only; both keys optional, on assistant messages only):

    {"role": "assistant", "content": "The answer is 42.", "weight": 0.5, "weights": [[14, 16, 2.0]]}

- `weight`: a number >= 0 for the whole turn: its content and the end-of-turn tokens the chat template
  adds after it. `0` excludes the turn from training (as axolotl's per-message `weight: 0`).
- `weights`: `[start, end, w]` triples, `0 <= start < end <= len(content)` character offsets into
  `content` (Python string indices, end exclusive), `w` a number >= 0, spans not overlapping.

The token rule: a character's weight is the message's `weight` times the weight of the span that holds it
(1 outside every span). A token takes the *smallest* weight of the content characters it covers, so a
token that straddles a span edge gets the lower of the two sides: a `0` span excludes every token that
touches it. The turn's end-of-turn tokens (after the content) take the message `weight`. Tokens outside
weighted messages weigh 1. The method multiplies these into its own per-token weights; a token of weight
0 leaves the objective and its counts (see `lit_tokensel.methods.base`).

Weights are read in a separate pass over the source rows (only rows with weights are tokenized again,
with character offsets), so the cached tokenization stays as it is; the pass checks that its tokens are
those of the dataset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lit_tokensel.data.errors import InvalidRowError, RowError
from lit_tokensel.data.formats import to_messages
from lit_tokensel.data.sources import Source, iter_rows

WEIGHT_KEY = "weight"
SPANS_KEY = "weights"


@dataclass(frozen=True)
class MessageWeights:
    """One assistant message's weights: the turn's `weight` and `(start, end, w)` character spans."""

    weight: float = 1.0
    spans: tuple[tuple[int, int, float], ...] = ()


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(field, f"expected a number >= 0, got {type(value).__name__} {value!r:.40}")
    if not math.isfinite(value) or value < 0:
        raise RowError(field, f"expected a finite number >= 0, got {value!r}")
    return float(value)


def _spans(value: Any, content: str, prefix: str) -> tuple[tuple[int, int, float], ...]:
    if not isinstance(value, list):
        raise RowError(prefix, f"expected a list of [start, end, weight] triples, got {type(value).__name__}")
    spans = []
    for j, span in enumerate(value):
        field = f"{prefix}[{j}]"
        if not isinstance(span, list) or len(span) != 3:
            raise RowError(field, f"expected [start, end, weight], got {span!r:.60}")
        start, end, weight = span
        for name, offset in (("start", start), ("end", end)):
            if isinstance(offset, bool) or not isinstance(offset, int):
                raise RowError(field, f"{name} must be an integer character offset, got {offset!r}")
        if not 0 <= start < end <= len(content):
            raise RowError(
                field,
                f"[{start}, {end}) is not a non-empty character range inside the content "
                f"(0 <= start < end <= {len(content)})",
            )
        spans.append((start, end, _number(weight, field), j))
    ordered = sorted(spans)
    for (s0, e0, _, j0), (s1, e1, _, j1) in zip(ordered, ordered[1:]):
        if s1 < e0:
            raise RowError(
                f"{prefix}[{max(j0, j1)}]",
                f"[{s1}, {e1}) overlaps {prefix}[{min(j0, j1)}] [{s0}, {e0}); spans must not overlap",
            )
    return tuple((s, e, w) for s, e, w, _ in spans)


def parse_row_weights(row: Any) -> dict[int, MessageWeights] | None:
    """The weights of a raw `messages` row by message index, or None when it has none; `RowError` if invalid."""
    if not isinstance(row, Mapping) or not isinstance(row.get("messages"), list):
        return None
    out: dict[int, MessageWeights] = {}
    for i, message in enumerate(row["messages"]):
        if not isinstance(message, Mapping) or (WEIGHT_KEY not in message and SPANS_KEY not in message):
            continue
        prefix = f"messages[{i}]."
        if message.get("role") != "assistant":
            key = WEIGHT_KEY if WEIGHT_KEY in message else SPANS_KEY
            raise RowError(
                f"{prefix}{key}",
                f"only assistant messages are trained, so only they take weights "
                f"(this one is {message.get('role')!r})",
            )
        content = message.get("content")
        if not isinstance(content, str):
            continue  # the row validator reports it
        weight = _number(message[WEIGHT_KEY], f"{prefix}{WEIGHT_KEY}") if WEIGHT_KEY in message else 1.0
        spans = _spans(message[SPANS_KEY], content, f"{prefix}{SPANS_KEY}") if SPANS_KEY in message else ()
        out[i] = MessageWeights(weight, spans)
    return out or None


def conversation_token_weights(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    weights: Mapping[int, MessageWeights],
    input_ids: Sequence[int],
    labels: Sequence[int],
) -> list[float]:
    """Each token's data weight, aligned with `input_ids` (the dataset's, possibly truncated), by the module's rule.

    `weights` is keyed by index into `messages` (the validated conversation). Raises `RowError` when the
    conversation's tokens cannot be matched to its characters.
    """
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"][: len(input_ids)]) != list(input_ids):
        raise RowError(
            "messages",
            "tokenizing the rendered conversation does not give the dataset's tokens, so "
            "character weights cannot be placed on tokens",
        )
    offsets = enc["offset_mapping"][: len(input_ids)]
    result = [1.0] * len(input_ids)
    for i, spec in sorted(weights.items()):
        start = _content_start(tokenizer, messages, i, text)
        end = start + len(messages[i]["content"])
        last = None
        for t, (s, e) in enumerate(offsets):
            lo, hi = max(s, start), min(e, end)
            if s == e and start <= s < end:  # a zero-width token inside the content
                lo, hi = s, s + 1
            if lo >= hi:
                continue
            result[t] = spec.weight * min(_span_weight(spec.spans, c - start) for c in range(lo, hi))
            last = t
        # the end-of-turn tokens: the labelled run right after the content
        t = (last + 1) if last is not None else len(offsets)
        while t < len(offsets) and labels[t] != -100 and offsets[t][0] >= end:
            result[t] = spec.weight
            t += 1
    return result


def _content_start(tokenizer: Any, messages: Sequence[Mapping[str, str]], i: int, text: str) -> int:
    """Where message `i`'s content starts in the rendered conversation `text`: right after the render of the
    messages before it plus the generation prompt (the assistant header)."""
    content = messages[i]["content"]
    if i > 0:
        before = tokenizer.apply_chat_template(list(messages[:i]), tokenize=False, add_generation_prompt=True)
        if text.startswith(before) and (start := text.find(content, len(before))) >= 0:
            return start
    raise RowError(
        f"messages[{i}].content",
        "the chat template changes this message's text (or renders it out of "
        "order), so its weights cannot be located in the rendered conversation",
    )


def _span_weight(spans: Sequence[tuple[int, int, float]], char: int) -> float:
    for start, end, weight in spans:
        if start <= char < end:
            return weight
    return 1.0


def collect_token_weights(
    source: Source,
    fmt: str,
    system_prompt: str | None,
    tokenizer: Any,
    dataset: Any,
) -> dict[int, list[float]]:
    """`sample_id -> per-token weights` for the samples of `dataset` whose source rows carry weights.

    `dataset` has `sample_id`, `input_ids` and `labels` columns (the tokenized split). Bad weights raise
    `InvalidRowError` naming the file, the row and the field.
    """
    if fmt != "messages":
        return {}
    positions: dict[int, int] | None = None
    out: dict[int, list[float]] = {}
    for row in iter_rows(source):
        if row.error is not None:
            continue
        try:
            weights = parse_row_weights(row.value)
        except RowError as e:
            raise InvalidRowError(source.display, row.index, e.field, e.reason, row.value) from None
        if weights is None:
            continue
        if positions is None:
            positions = {int(s): p for p, s in enumerate(dataset["sample_id"])}
        if row.index not in positions:
            continue  # an invalid or dropped row: not trained
        try:
            messages = to_messages(row.value, "messages", system_prompt)
        except RowError:
            continue
        shift = len(messages) - len(row.value["messages"])  # a system prompt inserted in front
        sample = dataset[positions[row.index]]
        try:
            out[row.index] = conversation_token_weights(
                tokenizer,
                messages,
                {i + shift: w for i, w in weights.items()},
                sample["input_ids"],
                sample["labels"],
            )
        except RowError as e:
            raise InvalidRowError(source.display, row.index, e.field, e.reason, row.value) from None
    return out
