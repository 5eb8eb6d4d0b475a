"""Chat rendering and assistant-only labels, taken from the chat template (never from token-id search).

Two ways to find the assistant tokens, which agree on templates that support both:
- templates with `{% generation %}` tags: `apply_chat_template(..., return_assistant_tokens_mask=True)`;
- any prefix-stable template (e.g. SmolLM2's): each assistant turn's character span is found by
  rendering the conversation prefix by prefix (`render(messages[:k], add_generation_prompt=True)` to
  `render(messages[:k + 1])`, trailing whitespace after the end-of-turn token stripped), and the tokens
  of the full render that overlap a span (from the tokenizer's offset mapping) are labeled.

A token is labeled when it overlaps a span; this is what `char_to_token` does in transformers'
generation-tag path, so a token that straddles a span boundary is treated alike by both.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lit_tokensel.data.errors import RowError
from lit_tokensel.data.templates import CHATML_TEMPLATE, has_generation_tags

IGNORE_INDEX = -100
TrainOn = Literal["all_turns", "last_turn"]
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


class TemplateNotPrefixStableError(ValueError):
    """The chat template renders a conversation prefix differently from the start of the full conversation."""


@dataclass(frozen=True)
class TokenizedConversation:
    """One conversation as model inputs: `labels` is `input_ids` with -100 on every untrained token."""

    input_ids: list[int]
    labels: list[int]
    num_tokens: int  # length before truncation
    truncated: bool

    @property
    def num_label_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def current_chat_template(tokenizer: Any) -> str | None:
    """The tokenizer's chat template as a string (the `default` one when it holds several)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def _is_single_token(tokenizer: Any, token: str) -> bool:
    return len(tokenizer.encode(token, add_special_tokens=False)) == 1


