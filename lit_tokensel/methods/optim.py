"""The default optimizer's settings and learning-rate schedule, and the check that an `optimizer:` block
does not silently override settings made on the module."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

LRSchedule = Literal["cosine", "linear", "constant"]
"""The built-in schedules, each after a linear warm-up (`lr_factor`)."""

ADAMW_SETTINGS = {"learning_rate": "lr", "weight_decay": "weight_decay", "betas": "betas", "eps": "eps"}
"""Module setting -> the optimizer's keyword for it."""


def check_optimizer_settings(
    factory: Callable[..., Any] | None, settings: dict[str, Any], defaults: dict[str, Any]
) -> None:
    """Refuse module settings that an `optimizer` block would override without a word.

    With a block, a module setting changed from its default must equal the block's own value (a
    jsonargparse block lists every keyword of its class, defaults included); a plain callable shows
    no keywords, so any changed setting is refused.
    """
    if factory is None:
        return
    keywords = getattr(factory, "keywords", None)  # functools.partial from a YAML block, else None
    for name, keyword in ADAMW_SETTINGS.items():
        value = settings[name]
        if _same(value, defaults[name]):
            continue
        flag = f"--model.init_args.{name} {value}"
        if keywords is None or keyword not in keywords:
            raise ValueError(
                f"{flag} is set, but the `optimizer` block (--model.init_args.optimizer) builds the optimizer and "
                f"takes no {keyword} from the module: set {keyword} in the block's init_args, or drop one of the two"
            )
        if not _same(keywords[keyword], value):
            raise ValueError(
                f"{flag} conflicts with {keyword}={keywords[keyword]} in the `optimizer` block "
                f"(--model.init_args.optimizer): set it in one place"
            )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def lr_factor(
    step: int, schedule: LRSchedule, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """Multiplier of the peak learning rate at optimizer step `step`.

    Linear warm-up from 0 over `warmup_steps`, then `constant` (1), `linear` or `cosine` decay from 1 to
    `min_lr_ratio` at `total_steps`. With `min_lr_ratio=0` this is transformers' `get_scheduler` schedule
    (`constant` here also warms up, as documented).
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        decay = max(0.0, 1.0 - progress)
    elif schedule == "cosine":
        decay = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    else:
        raise ValueError(f"lr_schedule={schedule!r}: use cosine, linear or constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay
