"""Optimizer settings on the module (betas, eps, a schedule floor) and refusal of conflicting `optimizer:` blocks."""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import get_scheduler

from lit_tokensel import FullSFT
from lit_tokensel.methods.optim import lr_factor
from tests.model_fixtures import pad_batch, synthetic_rows


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_without_a_floor_the_schedule_is_transformers_own(schedule):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_scheduler(schedule, optimizer, num_warmup_steps=3, num_training_steps=17)
    expected = []
    for _ in range(18):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert [lr_factor(s, schedule, 3, 17) for s in range(18)] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [  # total 10 steps, 2 of warm-up, floor 0.1: step -> factor
        ("cosine", {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 6: 0.55, 10: 0.1}),
        ("linear", {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.775, 6: 0.55, 10: 0.1}),
        ("constant", {0: 0.0, 1: 0.5, 2: 1.0, 6: 1.0, 10: 1.0}),
    ],
)
def test_the_floor_pins_the_end_of_the_decay(schedule, expected):
    assert {s: lr_factor(s, schedule, 2, 10, min_lr_ratio=0.1) for s in expected} == pytest.approx(expected)


class _LrRecorder(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.group: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.group = trainer.optimizers[0].param_groups[0]
        self.lrs.append(self.group["lr"])


def test_fit_uses_betas_eps_and_the_floor(tiny_model_dir):
    module = FullSFT(
        model=tiny_model_dir,
        learning_rate=1e-3,
        betas=(0.8, 0.95),
        eps=1e-6,
        weight_decay=0.1,
        lr_schedule="cosine",
        warmup_ratio=0.2,
        min_lr_ratio=0.1,
    )
    batches = [
        pad_batch(rows, pad_id=0) for rows in (synthetic_rows(2, vocab=300, seed=s) for s in range(10))
    ]
    recorder = _LrRecorder()
    L.Trainer(
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    ).fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert isinstance(module.trainer.optimizers[0], torch.optim.AdamW)
    assert recorder.group["betas"] == (0.8, 0.95) and recorder.group["eps"] == 1e-6
    assert recorder.group["weight_decay"] == 0.1
    # 10 steps, 2 of warm-up: the lr at steps 0, 1, 2, 6 and the last (9), floor 1e-4
    expected = {0: 0.0, 1: 5e-4, 2: 1e-3, 6: 5.5e-4, 9: 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 7 / 8))}
    assert {s: recorder.lrs[s] for s in expected} == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert min(recorder.lrs[2:]) > 1e-4  # never below the floor


def test_an_optimizer_block_that_conflicts_with_module_settings_is_refused():
    adamw = functools.partial(torch.optim.AdamW, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    with pytest.raises(ValueError, match=r"--model.init_args.learning_rate 0.001 conflicts with lr=0.0001"):
        FullSFT(learning_rate=1e-3, optimizer=adamw)
    with pytest.raises(
        ValueError, match=r"--model.init_args.betas \(0.8, 0.99\) conflicts with betas=\(0.9, 0.95\)"
    ):
        FullSFT(betas=(0.8, 0.99), optimizer=adamw)
    with pytest.raises(ValueError, match="takes no betas from the module"):
        FullSFT(betas=(0.8, 0.99), optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    with pytest.raises(ValueError, match="takes no lr from the module"):  # an opaque callable
        FullSFT(learning_rate=1e-3, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="min_lr_ratio 0.1 applies to the built-in schedule"):
        FullSFT(min_lr_ratio=0.1, lr_scheduler=lambda opt: torch.optim.lr_scheduler.ConstantLR(opt))
    # agreeing or untouched settings are fine
    FullSFT(learning_rate=1e-4, betas=[0.9, 0.95], optimizer=adamw)
    FullSFT(optimizer=lambda params: torch.optim.SGD(params, lr=0.1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_lr_ratio": 1.5}, "min_lr_ratio=1.5"),
        ({"betas": (0.9, 1.0)}, "betas="),
        ({"eps": 0.0}, "eps=0.0"),
    ],
)
def test_invalid_optimizer_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FullSFT(**kwargs)