def ensure_chat_template(tokenizer: Any, chat_template: str | None = None, override: bool = False) -> str:
    """Give `tokenizer` a chat template in place, when it has none or when `override`; return the one in use.

    Modifies the tokenizer object itself, so a model exported with that tokenizer carries the template
    it was trained with. The fallback (`chat_template`, default ChatML) must only use special tokens
    the tokenizer has: ChatML's `<|im_start|>`/`<|im_end|>` are checked to encode as single tokens.
    """
    existing = current_chat_template(tokenizer)
    if existing is not None and not override:
        return existing
    template = chat_template if chat_template is not None else CHATML_TEMPLATE
    missing = [tok for tok in CHATML_TOKENS if tok in template and not _is_single_token(tokenizer, tok)]
    if missing:
        which = "the default ChatML template" if chat_template is None else "the given chat_template"
        raise ValueError(
            f"{which} uses {', '.join(missing)}, which the tokenizer ({type(tokenizer).__name__}, "
            f"{len(tokenizer)} tokens) does not have as single tokens. Pass --data.chat_template with a template "
            f"that fits this tokenizer's special tokens (or add these tokens to the tokenizer and resize the "
            f"model's embeddings)."
        )
    tokenizer.chat_template = template
    return template


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything about the tokenizer that changes the tokens: vocab, merges, specials, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", True):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast (Rust `tokenizers`) tokenizer; assistant-token labels "
            f"need its offset mapping. Load the tokenizer with use_fast=True."
        )
    digest = hashlib.sha256(backend.to_str().encode("utf-8"))
    template = tokenizer.chat_template
    extras = {
        "class": type(tokenizer).__name__,
        "chat_template": template
        if isinstance(template, (str, type(None)))
        else json.dumps(template, sort_keys=True),
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
    }
    digest.update(json.dumps(extras, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_char_spans(
    tokenizer: Any, messages: Sequence[dict[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and each assistant turn's `[start, end)` character span in it.

    A span covers the turn's content and its end-of-turn token, without the whitespace after it.
    Raises `TemplateNotPrefixStableError` when a prefix render is not a prefix of the full render.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if k == 0:
            raise RowError(
                "messages[0].role",
                "the conversation starts with an assistant turn, which a chat template without {% generation %} "
                "tags cannot locate (there is no prefix to render); start with a user or system message",
            )
        before = _render(tokenizer, messages[:k], add_generation_prompt=True)
        through = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        for name, prefix in (("messages[:k] + generation prompt", before), ("messages[:k+1]", through)):
            if not full.startswith(prefix):
                raise TemplateNotPrefixStableError(
                    f"the chat template is not prefix-stable: rendering {name} (k={k}) does not give a prefix of "
                    f"the full conversation, so assistant turns cannot be located by rendering prefixes. Use a "
                    f"template with {{% generation %}} tags, or pass --data.chat_template with a prefix-stable one."
                )
        start, end = len(before), len(through)
        while end > start and full[end - 1].isspace():
            end -= 1
        if end > start:
            spans.append((start, end))
    return full, spans


def _mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose `[s, e)` character range overlaps a span (zero-width tokens: starts inside)."""
    mask = []
    for s, e in offsets:
        if s == e:
            hit = any(a <= s < b for a, b in spans)
        else:
            hit = any(s < b and e > a for a, b in spans)
        mask.append(int(hit))
    return mask


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """`[start, end)` token ranges of consecutive 1s."""
    runs, start = [], None
    for i, m in enumerate(mask):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(mask)))
    return runs


def assistant_token_mask(
    tokenizer: Any, messages: Sequence[dict[str, str]], train_on: TrainOn = "all_turns"
) -> tuple[list[int], list[int]]:
    """`(input_ids, mask)` of the rendered conversation; mask is 1 on the assistant tokens to train on.

    Uses the template's `{% generation %}` tags when it has them, else prefix rendering. With
    `train_on="last_turn"` only the last assistant turn is kept.
    """
    if train_on not in ("all_turns", "last_turn"):
        raise ValueError(f"train_on must be 'all_turns' or 'last_turn', got {train_on!r}")
    if has_generation_tags(current_chat_template(tokenizer)):
        out = tokenizer.apply_chat_template(
            list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        input_ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if train_on == "last_turn" and (runs := _runs(mask)):
            start, end = runs[-1]
            mask = [int(start <= i < end) for i in range(len(mask))]
        return input_ids, mask
    text, spans = assistant_char_spans(tokenizer, messages)
    if train_on == "last_turn":
        spans = spans[-1:]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), _mask_from_spans(enc["offset_mapping"], spans)


BOUNDARY_TOKENS = 64
"""Tokens' worth of characters kept past what `max_length` tokens can cover, so cutting the text there cannot
change how the kept tokens are split (BPE merges and pre-tokenization are local to a few words)."""

_MAX_TOKEN_CHARS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token of `tokenizer` can cover (its longest vocabulary entry), cached per object."""
    try:
        return _MAX_TOKEN_CHARS[tokenizer]
    except (KeyError, TypeError):
        pass
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    longest = max(longest, *(len(str(t)) for t in tokenizer.all_special_tokens), 1)
    try:
        _MAX_TOKEN_CHARS[tokenizer] = longest
    except TypeError:  # not weak-referenceable: recompute next time
        pass
    return longest


def char_budget(tokenizer: Any, max_length: int) -> int:
    """Characters of message content that always hold the first `max_length` tokens, plus a boundary margin."""
    return (max_length + BOUNDARY_TOKENS) * max_token_chars(tokenizer)


def bound_messages(messages: Sequence[dict[str, str]], budget: int) -> list[dict[str, str]]:
    """The conversation cut to its first `budget` characters of content, so tokenizing it costs bounded memory.

    Rendering puts every content character in the text, in order, so the first `max_length` tokens (at most
    `max_length * max_token_chars` characters) lie inside the first `budget` content characters. The message
    that crosses the budget is cut there and later messages are dropped: templates are prefix-stable (the
    render of `messages[:k]` starts the render of `messages`), so the text before the cut is unchanged.
    A conversation within the budget is returned unchanged (the same objects).
    """
    used = 0
    for k, message in enumerate(messages):
        content = message["content"]
        if used + len(content) > budget:
            cut = {**message, "content": content[: budget - used]}
            return [*messages[:k], cut]
        used += len(content)
    return list(messages)


def tokenize_conversation(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    max_length: int,
    train_on: TrainOn = "all_turns",
) -> TokenizedConversation:
    """Render, tokenize and label one conversation, keeping its first `max_length` tokens (right-truncation).

    Labels are the token ids on assistant tokens (content and end-of-turn token) and -100 elsewhere.
    A result with `num_label_tokens == 0` has nothing left to train on; the pipeline drops and counts it.
    A conversation longer than `char_budget(tokenizer, max_length)` content characters is cut to that
    before rendering (`bound_messages`), so memory and time stay bounded for any row; its `num_tokens` is
    then the length of the cut render (at least `max_length + BOUNDARY_TOKENS`, which is checked: when a
    tokenizer breaks that bound, the whole conversation is tokenized), not of the whole conversation.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    budget = char_budget(tokenizer, max_length)
    bounded = bound_messages(messages, budget)
    input_ids, mask = assistant_token_mask(tokenizer, bounded, train_on)
    if len(input_ids) < max_length + BOUNDARY_TOKENS and sum(len(m["content"]) for m in messages) > budget:
        # Cut, yet fewer tokens than the budget guarantees: this tokenizer's tokens cover more characters than
        # its vocabulary entries (a normalizer that deletes characters). Correctness first: tokenize it all.
        bounded = list(messages)
        input_ids, mask = assistant_token_mask(tokenizer, bounded, train_on)
    if train_on == "last_turn" and any(m["role"] == "assistant" for m in messages[len(bounded) :]):
        mask = [0] * len(mask)  # the last turn starts past the budget, so past the first max_length tokens
    num_tokens = len(input_ids)
    input_ids, mask = input_ids[:max_length], mask[:max_length]
    labels = [tok if m else IGNORE_INDEX for tok, m in zip(input_ids, mask, strict=True)]
    return TokenizedConversation(input_ids, labels, num_tokens, num_tokens > max_length)
