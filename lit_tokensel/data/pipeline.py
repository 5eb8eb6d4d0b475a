"""Source rows -> validated chat messages -> tokens and labels, as cached on-disk `datasets.Dataset`s.

Two cached stages, each under a fingerprint computed here (so reruns are deterministic and cheap):
1. `load_normalized`: every row of the source, validated and converted to `messages`
   (`Dataset.from_generator`, keyed by the file's content hash or the hub dataset's fingerprint, the
   format and the system prompt). Invalid rows stay in, with `error_field`/`error_reason`/`raw` set.
2. `tokenize_source`: `Dataset.map` of (1) to `input_ids`/`labels`, keyed by (1)'s fingerprint, the
   tokenizer (vocab and chat template), `max_length`, `train_on`, format and system prompt.

Keeping every row (invalid and dropped ones too) in the cached tables means the counts and the
rejects are recomputed from the cache on a rerun, and row position == `sample_id`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import datasets
import torch
from jinja2 import TemplateError

from lit_tokensel.data.errors import InvalidRowError, RowError
from lit_tokensel.data.formats import Format, detect_format, to_messages
from lit_tokensel.data.sources import Source, file_hash, first_keys, iter_rows, load_hub_split, local_path
from lit_tokensel.data.tokenization import TrainOn, tokenize_conversation, tokenizer_fingerprint

PIPELINE_VERSION = "2"  # 2: trailing_turns column
"""Bump when the normalization or tokenization code changes what it produces, to invalidate caches."""

NORMALIZED_FEATURES = datasets.Features(
    {
        "sample_id": datasets.Value("int64"),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "error_field": datasets.Value("string"),
        "error_reason": datasets.Value("string"),
        "raw": datasets.Value("string"),
    }
)
TOKENIZED_FEATURES = datasets.Features(
    {
        "sample_id": datasets.Value("int64"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "num_tokens": datasets.Value("int32"),
        "num_label_tokens": datasets.Value("int32"),
        "truncated": datasets.Value("bool"),
        "trailing_turns": datasets.Value("int32"),
        "error_field": datasets.Value("string"),
        "error_reason": datasets.Value("string"),
        "raw": datasets.Value("string"),
    }
)
MODEL_COLUMNS = ["input_ids", "labels", "sample_id"]


def fingerprint_of(*parts: Any) -> str:
    """A short deterministic hash of JSON-serializable parts (datasets wants <= 64 chars)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:32]


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


@dataclass
class SplitStats:
    """Row counts of one split: what was read, rejected as invalid, dropped, truncated, and kept.

    `dropped_no_response`: valid rows with no labeled token left after truncation (never trained on).
    `truncated`: valid rows longer than `max_length` (kept or dropped).
    `trailing_turn`: valid rows that end in turns after the last assistant turn (never trained on).
    """

    rows_read: int = 0
    rejected: int = 0
    dropped_no_response: int = 0
    truncated: int = 0
    trailing_turn: int = 0
    samples: int = 0
    tokens: int = 0
    label_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _normalize_rows(
    path: str | None,
    dataset_name: str | None,
    dataset_config: str | None,
    split: str | None,
    cache_dir: str | None,
    fmt: Format,
    system_prompt: str | None,
    fingerprint: str,  # only to key the generator's cache
) -> Iterator[dict[str, Any]]:
    """Generator for `Dataset.from_generator`: one record per source row, valid or not."""
    source = Source(path, dataset_name, dataset_config, split, cache_dir)
    for row in iter_rows(source):
        record: dict[str, Any] = {
            "sample_id": row.index,
            "messages": None,
            "error_field": None,
            "error_reason": None,
            "raw": None,
        }
        if row.error is not None:
            record.update(error_reason=row.error, raw=_dump(row.value))
        else:
            try:
                record["messages"] = to_messages(row.value, fmt, system_prompt)
            except RowError as e:
                record.update(error_field=e.field, error_reason=e.reason, raw=_dump(row.value))
        yield record


def resolve_format(source: Source, fmt: str) -> Format:
    """`fmt` itself, or the format detected from the source's keys when `fmt == "auto"`."""
    return detect_format(first_keys(source), source.display) if fmt == "auto" else fmt  # type: ignore[return-value]


