"""ProFitSFT: the keep-mask is `exp(-CE) > tau` of the model's own probabilities, checked on a fixed batch
and in a short fit."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lit_tokensel.methods.profit import ProFitSFT
from tests.model_fixtures import pad_batch, synthetic_rows


def _probabilities(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent `P(x_{j+1} | x_<=j)` `[B, T-1]` from the softmax of the logits, and the response mask."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    probs = torch.softmax(logits[:, :-1].double(), dim=-1)
    targets = batch["labels"][:, 1:]
    return probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1), targets != -100


@pytest.mark.parametrize("tau", [0.002, 0.0025])
def test_mask_is_probability_above_tau(tiny_model_dir, tau):
    module = ProFitSFT(model=tiny_model_dir, tau=tau)
    module.configure_model()
    batch = pad_batch(synthetic_rows(6, vocab=300, seed=2), pad_id=0)
    losses, valid = module.token_losses(batch)
    selection = module.select_tokens(batch, losses, valid)
    probability, response = _probabilities(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch)
    expected = (probability > tau) & response
    assert 0 < int(expected.sum()) < int(response.sum()), (
        "tau must split this batch for the test to mean anything"
    )
    # exact except at a probability within float error of tau
    near = (probability - tau).abs() < 1e-6
    assert torch.equal(selection.keep & ~near, expected & ~near)
    torch.testing.assert_close(
        selection.scores["probability"][response].double(), probability[response], rtol=1e-5, atol=1e-7
    )


class _Metrics(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.initial: dict | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_fit_logs_the_kept_fraction_of_the_starting_model(tiny_model_dir):
    rows = synthetic_rows(12, vocab=300, seed=5)
    batches = [pad_batch(rows[i : i + 4], pad_id=0) for i in range(0, 12, 4)]
    module = ProFitSFT(model=tiny_model_dir, tau=0.0022, learning_rate=1e-2)
    recorder = _Metrics()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.load_state_dict(recorder.initial)
    probability, response = _probabilities(model, batches[0])
    kept = (probability > 0.0022) & response
    assert recorder.rows[0]["select/kept_fraction"] == pytest.approx(float(kept.sum() / response.sum()))
    assert recorder.rows[0]["select/loss_kept"] < recorder.rows[0]["select/loss_dropped"]
    assert all(0 < r["train/kept_fraction"] < 1 for r in recorder.rows)


def test_tau_must_be_a_probability():
    for bad in (-0.1, 1.0, True):
        with pytest.raises(ValueError, match="tau"):
            ProFitSFT(tau=bad)
