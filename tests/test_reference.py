"""Reference providers: frozen model, adapter disabled, cached, EMA/lagged history (updates, swap, resume)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lit_tokensel.methods.base import Selection, TokenSelectionModule
from lit_tokensel.modeling.loading import LoraSettings
from lit_tokensel.reference import (
    AdapterDisabledReference,
    CachedReference,
    FrozenModelReference,
    HistoryReference,
    ReferenceModel,
)
from lit_tokensel.reference.history_update import HistoryUpdate
from lit_tokensel.selection.token_loss import per_token_cross_entropy
from tests.model_fixtures import pad_batch, synthetic_rows

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


class _RefModule(TokenSelectionModule):
    """Test-only wiring of a reference into the base class: what the base class will do itself.
    Computes the reference losses every step (as a score) and keeps every response token."""

    def __init__(self, reference: ReferenceModel, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reference = reference
        # keep the provider (and its weights) out of the checkpoint's hyper-parameters
        for hparams in (self.hparams, self._hparams_initial):
            hparams.pop("reference", None)
        self.hparams["reference"] = reference.config()

    def configure_model(self) -> None:
        if self.model is None:
            super().configure_model()
            self.reference.setup(self)

    def configure_callbacks(self) -> list[L.Callback]:
        return self.reference.callbacks()

    def select_tokens(self, batch, token_losses, valid):
        gap = self.reference.token_losses(self, batch) - token_losses.detach()  # [B, T-1]
        return Selection(keep=valid, scores={"ref_gap": gap})  # keep all: the weights must move


def _module(model_dir: str, reference: ReferenceModel, **kwargs) -> _RefModule:
    module = _RefModule(reference, model=model_dir, **kwargs)
    module.configure_model()
    return module


def _batches(n: int, size: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    rows = synthetic_rows(n * size, vocab=300, seed=seed)
    return [pad_batch(rows[i : i + size], pad_id=0) for i in range(0, n * size, size)]


def _independent_losses(model: torch.nn.Module, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_token_cross_entropy(logits, batch["labels"])[0]


@torch.no_grad()
def _perturb(module: TokenSelectionModule, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(0)
    for p in module.model.parameters():
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _trainer(max_steps: int, callbacks=(), accumulate: int = 1, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kwargs,
    )


def _sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


CONSTANT = {"lr_schedule": "constant", "warmup_ratio": 0.0}


# ---------------------------------------------------------------------------------------------- frozen model


def test_frozen_reference_matches_independent_model(tiny_model_dir):
    module = _module(tiny_model_dir, FrozenModelReference(tiny_model_dir))
    _perturb(module)  # the trained model differs; the reference must not follow it
    batch = pad_batch(synthetic_rows(4, vocab=300), pad_id=0)
    losses = module.reference.token_losses(module, batch)  # [B, T-1]

    independent = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = _independent_losses(independent, batch)
    valid = batch["labels"][:, 1:] != -100
    assert losses.shape == valid.shape and losses.dtype == torch.float32 and not losses.requires_grad
    torch.testing.assert_close(losses, expected, rtol=1e-6, atol=1e-6)
    assert torch.all(losses[~valid] == 0)
    hf_loss = independent(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss
    torch.testing.assert_close(losses[valid].mean(), hf_loss, rtol=1e-6, atol=1e-6)
    live, _ = module.token_losses(batch)
    assert not torch.allclose(live, losses)


def test_frozen_reference_is_not_trained_or_saved(tiny_model_dir, tmp_path):
    reference = FrozenModelReference(tiny_model_dir)
    module = _RefModule(reference, model=tiny_model_dir, optimizer=_sgd, **CONSTANT)
    trainer = _trainer(max_steps=2)
    trainer.fit(module, train_dataloaders=DataLoader(_batches(2), batch_size=None))
    ref_params = {id(p) for p in reference.model.parameters()}
    assert ref_params and not ref_params & {id(p) for p in module.parameters()}
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized and not ref_params & optimized
    assert all(not p.requires_grad for p in reference.model.parameters()) and not reference.model.training
    own_keys = {f"model.{k}" for k in module.model.state_dict()}
    assert set(module.state_dict()) == own_keys
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == own_keys
    assert checkpoint["hyper_parameters"]["reference"] == reference.config()  # plain data, no weights
    # frozen: still the weights on disk
    on_disk = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(torch.equal(v, on_disk[k]) for k, v in reference.model.state_dict().items())


# ---------------------------------------------------------------------------------------------- adapter disabled


def test_adapter_disabled_reference_equals_base_model(tiny_model_dir):
    module = _module(tiny_model_dir, AdapterDisabledReference(), lora=LORA)
    _perturb(module, scale=0.5)  # lora_B starts at zero: make the adapter change the output
    batch = pad_batch(synthetic_rows(4, vocab=300), pad_id=0)
    losses = module.reference.token_losses(module, batch)
    expected = _independent_losses(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch)
    torch.testing.assert_close(losses, expected, rtol=1e-6, atol=1e-6)
    live, _ = module.token_losses(batch)
    assert not torch.allclose(live, losses)  # the adapter is back on after the reference forward
    assert not losses.requires_grad


def test_adapter_disabled_reference_needs_lora(tiny_model_dir):
    with pytest.raises(ValueError, match="LoRA adapter.*lora"):
        _module(tiny_model_dir, AdapterDisabledReference())


# ---------------------------------------------------------------------------------------------- cached


def test_cached_reference_reads_batch_and_explains_missing_key():
    batch = pad_batch(synthetic_rows(3, vocab=300), pad_id=0)
    valid = batch["labels"][:, 1:] != -100
    cached = torch.rand(valid.shape, dtype=torch.float64).masked_fill(~valid, float("nan"))
    reference = CachedReference("ref")
    with pytest.raises(KeyError, match=r"cached/ref.*data\.cached_losses"):
        reference.token_losses(None, batch)
    losses = reference.token_losses(None, {**batch, "cached/ref": cached})
    assert losses.dtype == torch.float32 and torch.all(losses[~valid] == 0)
    torch.testing.assert_close(losses[valid], cached[valid].float())


# ---------------------------------------------------------------------------------------------- history


class _WeightRecorder(L.Callback):
    """Trainable weights at the start of fit and after every optimizer step."""

    def __init__(self) -> None:
        self.thetas: list[list[torch.Tensor]] = []
        self._step = 0

    def _record(self, module) -> None:
        self.thetas.append([p.detach().clone() for p in module.model.parameters() if p.requires_grad])

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(pl_module)
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._step:
            self._record(pl_module)
            self._step = trainer.global_step


def _fit_history(model_dir, history, steps, accumulate=1, **kwargs):
    L.seed_everything(0)
    module = _RefModule(history, model=model_dir, optimizer=_sgd, **CONSTANT, **kwargs)
    recorder = _WeightRecorder()
    trainer = _trainer(max_steps=steps, callbacks=[recorder], accumulate=accumulate)
    trainer.fit(module, train_dataloaders=DataLoader(_batches(steps * accumulate), batch_size=None))
    return module, recorder.thetas


def test_history_losses_swap_in_and_restore_live_weights(tiny_model_dir):
    module = _module(tiny_model_dir, HistoryReference(decay=0.9))
    _perturb(module)  # live = theta_0 + noise; history = theta_0
    live_before = {k: v.clone() for k, v in module.model.state_dict().items()}
    batch = pad_batch(synthetic_rows(4, vocab=300), pad_id=0)
    losses = module.reference.token_losses(module, batch)
    torch.testing.assert_close(
        losses, _independent_losses(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch)
    )
    assert all(torch.equal(v, live_before[k]) for k, v in module.model.state_dict().items())
    live, _ = module.token_losses(batch)
    assert not torch.allclose(live, losses)


def test_history_forward_between_forward_and_backward_keeps_gradients(tiny_model_dir):
    module = _module(tiny_model_dir, HistoryReference())
    _perturb(module)
    batch = pad_batch(synthetic_rows(4, vocab=300), pad_id=0)

    def grads(with_history: bool) -> list[torch.Tensor]:
        module.zero_grad()
        losses, _ = module.token_losses(batch)
        if with_history:
            module.reference.token_losses(module, batch)  # swaps weights while the graph is alive
        losses.sum().backward()
        return [p.grad.clone() for p in module.parameters()]

    plain = grads(False)
    for a, b in zip(grads(True), plain, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ema_history_matches_closed_form(tiny_model_dir, accumulate):
    decay, steps = 0.5, 3
    history = HistoryReference("ema", decay=decay)
    _, thetas = _fit_history(tiny_model_dir, history, steps, accumulate=accumulate)
    assert len(thetas) == steps + 1 and history.updates == steps  # per optimizer step, not micro-batch
    for i, shadow in enumerate(history.shadow):
        expected = decay**steps * thetas[0][i] + sum(
            (1 - decay) * decay ** (steps - n) * thetas[n][i] for n in range(1, steps + 1)
        )
        torch.testing.assert_close(shadow, expected, rtol=1e-5, atol=1e-6)
    moved = max((a - b).abs().max() for a, b in zip(history.shadow, thetas[-1], strict=True))
    assert moved > 1e-3  # not trivially the current weights


def test_lagged_history_holds_weights_from_lag_steps_ago(tiny_model_dir):
    history = HistoryReference("lagged", lag=2)
    _, thetas = _fit_history(tiny_model_dir, history, steps=4)
    for got, want in zip(history.shadow, thetas[2], strict=True):
        assert torch.equal(got, want)
    assert [
        [torch.equal(a, b) for a, b in zip(snap, thetas[n], strict=True)]
        for snap, n in zip(history.pending, (3, 4), strict=True)
    ] == [[True] * len(thetas[0])] * 2


def test_lagged_history_before_lag_steps_is_theta_0(tiny_model_dir):
    history = HistoryReference("lagged", lag=3)
    _, thetas = _fit_history(tiny_model_dir, history, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(history.shadow, thetas[0], strict=True))


def test_lora_history_keeps_only_adapter_tensors(tiny_model_dir):
    module = _module(tiny_model_dir, HistoryReference(), lora=LORA)
    adapter = [n for n, p in module.model.named_parameters() if "lora_" in n]
    assert adapter and module.reference.names == adapter and len(module.reference.shadow) == len(adapter)
    kept = sum(t.numel() for t in module.reference.shadow)
    assert kept < sum(p.numel() for p in module.model.parameters()) / 5


def test_history_state_loaded_before_setup_is_applied_in_setup(tiny_model_dir):
    source = _module(tiny_model_dir, HistoryReference("lagged", lag=1))
    _perturb(source)
    source.reference.update()  # shadow = theta_0, pending = [perturbed]
    state = source.reference.state_dict()
    target = HistoryReference("lagged", lag=1)
    target.load_state_dict(state)
    _module(tiny_model_dir, target)
    assert target.updates == 1 and len(target.pending) == 1
    for a, b in zip(
        target.pending[0] + target.shadow, source.reference.pending[0] + source.reference.shadow, strict=True
    ):
        assert torch.equal(a, b)
    mismatched = HistoryReference("ema")
    mismatched.load_state_dict(state)
    with pytest.raises(ValueError, match="mode='lagged'"):
        _module(tiny_model_dir, mismatched)
    assert HistoryUpdate(target).state_dict()["updates"] == 1


def _resumable_fit(model_dir, epochs, ckpt_in=None, ckpt_out=None):
    L.seed_everything(0)
    history = HistoryReference("ema", decay=0.5)
    module = _RefModule(history, model=model_dir, optimizer=_adamw, **CONSTANT)
    trainer = _trainer(max_steps=-1, max_epochs=epochs)
    trainer.fit(module, train_dataloaders=DataLoader(_batches(2), batch_size=None), ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    return module, history


def test_resume_restores_weights_and_history(tiny_model_dir, tmp_path):
    # Interrupt at an epoch boundary: Lightning restarts a plain DataLoader mid-epoch from its start.
    full, full_history = _resumable_fit(tiny_model_dir, epochs=2)  # 4 optimizer steps
    _resumable_fit(tiny_model_dir, epochs=1, ckpt_out=tmp_path / "k.ckpt")  # 2 steps, checkpoint
    resumed, resumed_history = _resumable_fit(tiny_model_dir, epochs=2, ckpt_in=tmp_path / "k.ckpt")
    assert full_history.updates == resumed_history.updates == 4
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    for a, b in zip(resumed_history.shadow, full_history.shadow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the history is not just the current weights, nor theta_0
    assert (
        max((a - p).abs().max() for a, p in zip(full_history.shadow, full_history.params, strict=True)) > 1e-4
    )
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert (
        max(
            (a - initial[n]).abs().max() for a, n in zip(full_history.shadow, full_history.names, strict=True)
        )
        > 1e-4
    )


# ---------------------------------------------------------------------------------------------- orderings (issue 19)


class _BackwardWitness(L.Callback):
    """At every backward: the history is not swapped in and the live weights are those of the batch's start."""

    def __init__(self, history: HistoryReference) -> None:
        self.history, self.checked = history, 0
        self._start: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = [p.detach().clone() for p in self.history.params]

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        assert not self.history.swapped_in
        assert all(torch.equal(p, q) for p, q in zip(self.history.params, self._start, strict=True))
        self.checked += 1