def source_content_id(source: Source) -> list[str]:
    """What a source's rows are, independent of where they live: the file's bytes, or the hub split's
    fingerprint. Computed once per setup (hashing a large file is not free) and reused by every
    fingerprint built on the data."""
    if source.path is not None:  # the content, not the path: an edited file is read again
        path = local_path(source.path)
        return ["file", path.suffix, file_hash(path)]
    return ["hub", source.display, load_hub_split(source)._fingerprint]


def load_normalized(
    source: Source, content_id: list[str], fmt: Format, system_prompt: str | None, cache_dir: str | None
) -> datasets.Dataset:
    """Every row of `source` as validated `messages` (or an error), cached on disk under a fingerprint."""
    fp = fingerprint_of("normalized", PIPELINE_VERSION, content_id, fmt, system_prompt)
    return datasets.Dataset.from_generator(
        _normalize_rows,
        features=NORMALIZED_FEATURES,
        cache_dir=cache_dir,
        gen_kwargs={**source.as_kwargs(), "fmt": fmt, "system_prompt": system_prompt, "fingerprint": fp},
        fingerprint=fp,
    )


def trailing_turns(messages: list[dict[str, str]]) -> int:
    """Turns after the conversation's last assistant turn (a user turn left unanswered): nothing trains on them."""
    roles = [m["role"] for m in messages]
    return roles[::-1].index("assistant") if "assistant" in roles else 0


def _tokenize_batch(
    batch: dict[str, list], tokenizer: Any, max_length: int, train_on: TrainOn
) -> dict[str, list]:
    """`Dataset.map` function: tokenize and label each valid row; template failures become row errors."""
    out: dict[str, list] = {k: [] for k in TOKENIZED_FEATURES if k != "sample_id"}
    rows = zip(batch["messages"], batch["error_field"], batch["error_reason"], batch["raw"], strict=True)
    for messages, field, reason, raw in rows:
        ids: list[int] = []
        labels: list[int] = []
        num_tokens = num_label_tokens = 0
        truncated = False
        if reason is None:
            try:
                t = tokenize_conversation(tokenizer, messages, max_length, train_on)
            except RowError as e:
                field, reason = e.field, e.reason
            except TemplateError as e:
                field, reason = "messages", f"the chat template failed on this conversation: {e}"
            else:
                ids, labels, num_tokens, truncated = t.input_ids, t.labels, t.num_tokens, t.truncated
                num_label_tokens = t.num_label_tokens
            if reason is not None:
                raw = _dump({"messages": messages})
        record = dict(
            input_ids=ids,
            labels=labels,
            num_tokens=num_tokens,
            num_label_tokens=num_label_tokens,
            truncated=truncated,
            trailing_turns=trailing_turns(messages) if reason is None else 0,
            error_field=field,
            error_reason=reason,
            raw=raw,
        )
        for key, value in record.items():
            out[key].append(value)
    return out


@dataclass
class TokenizedSource:
    """All rows of one source, tokenized; row position == `sample_id`. Splits are selections of it."""

    source: Source
    content_id: list[str]  # `source_content_id(source)`
    format: Format
    dataset: datasets.Dataset
    max_length: int
    columns: dict[str, list]  # per-row sample_id, num_tokens, num_label_tokens, truncated, error_*
    setting: str | None = None  # the option naming the source in errors, e.g. `--data.train_file`

    def __len__(self) -> int:
        return len(self.dataset)

    def invalid_rows(self, positions: Iterable[int] | None = None) -> list[int]:
        """Positions (== sample ids) of invalid rows, in order, optionally among `positions`."""
        reasons = self.columns["error_reason"]
        rows = range(len(reasons)) if positions is None else sorted(positions)
        return [i for i in rows if reasons[i] is not None]

    def row_error(self, position: int, total_invalid: int = 1) -> InvalidRowError:
        """The `InvalidRowError` for an invalid row."""
        raw = self.dataset[position]["raw"]
        return InvalidRowError(
            self.source.display,
            position,
            self.columns["error_field"][position],
            self.columns["error_reason"][position],
            json.loads(raw) if raw is not None else None,
            total_invalid,
            self.setting,
        )

    def reject_records(self, positions: Iterable[int], split: str) -> Iterator[dict[str, Any]]:
        """JSON-ready records of invalid rows: split, source, row, field, reason and the raw row."""
        for error in (self.row_error(p) for p in positions):
            yield {
                "split": split,
                "source": error.source,
                "row": error.row,
                "field": error.field,
                "reason": error.reason,
                "raw": error.raw,
            }

    def select(self, positions: Iterable[int], name: str) -> tuple[datasets.Dataset, SplitStats]:
        """The trainable rows among `positions` (model columns only) and the split's counts."""
        positions = sorted(positions)
        cols, stats, kept = self.columns, SplitStats(rows_read=len(positions)), []
        for p in positions:
            if cols["error_reason"][p] is not None:
                stats.rejected += 1
                continue
            stats.truncated += bool(cols["truncated"][p])
            stats.trailing_turn += cols["trailing_turns"][p] > 0
            if cols["num_label_tokens"][p] == 0:
                stats.dropped_no_response += 1
                continue
            kept.append(p)
            stats.tokens += min(cols["num_tokens"][p], self.max_length)
            stats.label_tokens += cols["num_label_tokens"][p]
        stats.samples = len(kept)
        fp = fingerprint_of(self.dataset._fingerprint, name, kept)
        selected = self.dataset.select(kept, new_fingerprint=fp)
        return selected.select_columns(MODEL_COLUMNS, new_fingerprint=fingerprint_of(fp, "columns")), stats


