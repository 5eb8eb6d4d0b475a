"""Choices are `Literal` types; this checks them for Python callers too, from the annotations themselves.

On the command line and in configs jsonargparse refuses a value outside a parameter's `Literal[...]`
before anything is built. A Python caller gets no such check, and a typo such as `on_invalid="skp"`
would silently take another branch. `check_choices(Class.__init__, locals())` at the top of an
`__init__` checks every `Literal`-annotated argument against its annotation: the type is the one
place the choices are written.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal


@functools.cache
def literal_choices(function: Callable[..., Any]) -> dict[str, tuple[Any, ...]]:
    """`{parameter: allowed values}` for `function`'s parameters annotated `Literal[...]` (or `Literal[...] | None`,
    where None is allowed too)."""
    hints = typing.get_type_hints(function)
    choices: dict[str, tuple[Any, ...]] = {}
    for name, hint in hints.items():
        options = (
            typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        )
        literals = [a for o in options if typing.get_origin(o) is Literal for a in typing.get_args(o)]
        if literals and all(typing.get_origin(o) is Literal or o is type(None) for o in options):
            choices[name] = tuple(literals) + ((None,) if type(None) in options else ())
    return choices


def check_choices(function: Callable[..., Any], arguments: Mapping[str, Any]) -> None:
    """Raise a `ValueError` naming the allowed values when an argument is outside its `Literal` annotation."""
    for name, allowed in literal_choices(function).items():
        if name in arguments and arguments[name] not in allowed:
            options = ", ".join(repr(a) for a in allowed)
            raise ValueError(f"{name}={arguments[name]!r}: use one of {options}")
