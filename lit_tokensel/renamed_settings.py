"""Settings renamed between releases: an old name fails naming the new one, a checkpoint's old names migrate.

A method lists its renames in the class attribute `renamed_settings` (`{"rho": "ratio"}`); subclasses
inherit them. Given to the constructor (Python, or a config through the CLI) an old name is an error
that says what to write instead; stored in a checkpoint's hyper-parameters it is mapped to the new name
(`migrate_hparams`) where lit_tokensel builds a module from a checkpoint (`export`, `inspect`, `fit
--ckpt_path`), so runs saved before the rename still load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def renamed_settings(cls: type) -> dict[str, str]:
    """Old name -> new name of `cls`'s renamed settings (empty for a class without renames)."""
    return dict(getattr(cls, "renamed_settings", None) or {})


def renamed_message(cls: type, old: str) -> str | None:
    """The message for an old setting name given to `cls`, or None when `old` is not a renamed setting."""
    new = renamed_settings(cls).get(old)
    if new is None:
        return None
    return (
        f"{cls.__name__}: `{old}` was renamed to `{new}`: write --model.init_args.{new} on the command "
        f"line, `{new}:` under `init_args` in a config"
    )


def refuse_renamed(cls: type, kwargs: Mapping[str, Any]) -> None:
    """Raise a `TypeError` naming the new setting when `kwargs` uses an old one of `cls`."""
    for name in kwargs:
        message = renamed_message(cls, name)
        if message is not None:
            raise TypeError(message)


def migrate_hparams(cls: type, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyper-parameters with `cls`'s old setting names replaced by the new ones.

    A checkpoint holding both an old and its new name is contradictory and refused.
    """
    renames = renamed_settings(cls)
    migrated: dict[str, Any] = {}
    for name, value in hparams.items():
        new = renames.get(name, name)
        if new != name and new in hparams:
            raise ValueError(
                f"{cls.__name__} checkpoint: hyper-parameters hold both `{name}` and `{new}` "
                f"(`{name}` was renamed to `{new}`)"
            )
        migrated[new] = value
    return migrated
