"""Every choice is a `Literal` type, checked for configs (jsonargparse) and for Python callers (`check_choices`);
methods read their settings from attributes, never from `self.hparams`."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Literal

import pytest

from lit_tokensel import (
    FullSFT,
    Rho1SFT,
    SelfEvolvingTokenCleaningSFT,
    SFTDataModule,
    SsTokenSFT,
    TokenCleaningSFT,
)
from lit_tokensel.callbacks.finite import FiniteGuard
from lit_tokensel.choices import check_choices, literal_choices
from lit_tokensel.methods.base import TokenSelectionModule
from lit_tokensel.reference import CachedReference, FrozenModelReference, HistoryReference

METHODS = Path(__file__).parents[1] / "lit_tokensel" / "methods"


def _choices(
    a: Literal["x", "y"], b: Literal[1, 2] | None = None, c: str = "x", d: int | Literal["auto"] = 1
):
    return a, b, c, d


def test_literal_choices_reads_the_annotations():
    assert literal_choices(_choices) == {"a": ("x", "y"), "b": (1, 2, None)}  # `int | Literal`: an open set
    check_choices(_choices, {"a": "y", "b": None, "c": "anything"})
    with pytest.raises(ValueError, match=r"^a='z': use one of 'x', 'y'$"):
        check_choices(_choices, {"a": "z"})


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        (
            TokenSelectionModule.__init__,
            {"dtype": ("float32", "bfloat16", "float16"), "lr_schedule": ("cosine", "linear", "constant")},
        ),
        (Rho1SFT.__init__, {"scope": ("batch", "sequence"), "selection_group": ("global", "rank")}),
        (
            TokenCleaningSFT.__init__,
            {"scope": ("sequence", "batch", "global"), "selection_group": ("global", "rank")},
        ),
        (SelfEvolvingTokenCleaningSFT.__init__, {"scope": ("chunk", "sequence")}),
        (
            SsTokenSFT.__init__,
            {
                "warmup_unit": ("epoch", "training"),
                "rel_form": ("difference", "relative", "inverted"),
                "combine": ("minmax", "rank"),
            },
        ),
        (HistoryReference.__init__, {"mode": ("ema", "lagged")}),
        (FrozenModelReference.__init__, {"dtype": ("float32", "bfloat16", "float16")}),
        (FiniteGuard.__init__, {"on_nonfinite": ("error", "skip")}),
        (
            SFTDataModule.__init__,
            {
                "format": ("auto", "messages", "prompt_completion", "alpaca"),
                "train_on": ("all_turns", "last_turn"),
                "on_invalid": ("error", "skip"),
            },
        ),
    ],
)
def test_every_choice_is_a_literal(function, expected):
    assert literal_choices(function) == expected


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: FullSFT(lr_schedule="cosin"),
            "lr_schedule='cosin': use one of 'cosine', 'linear', 'constant'",
        ),
        (lambda: FullSFT(dtype="float64"), "dtype='float64': use one of 'float32', 'bfloat16', 'float16'"),
        (
            lambda: Rho1SFT(reference=CachedReference("r"), scope="global"),
            "scope='global': use one of 'batch', 'sequence'",
        ),
        (lambda: TokenCleaningSFT(scope="chunk"), "scope='chunk': use one of 'sequence', 'batch', 'global'"),
        (
            lambda: SelfEvolvingTokenCleaningSFT(scope="sequnce"),
            "scope='sequnce': use one of 'chunk', 'sequence'",
        ),
        (lambda: SsTokenSFT(warmup_unit="steps"), "warmup_unit='steps': use one of 'epoch', 'training'"),
        (lambda: HistoryReference(mode="avg"), "mode='avg': use one of 'ema', 'lagged'"),
        (
            lambda: FrozenModelReference("m", dtype="fp8"),
            "dtype='fp8': use one of 'float32', 'bfloat16', 'float16'",
        ),
        (lambda: SFTDataModule(train_on="last"), "train_on='last': use one of 'all_turns', 'last_turn'"),
        (lambda: SFTDataModule(on_invalid="skp"), "on_invalid='skp': use one of 'error', 'skip'"),
        (
            lambda: SFTDataModule(format="jsonl"),
            "format='jsonl': use one of 'auto', 'messages', 'prompt_completion', 'alpaca'",
        ),
    ],
)
def test_python_callers_get_the_types_check(build, message):
    with pytest.raises(ValueError) as error:
        build()
    assert str(error.value) == message


def test_methods_read_settings_from_attributes_not_hparams():
    """`self.hparams` is only written (the checkpoint's record); reading it would be a second way."""
    reads = []
    for path in sorted(METHODS.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        stores = {
            id(node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "hparams"
                and id(node) not in stores
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                reads.append(f"{path.name}:{node.lineno}")
    assert reads == []


def test_settings_are_attributes_under_their_names():
    module = SsTokenSFT(
        ratio=0.5,
        gamma=0.3,
        warmup=0.1,
        warmup_unit="training",
        learning_rate=1e-3,
        lr_schedule="linear",
        dtype="bfloat16",
        betas=[0.8, 0.9],
    )
    assert (module.ratio, module.gamma, module.warmup, module.warmup_unit) == (0.5, 0.3, 0.1, "training")
    assert (module.learning_rate, module.lr_schedule, module.weights_dtype, module.betas) == (
        1e-3,
        "linear",
        "bfloat16",
        (0.8, 0.9),
    )
    assert module.hparams["ratio"] == 0.5 and module.hparams["dtype"] == "bfloat16"  # the checkpoint's record
