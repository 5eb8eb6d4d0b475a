"""How the CLI reports: one line per error (exit 2), the traceback only on request; the known noise muted."""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

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

NOISE_LOGS = ("💡 Tip: For seamless cloud",)
"""Starts of Lightning's log lines that advertise other products."""

DEBUG_HINT = "(traceback: add --debug or set LIT_TOKENSEL_DEBUG=1)"


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISE_LOGS)


@contextmanager
def quiet_known_warnings() -> Iterator[None]:
    """Mute the `NOISE` warnings and `NOISE_LOGS` lines (and only those) for the duration."""
    loggers = [logging.getLogger(f"lightning.{part}.utilities.rank_zero") for part in ("pytorch", "fabric")]
    drop = _DropNoise()
    for logger in loggers:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for message in NOISE:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def suggest(word: str, choices: list[str]) -> str:
    """` Did you mean X?` for the closest of `choices`, or an empty string."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" Did you mean {close[0]}?" if close else ""


def init_parameters(class_path: str) -> list[str]:
    """Names of the `__init__` parameters of `class_path` and its bases (empty when it does not import)."""
    import inspect

    cls = import_class(class_path)
    if cls is None:
        return []
    return [
        p.name
        for klass in cls.__mro__
        if "__init__" in vars(klass)
        for p in inspect.signature(klass.__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]


def import_class(class_path: str) -> type | None:
    """The class at `class_path`, or None when it does not import."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def renamed_hint(class_path: str, option: str) -> str | None:
    """The rename message when `option` (`--a.b.rho`) is an old setting name of `class_path`'s class."""
    from lit_tokensel.renamed_settings import renamed_message

    cls = import_class(class_path)
    return renamed_message(cls, option.lstrip("-").rsplit(".", 1)[-1]) if cls is not None else None


def known_classes() -> list[str]:
    """Import paths of the classes a config may name: every method and every reference."""
    import lit_tokensel
    from lit_tokensel import reference

    methods = [f"lit_tokensel.{name}" for name in lit_tokensel.__all__ if name != "SFTDataModule"]
    references = [
        f"lit_tokensel.reference.{name}"
        for name in reference.__all__
        if name[0].isupper() and name != "ReferenceModel"
    ]
    return methods + references


class RaisesWithOptions:
    """Parser mixin: errors are raised (no usage dump, no exit) with the parser's option names attached,
    so that the CLI reports them on one line with a "did you mean". Needs `exit_on_error=False`."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        try:
            super().error(message, ex)  # type: ignore[misc]
        except argparse.ArgumentError as error:
            error.known_options = option_names(self)  # type: ignore[attr-defined, arg-type]
            raise
        raise argparse.ArgumentError(None, message)  # a parser that exits on error: raise all the same


def option_names(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of `parser` and of its subcommands' parsers."""
    names: list[str] = []
    for action in parser._actions:
        names += action.option_strings
        for sub in getattr(action, "_name_parser_map", {}).values():
            names += option_names(sub)
    return names


def describe(error: BaseException, command: str) -> str:
    """An error on one line: an unknown option or class with the closest known one; for a setting
    jsonargparse refused, the setting and the reasons it gives; else the message itself."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    text, inner, everything = str(error), chain[-1], "\n".join(map(str, chain))
    not_accepted = re.match(r"Option '([^']+)' is not accepted", str(inner))
    if str(inner).lower().startswith("unrecognized arguments") or not_accepted:
        known = getattr(inner, "known_options", [])
        key = re.search(r'Parser key "([^"]+)"', text)
        owner = re.search(r"class_path '([^']+)'", text)
        if not known and owner:
            known = [f"--{name}" for name in init_parameters(owner.group(1))]
        prefix = f"--{key.group(1)}.init_args." if inner is not error and key else "--"
        unknown = (
            [f"--{not_accepted.group(1)}"]
            if not_accepted
            else [w.split("=")[0] for w in str(inner).split(":", 1)[1].split() if w.startswith("-")]
        )
        renamed = [renamed_hint(owner.group(1), w) for w in unknown] if owner else []
        if any(renamed):
            return "; ".join(m for m in renamed if m) + "."
        if unknown:
            where = f" of {owner.group(1)}" if inner is not error and owner else ""
            found = [
                f"unknown option {prefix}{w.lstrip('-')}{where}."
                f"{suggest(w, known).replace(' Did you mean --', ' Did you mean ' + prefix)}"
                for w in unknown
            ]
            return "; ".join(found) + f" Options: lit-tokensel {command} --help"
    missing = re.findall(
        r"class_path '([^']+)':\s*(?:module '[^']+' has no attribute|No module named)", everything
    )
    missing += re.findall(r"import path string: (\S+)", everything)
    if missing:
        given, classes = missing[-1], known_classes()
        close = difflib.get_close_matches(
            given.rsplit(".", 1)[-1], [c.rsplit(".", 1)[-1] for c in classes], n=1, cutoff=0.6
        )
        hint = f" Did you mean {next(c for c in classes if c.endswith('.' + close[0]))}?" if close else ""
        return f"unknown class {given}.{hint} Known: {', '.join(c.rsplit('.', 1)[-1] for c in classes)}"
    nested = nested_setting(chain)
    if nested:
        return nested
    key = re.search(r'Parser key "([^"]+)":', text)
    reasons = [
        re.sub(r"Problem with given class_path '([^']+)':", r"\1:", line.strip()[2:])
        for line in text.splitlines()
        if line.strip().startswith("- ") and "NoneType" not in line
    ]
    if key or reasons:
        where = f"--{key.group(1)}: " if key else ""
        detail = "; ".join(reasons) if reasons else text[key.end() :] if key else text
        return where + one_line(detail)
    return one_line(error)


def nested_setting(chain: list[BaseException]) -> str | None:
    """`--model.init_args.history.init_args.mode: <reason>` for a value refused inside a class's init_args
    (jsonargparse nests it in one error per level), or None when the error is not nested."""
    keys: list[str] = []
    for error in chain:
        key = re.match(r'Parser key "([^"]+)":', str(error))
        if key and (not keys or keys[-1] != key.group(1)):
            keys.append(key.group(1))
    if len(keys) < 2:
        return None
    return f"--{'.init_args.'.join(keys)}: {one_line(chain[-1])}"


def one_line(error: BaseException | str) -> str:
    """A message with its whitespace folded onto one line, prefixed by the type unless it is generic."""
    text = re.sub(r"\s+", " ", str(error)).strip() or "(no message)"
    name = type(error).__name__
    return (
        text
        if isinstance(error, str) or name in ("ValueError", "RuntimeError", "Exception", "ArgumentError")
        else f"{name}: {text}"
    )


def run_reporting_errors(command: str, run: Callable[[], Any], debug: bool) -> Any:
    """Run `run` quietly; an error prints one line and exits 2 (`debug`: the full traceback instead)."""
    with quiet_known_warnings():
        if debug:
            return run()
        try:
            return run()
        except Exception as error:  # every failure of a command is reported the same way
            message = describe(error, command)
    print(f"lit-tokensel {command}: error: {message} {DEBUG_HINT}", file=sys.stderr)
    raise SystemExit(2)