def tokenize_source(
    source: Source,
    fmt: str,
    tokenizer: Any,
    *,
    max_length: int,
    train_on: TrainOn,
    system_prompt: str | None,
    cache_dir: str | None,
    name: str = "train",
    fail_on_invalid: bool = True,
    setting: str | None = None,
) -> TokenizedSource:
    """Read, validate, tokenize and label every row of `source`, reusing the on-disk cache when it matches.

    With `fail_on_invalid`, the first invalid row raises `InvalidRowError` (before tokenizing, when it
    is a data error; after, when the chat template fails on it), naming `setting` (e.g. `--data.train_file`). Otherwise invalid rows stay in the
    result, marked, for the caller to count and log.
    """
    resolved = resolve_format(source, fmt)
    content_id = source_content_id(source)
    normalized = load_normalized(source, content_id, resolved, system_prompt, cache_dir)
    if fail_on_invalid:
        reasons = normalized.select_columns(["error_reason"]).to_dict()["error_reason"]
        invalid = [i for i, reason in enumerate(reasons) if reason is not None]
        if invalid:
            row = normalized[invalid[0]]
            raise InvalidRowError(
                source.display,
                invalid[0],
                row["error_field"],
                row["error_reason"],
                json.loads(row["raw"]),
                len(invalid),
                setting,
            )
    fp = fingerprint_of(
        "tokenized",
        PIPELINE_VERSION,
        normalized._fingerprint,
        tokenizer_fingerprint(tokenizer),
        max_length,
        train_on,
        resolved,
        system_prompt,
    )
    tokenized = normalized.map(
        _tokenize_batch,
        batched=True,
        batch_size=256,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "train_on": train_on},
        remove_columns=["messages"],
        features=TOKENIZED_FEATURES,
        new_fingerprint=fp,
        desc=f"Tokenizing {name} ({source.display})",
    )
    stat_columns = [
        "sample_id",
        "num_tokens",
        "num_label_tokens",
        "truncated",
        "trailing_turns",
        "error_field",
        "error_reason",
    ]
    columns = tokenized.select_columns(stat_columns, new_fingerprint=fingerprint_of(fp, "stats")).to_dict()
    result = TokenizedSource(source, content_id, resolved, tokenized, max_length, columns, setting)
    if fail_on_invalid and (invalid := result.invalid_rows()):
        raise result.row_error(invalid[0], len(invalid))
    return result


def holdout_split(num_rows: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Sorted `(train, val)` row positions: a seeded random `fraction` of the rows (at least one) is held out.

    Depends only on `(num_rows, fraction, seed)`, not on the tokenizer or `max_length`, so the same rows
    are held out whatever is later dropped.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    num_val = max(1, round(num_rows * fraction))
    if num_val >= num_rows:
        raise ValueError(f"val_fraction={fraction} of {num_rows} rows leaves no training rows")
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[num_val:]), sorted(perm[:num_val])
