"""The allow-list of classes a checkpoint may name: this project's methods and references, plus those a user registers.

A checkpoint is data from somewhere else. It names classes (`method_class`, the `class_path` of a
reference in `hyper_parameters`, Lightning's `_class_path`), and importing a name from a file is
running code chosen by whoever wrote the file. So a name is resolved only when it is on this list;
anything else is refused with an error listing what is allowed. Add your own class with
`register_trusted_class(MyMethod)` (or its dotted name), or for one command with the environment
variable `LIT_TOKENSEL_TRUSTED_CLASSES=pkg.mod.MyMethod,pkg.mod.MyReference`.

This module imports nothing from lit_tokensel, so any subpackage may use it without an import cycle.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

ENV_VAR = "LIT_TOKENSEL_TRUSTED_CLASSES"

_METHODS = {  # public name -> module under lit_tokensel.methods
    "FullSFT": "full_sft",
    "Rho1SFT": "rho1",
    "TokenCleaningSFT": "token_cleaning",
    "SelfEvolvingTokenCleaningSFT": "self_evolving",
    "SsTokenSFT": "sstoken",
    "ForgettingSFT": "forgetting",
    "QTuningSFT": "qtuning",
    "ProFitSFT": "profit",
    "RandomTokenSFT": "random_tokens",
    "DFTSFT": "dft",
    "EAFTSFT": "eaft",
    "ASFTSFT": "asft",
}
_REFERENCES = {  # public name -> module under lit_tokensel.reference
    "AdapterDisabledReference": "adapter",
    "CachedReference": "cached",
    "FrozenModelReference": "frozen",
    "HistoryReference": "history",
}
# Lightning's loader for LightningCLI-written checkpoints; the only instantiator we accept.
TRUSTED_INSTANTIATORS = frozenset({"lightning.pytorch.cli.instantiate_module"})


def _project_names() -> set[str]:
    names = set()
    for name, module in _METHODS.items():
        names |= {
            f"lit_tokensel.{name}",
            f"lit_tokensel.methods.{name}",
            f"lit_tokensel.methods.{module}.{name}",
        }
    for name, module in _REFERENCES.items():
        names |= {f"lit_tokensel.reference.{name}", f"lit_tokensel.reference.{module}.{name}"}
    return names


PROJECT_CLASSES = frozenset(_project_names())
_registered: set[str] = set()


class UntrustedClassError(ValueError):
    """A file names a class that is not on the allow-list; nothing was imported."""


def dotted_name(cls: type) -> str:
    """`module.QualName` of `cls`: how a checkpoint written by `cls` names it (`method_class`)."""
    return _dotted(cls)


def _dotted(cls_or_name: type | str) -> str:
    if isinstance(cls_or_name, str):
        return cls_or_name
    return f"{cls_or_name.__module__}.{cls_or_name.__qualname__}"


def register_trusted_class(*classes: type | str) -> None:
    """Allow checkpoints to name these classes (class objects, or dotted `module.Class` names)."""
    for item in classes:
        name = _dotted(item)
        if "." not in name:
            raise ValueError(f"register_trusted_class: {name!r} is not a dotted 'module.Class' name")
        _registered.add(name)


def trusted_names() -> frozenset[str]:
    """Every name a checkpoint may use now: the project's, the registered ones and those in the env variable."""
    from_env = {n.strip() for n in os.environ.get(ENV_VAR, "").split(",") if n.strip()}
    return PROJECT_CLASSES | _registered | from_env


def check_trusted_name(name: Any, where: str, also: Iterable[str] = ()) -> str:
    """`name` itself when it is allowed (or in `also`); otherwise an `UntrustedClassError` saying where it came from."""
    allowed = trusted_names() | set(also)
    if not isinstance(name, str) or name not in allowed:
        public = {f"lit_tokensel.{n}" for n in _METHODS} | {
            f"lit_tokensel.reference.{n}" for n in _REFERENCES
        }
        listing = ", ".join(sorted(public | (allowed - PROJECT_CLASSES)))
        raise UntrustedClassError(
            f"{where} names the class {name!r}, which is not on lit_tokensel's allow-list, so it was not "
            f"imported (a checkpoint must not choose code to run). Allowed: {listing} (and their full "
            f"module paths). If you trust this class, register it with "
            f"lit_tokensel.register_trusted_class(...) or set {ENV_VAR}={name}."
        )
    return name


def resolve_trusted_class(name: Any, where: str, base: type | None = None) -> type:
    """Import the class `name` only if it is on the allow-list (and a subclass of `base` when given)."""
    check_trusted_name(name, where)
    module_name, _, class_name = name.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not isinstance(cls, type) or (base is not None and not issubclass(cls, base)):
        kind = f"a subclass of {base.__name__}" if base is not None else "a class"
        raise UntrustedClassError(f"{where} names {name!r}, which is not {kind}.")
    return cls


def check_plain_config(value: Any, where: str, also: Iterable[str] = ()) -> None:
    """Refuse any `class_path`/`_class_path` or `_instantiator` nested in `value` that is not allowed.

    Walks dicts and lists (a checkpoint's `hyper_parameters`); nothing is imported.
    """
    if isinstance(value, Mapping):
        for key in ("class_path", "_class_path"):
            if key in value:
                check_trusted_name(value[key], f"{where}.{key}", also)
        if "_instantiator" in value and value["_instantiator"] not in TRUSTED_INSTANTIATORS:
            raise UntrustedClassError(
                f"{where}._instantiator is {value['_instantiator']!r}; only {sorted(TRUSTED_INSTANTIATORS)} "
                f"is accepted (a checkpoint must not choose code to run)."
            )
        for key, item in value.items():
            check_plain_config(item, f"{where}.{key}", also)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain_config(item, f"{where}[{i}]", also)


def check_checkpoint_classes(checkpoint: Mapping[str, Any], where: str, also: Iterable[str] = ()) -> None:
    """Every class a checkpoint dict names (`method_class`, anything in `hyper_parameters`) is allowed.

    `also`: names trusted for this check only (e.g. the class of the module the caller loads into).
    """
    if "method_class" in checkpoint:
        check_trusted_name(checkpoint["method_class"], f"{where}: method_class", also)
    check_plain_config(checkpoint.get("hyper_parameters", {}), f"{where}: hyper_parameters", also)


def trust_config_classes(config: Any) -> list[str]:
    """Register every `class_path` in a config the user wrote (command line, YAML); return the names."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, Mapping):
            if isinstance(value.get("class_path"), str):
                found.append(value["class_path"])
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(config)
    register_trusted_class(*(n for n in found if "." in n))
    return found


def unregister_trusted_class(*classes: type | str) -> None:
    """Undo `register_trusted_class` (tests, or a session that no longer trusts a plug-in)."""
    for item in classes:
        _registered.discard(_dotted(item))
