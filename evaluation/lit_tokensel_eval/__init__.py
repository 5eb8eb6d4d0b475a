"""lit_tokensel_eval: evaluate lit_tokensel models with lm-evaluation-harness.

Evaluate an exported model directory, a Lightning checkpoint or an in-memory model on lm-eval tasks, the
papers' benchmark suites, or the bundled offline tasks; write lm-eval's JSON and a flat CSV per run;
compare runs in the papers' table layout; evaluate during training with `EvalCallback`.
Needs the `eval` extra (`pip install "lit-tokensel[eval]"`). Command line: `lit-tokensel-eval`.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EvalCallback",
    "EvalRun",
    "InMemoryModel",
    "TASKS_DIR",
    "compare",
    "evaluate",
    "load_suite",
    "suite_names",
]

# Imported on first use: lm-eval, torch and lightning are heavy, and `TASKS_DIR` alone needs none of them.
_LAZY = {
    "EvalCallback": "lit_tokensel_eval.callback",
    "EvalRun": "lit_tokensel_eval.runner",
    "evaluate": "lit_tokensel_eval.runner",
    "InMemoryModel": "lit_tokensel_eval.models",
    "TASKS_DIR": "lit_tokensel_eval.registry",
    "compare": "lit_tokensel_eval.compare",
    "load_suite": "lit_tokensel_eval.suites",
    "suite_names": "lit_tokensel_eval.suites",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lit_tokensel_eval' has no attribute {name!r}")
