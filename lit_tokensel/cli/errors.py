"""How the CLI reports: one line per error (exit 2), the traceback only on request; the known noise muted."""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

NOISE = (
    # Lightning's advice to install tensorboard when no logger is configured.
    r".*Starting from v1\.9\.0, `tensorboardX` has been removed as a dependency",
    # Lightning's own use of a deprecated torch pytree API (lightning/pytorch/utilities/_pytree.py).
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Logging more often than there are batches: harmless on small data sets.
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # Our subcommands hand LightningCLI their remaining arguments on purpose.
    r"LightningCLI's args parameter is intended",
)
"""Third-party warnings that say nothing about the run, filtered by message (never by category)."""


@contextmanager
def quiet_known_warnings() -> Iterator[None]:
    """Mute the `NOISE` warnings (and only those) for the duration."""
    with warnings.catch_warnings():
        for message in NOISE:
            warnings.filterwarnings("ignore", message=message)
        yield


def one_line(error: BaseException) -> str:
    """`error`'s message with its whitespace folded onto one line, prefixed by its type unless it is generic."""
    text = re.sub(r"\s+", " ", str(error)).strip() or "(no message)"
    name = type(error).__name__
    return text if name in ("ValueError", "RuntimeError", "Exception") else f"{name}: {text}"


def run_reporting_errors(command: str, run: Callable[[], Any], debug: bool) -> Any:
    """Run `run` quietly; an error prints one line and exits 2 (`debug`: the full traceback instead)."""
    with quiet_known_warnings():
        if debug:
            return run()
        try:
            return run()
        except Exception as error:  # every failure of a command is reported the same way
            print(f"lit-tokensel {command}: error: {one_line(error)} "
                  f"(traceback: add --debug or set LIT_TOKENSEL_DEBUG=1)", file=sys.stderr)
            raise SystemExit(2) from None
