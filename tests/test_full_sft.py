"""FullSFT against transformers' own loss, gradient-accumulation equivalence, pinned losses, export."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lit_tokensel import FullSFT
from lit_tokensel.export import export_pretrained
from lit_tokensel.modeling.loading import LoraSettings
from lit_tokensel.selection.token_loss import masked_sum
from tests.model_fixtures import pad_batch, synthetic_rows


def _module(model_dir: str, **kwargs) -> FullSFT:
    module = FullSFT(model=model_dir, **kwargs)
    module.configure_model()
    return module


def test_per_token_loss_matches_transformers_loss(tiny_model_dir):
    module = _module(tiny_model_dir)
    batch = pad_batch(synthetic_rows(4, vocab=300), pad_id=0)
    losses, valid = module.token_losses(batch)  # [B, T-1]
    assert losses.shape == valid.shape == (4, batch["input_ids"].shape[1] - 1)
    reference = module.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss
    torch.testing.assert_close(losses[valid].mean(), reference, rtol=1e-6, atol=1e-6)
    assert torch.all(losses[~valid] == 0)
    # the shift: entry j pairs with labels[:, j+1]
    assert torch.equal(valid, batch["labels"][:, 1:] != -100)


def test_empty_selection_gives_zero_loss_with_graph(tiny_model_dir):
    module = _module(tiny_model_dir)
    batch = pad_batch(synthetic_rows(2, vocab=300), pad_id=0)
    losses, valid = module.token_losses(batch)
    loss = masked_sum(losses, torch.zeros_like(valid))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def _fit_one_step(model_dir: str, batches: list[dict], accumulate: int) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = FullSFT(model=model_dir, optimizer=_sgd, lr_schedule="constant", warmup_ratio=0.0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_gradient_accumulation_equals_large_batch(tiny_model_dir):
    rows = synthetic_rows(8, vocab=300)  # response lengths 2..17: unequal token counts per micro-batch
    small = [pad_batch(rows[i : i + 2], pad_id=0) for i in range(0, 8, 2)]
    accumulated = _fit_one_step(tiny_model_dir, small, accumulate=4)
    large = _fit_one_step(tiny_model_dir, [pad_batch(rows, pad_id=0)], accumulate=1)

    # Independent reference: one SGD step on transformers' mean loss over all 8 rows.
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = pad_batch(rows, pad_id=0)
    reference(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss.backward()
    with torch.no_grad():
        expected = {k: p - 0.5 * p.grad for k, p in reference.named_parameters()}
    initial = {
        k: v.detach().clone()
        for k, v in AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items()
    }

    for key, value in expected.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(large[key], value, rtol=1e-5, atol=1e-6)
    # The step really moved the weights (the comparison is not trivially equal).
    assert max((accumulated[k] - initial[k]).abs().max() for k in expected) > 1e-3


class _LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(round(float(trainer.callback_metrics["train/loss"]), 4))


def test_seeded_tiny_fit_pins_first_losses(tiny_model_dir):
    L.seed_everything(1234)
    rows = synthetic_rows(12, vocab=300, seed=3)
    batches = [pad_batch(rows[i : i + 3], pad_id=0) for i in range(0, 12, 3)]
    module = FullSFT(model=tiny_model_dir, learning_rate=1e-2, lr_schedule="constant", warmup_ratio=0.0)
    recorder = _LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        callbacks=[recorder],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert recorder.losses == pytest.approx(PINNED_LOSSES, abs=2e-4)
    # the first step's loss is the untrained model's mean loss on the first batch
    untrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    first = batches[0]
    expected = untrained(
        input_ids=first["input_ids"], attention_mask=first["attention_mask"], labels=first["labels"]
    ).loss
    assert recorder.losses[0] == pytest.approx(float(expected.detach()), abs=1e-4)


PINNED_LOSSES = [6.2799, 6.2585, 6.2732, 6.2304]


def _logits(model_or_dir, batch):
    model = (
        AutoModelForCausalLM.from_pretrained(model_or_dir) if isinstance(model_or_dir, str) else model_or_dir
    )
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=8, dropout=0.0)])
def test_export_reloads_with_identical_logits(tiny_model_dir, tmp_path, lora):
    module = _module(tiny_model_dir, lora=lora)
    with torch.no_grad():  # make the adapter (or the weights) non-trivial
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    before = copy.deepcopy(module.model.state_dict())
    batch = pad_batch(synthetic_rows(3, vocab=300), pad_id=0)
    trained_logits = _logits(module.model, batch)
    out = export_pretrained(module.model, module.tokenizer, tmp_path / "export")
    torch.testing.assert_close(_logits(str(out), batch), trained_logits, rtol=1e-5, atol=1e-5)
    # export leaves the trained model (adapter included) untouched
    after = module.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (out / "tokenizer.json").is_file() and "lora" not in str(sorted(p.name for p in out.iterdir()))
