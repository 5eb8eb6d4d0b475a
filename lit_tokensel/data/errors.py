"""Data errors that name the file, the row and the field, so a user can find and fix the bad row."""

from __future__ import annotations

from typing import Any


class RowError(ValueError):
    """A problem with one row, before we know which file and row it came from.

    Raised by the row validators in `formats`; the pipeline adds the source and the row index and
    turns it into an `InvalidRowError` (or a reject record when `on_invalid="skip"`).
    """

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


class InvalidRowError(ValueError):
    """A row of a data file is not a valid SFT example.

    The message reads like `data/train.jsonl row 3, field 'messages[1].role': unknown role 'bot'
    (expected one of system, user, assistant)`. `row` is 0-based and equals the row's `sample_id`.
    """

    def __init__(
        self,
        source: str,
        row: int,
        field: str | None,
        reason: str,
        raw: Any = None,
        total_invalid: int = 1,
    ) -> None:
        self.source = source
        self.row = row
        self.field = field
        self.reason = reason
        self.raw = raw
        self.total_invalid = total_invalid
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.source} row {self.row}"
        if self.field is not None:
            where += f", field '{self.field}'"
        msg = f"{where}: {self.reason}"
        if self.total_invalid > 1:
            msg += f" ({self.total_invalid} invalid rows in this split in total)"
        return (
            msg
            + ". Fix the row, or skip invalid rows (logged to a rejects file) with --data.on_invalid skip "
            "(on_invalid='skip' in Python)."
        )