def test_history_weights_are_back_in_place_before_every_backward(tiny_model_dir):
    L.seed_everything(0)
    history = HistoryReference(decay=0.5)
    module = _RefModule(history, model=tiny_model_dir, optimizer=_sgd, **CONSTANT)
    witness = _BackwardWitness(history)
    _trainer(max_steps=3, callbacks=[witness]).fit(
        module, train_dataloaders=DataLoader(_batches(3), batch_size=None)
    )
    assert witness.checked == 3 and history.updates == 3
    assert any(
        not torch.equal(s, p) for s, p in zip(history.shadow, history.params, strict=True)
    )  # they differ


def test_a_backward_while_the_history_is_swapped_in_is_refused(tiny_model_dir, monkeypatch):
    import lit_tokensel.reference.history as history_module

    module = _module(tiny_model_dir, HistoryReference())
    _perturb(module)
    guard = HistoryUpdate(module.reference)
    real = history_module.model_token_losses
    seen = []

    def backward_inside_the_swap(model, batch):
        with pytest.raises(
            RuntimeError, match="backward while the history weights are swapped into the model"
        ):
            guard.on_before_backward(None, module, None)  # what Lightning calls right before backward
        seen.append(True)
        return real(model, batch)

    monkeypatch.setattr(history_module, "model_token_losses", backward_inside_the_swap)
    module.reference.token_losses(module, pad_batch(synthetic_rows(2, vocab=300), pad_id=0))
    assert seen == [True] and not module.reference.swapped_in
    guard.on_before_backward(None, module, None)  # restored: allowed
