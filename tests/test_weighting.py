"""Token-weighting losses (DFT, EAFT, ASFT) against independent float64 computations and TRL's formula."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lit_tokensel import ASFTSFT, DFTSFT, EAFTSFT
from lit_tokensel.modeling.loading import LoraSettings
from lit_tokensel.reference import AdapterDisabledReference, FrozenModelReference
from tests.model_fixtures import pad_batch, save_perturbed_copy, synthetic_rows

LR = 0.5


def _batch(multi_turn: bool = True) -> dict:
    """Right-padded rows of different lengths; with `multi_turn`, rows 1 and 3 get a second prompt span
    (-100 labels) between two response spans."""
    batch = pad_batch(synthetic_rows(4, vocab=300, seed=3), pad_id=0)
    if multi_turn:
        for row in (1, 3):
            length = int(batch["attention_mask"][row].sum())
            batch["labels"][row, length - 5 : length - 3] = -100
    return batch


def _logits(model_dir: str, batch: dict, state: dict | None = None) -> tuple[torch.nn.Module, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if state is not None:
        model.load_state_dict(state)
    return model, model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def trl_dft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRL's `dft_loss` (trl/trainer/sft_trainer.py up to 0.2x; TRL 1.x inlines the same formula in
    `SFTTrainer.compute_loss`), reimplemented from its source: the labels are padded right by one and
    shifted, `per_token_loss = -exp(logp).detach() * logp`, summed and divided by the label count.
    `selective_log_softmax` is `log_softmax(...).gather(...)`."""
    labels = torch.nn.functional.pad(labels, (0, 1), value=-100)
    shift_labels = labels[..., 1:].clone()
    loss_mask = shift_labels != -100
    shift_labels[~loss_mask] = 0
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, shift_labels[..., None]).squeeze(-1)
    per_token_loss = -logprobs.exp().detach() * logprobs
    return (per_token_loss * loss_mask).sum() / loss_mask.sum()


def _module_loss(module, batch: dict) -> torch.Tensor:
    """The module's objective on one micro-batch: main sum / main count plus its terms (no Trainer)."""
    selected = module.select_batch(batch)
    main, terms = module.objective_terms(selected)
    loss = main.loss_sum / main.count
    for term, sums in terms.values():
        loss = loss + term.coefficient * sums.loss_sum / (
            main.count if term.shares_main_count else sums.count
        )
    return loss


def _grads(loss: torch.Tensor, model: torch.nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [p for p in model.parameters()]))


# ---------------------------------------------------------------------------------------------- DFT


@pytest.mark.parametrize("chunked", [False, True], ids=["logits", "chunked_loss"])
def test_dft_loss_and_gradient_equal_trls_dft_loss(tiny_model_dir, chunked):
    batch = _batch()
    module = DFTSFT(model=tiny_model_dir, chunked_loss=chunked)
    module.configure_model()
    ours = _module_loss(module, batch)
    model, logits = _logits(tiny_model_dir, batch)
    theirs = trl_dft_loss(logits, batch["labels"])
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    for a, b in zip(_grads(ours, module.model), _grads(theirs, model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_dft_equals_a_float64_hand_computation(tiny_model_dir):
    batch = _batch()
    module = DFTSFT(model=tiny_model_dir)
    module.configure_model()
    module.model.double()
    ours = _module_loss(module, batch)
    logits = module.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits.detach()
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            target = int(batch["labels"][b, t + 1])
            if target == -100:
                continue
            row = logits[b, t].double()
            log_z = math.log(sum(math.exp(v) for v in (row - row.max()).tolist())) + float(row.max())
            ce = log_z - float(row[target])
            total += math.exp(-ce) * ce
            count += 1
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert float(ours) == pytest.approx(total / count, rel=1e-6)


class _Snapshots(L.Callback):
    def __init__(self) -> None:
        self.before: list[dict] = []
        self.after: list[dict] = []
        self.metrics: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _fit_halves(module, batch: dict, accumulate: int) -> _Snapshots:
    """One optimizer step (SGD) on `batch`, whole or as two micro-batches of very different response lengths."""
    snapshots = _Snapshots()
    parts = (
        [batch]
        if accumulate == 1
        else [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[snapshots],
    )
    trainer.fit(module, train_dataloaders=DataLoader(parts, batch_size=None))
    return snapshots


def _sgd(model_dir: str, state: dict, loss_fn, batch: dict) -> tuple[dict, float]:
    model, logits = _logits(model_dir, batch, state)
    loss = loss_fn(logits)
    loss.backward()
    with torch.no_grad():
        return {k: p - LR * p.grad for k, p in model.named_parameters()}, float(loss)


def test_dft_accumulated_step_is_the_step_on_the_whole_batch(tiny_model_dir):
    batch = _batch()
    module = DFTSFT(
        model=tiny_model_dir,
        optimizer=lambda p: torch.optim.SGD(p, lr=LR),
        lr_schedule="constant",
        warmup_ratio=0.0,
    )
    snapshots = _fit_halves(module, batch, accumulate=2)
    expected, loss = _sgd(
        tiny_model_dir, snapshots.before[0], lambda lg: trl_dft_loss(lg, batch["labels"]), batch
    )
    assert snapshots.metrics[1]["train/loss"] == pytest.approx(loss, abs=1e-6)
    for key, value in expected.items():
        torch.testing.assert_close(snapshots.after[1][key], value, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- EAFT


def _eaft_weights_float64(logits: torch.Tensor, labels: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """The paper's weight per response position from a sort of each row, in float64 (0 elsewhere)."""
    out = torch.zeros(labels.shape[0], labels.shape[1] - 1, dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if int(labels[b, t + 1]) == -100:
                continue
            top = sorted(logits[b, t].double().tolist(), reverse=True)[:k]
            z = sum(math.exp(v - top[0]) for v in top)
            probs = [math.exp(v - top[0]) / z for v in top]
            entropy = -sum(p * math.log(p) for p in probs)
            out[b, t] = (entropy / math.log(k)) ** alpha
    return out


@pytest.mark.parametrize("chunked", [False, True], ids=["logits", "chunked_loss"])
def test_eaft_weights_equal_a_float64_computation_with_padding_and_multi_turn(tiny_model_dir, chunked):
    batch = _batch(multi_turn=True)
    module = EAFTSFT(model=tiny_model_dir, alpha=0.5, chunked_loss=chunked, chunk_size=7)
    module.configure_model()
    selected = module.select_batch(batch)
    with torch.no_grad():
        _, logits = _logits(tiny_model_dir, batch)
    expected = _eaft_weights_float64(logits, batch["labels"], 20, 0.5)
    valid = batch["labels"][:, 1:] != -100
    assert (expected[valid] > 0).all() and (expected[valid] < 1).all()
    torch.testing.assert_close(selected.selection.weights.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(selected.selection.weights[~valid], torch.zeros(int((~valid).sum())))
    # the loss is the weights times the CE, over the response token count, and the weights carry no gradient
    ours = _module_loss(module, batch)
    model, logits = _logits(tiny_model_dir, batch)
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch["labels"][:, 1:].flatten(),
        reduction="none",
        ignore_index=-100,
    ).view(valid.shape)
    theirs = (ce * expected.float()).sum() / valid.sum()
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)
    for a, b in zip(_grads(ours, module.model), _grads(theirs, model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_eaft_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k="):
        EAFTSFT(k=1)
    with pytest.raises(ValueError, match="alpha="):
        EAFTSFT(alpha=0)


# ---------------------------------------------------------------------------------------------- ASFT


@pytest.fixture(scope="module")
def reference_dir(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_perturbed_copy(tiny_model_dir, tmp_path_factory.mktemp("asft") / "reference", seed=11)


def _kl_float64(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`sum_v p_ref (log p_ref - log p_theta)` per response position from the papers' formula, in float64."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits[:, :-1].double(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return kl * (labels[:, 1:] != -100)


def _asft_reference_loss(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, alpha: float):
    """The authors' `asft` mode (zhuchichi56/ASFT train_v2.py), reimplemented: `p.detach() * CE + alpha *
    kl_div(log_softmax(z), softmax(z_ref)).sum(-1)`, averaged over the response tokens."""
    z = logits[:, :-1].flatten(0, 1).float()
    targets = labels[:, 1:].flatten()
    valid = targets != -100
    ce = torch.nn.functional.cross_entropy(z, targets.clamp(min=0), reduction="none")
    p = torch.softmax(z, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1).detach()
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(z, -1),
        torch.softmax(ref_logits[:, :-1].flatten(0, 1).float(), -1),
        reduction="none",
    ).sum(-1)
    return (p * ce + alpha * kl)[valid].sum() / valid.sum()


@pytest.mark.parametrize("chunked", [False, True], ids=["logits", "chunked_loss"])
def test_asft_kl_loss_and_gradient_equal_float64_and_the_authors_formula(
    tiny_model_dir, reference_dir, chunked
):
    batch = _batch(multi_turn=True)
    module = ASFTSFT(
        model=tiny_model_dir,
        reference=FrozenModelReference(model=reference_dir),
        alpha=0.3,
        chunk_size=5,
        chunked_loss=chunked,
    )
    module.configure_model()
    selected = module.select_batch(batch)
    with torch.no_grad():
        _, ref_logits = _logits(reference_dir, batch)
        _, logits = _logits(tiny_model_dir, batch)
    expected = _kl_float64(logits, ref_logits, batch["labels"])
    valid = batch["labels"][:, 1:] != -100
    assert (expected[valid] > 1e-3).all()
    torch.testing.assert_close(selected.selection.scores["kl"].double(), expected, rtol=1e-5, atol=1e-6)
    ours = _module_loss(module, batch)
    model, logits = _logits(tiny_model_dir, batch)
    theirs = _asft_reference_loss(logits, ref_logits, batch["labels"], 0.3)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)
    for a, b in zip(_grads(ours, module.model), _grads(theirs, model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_kl_from_logits_with_any_incoming_gradient_equals_float64(dtype):
    """The logits path writes its gradient in the forward and scales it in the backward: with per-position
    incoming gradients (data weights), gaps inside a row's response span, and chunks that cut the spans,
    value and gradient equal autograd through the float64 formula; a second backward is refused."""
    from lit_tokensel.selection.weighting import ResponseLogits, kl_to_reference

    g = torch.Generator().manual_seed(0)
    B, T, V, H = 3, 9, 50, 8
    logits = (2 * torch.randn(B, T, V, generator=g)).to(dtype).requires_grad_(True)
    ref_hidden, ref_weight, ref_bias = (
        torch.randn(B, T, H, generator=g),
        torch.randn(V, H, generator=g),
        torch.randn(V),
    )
    valid = torch.zeros(B, T - 1, dtype=torch.bool)
    valid[0, 2:7] = True
    valid[1, 1:3] = valid[1, 5:8] = True  # a prompt gap inside the span
    incoming = torch.rand(B, T - 1, generator=g) * 3  # e.g. data weights times the coefficient
    kl = kl_to_reference(ResponseLogits(logits, valid), ref_hidden, ref_weight, ref_bias, chunk_size=2)
    z = logits.detach().double().requires_grad_(True)
    ref_logp = torch.log_softmax(
        torch.nn.functional.linear(ref_hidden.double(), ref_weight.double(), ref_bias.double()), -1
    )[:, :-1]
    expected = (ref_logp.exp() * (ref_logp - torch.log_softmax(z, -1)[:, :-1])).sum(-1) * valid
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(kl.double(), expected, **tolerance)
    (kl * incoming).sum().backward(retain_graph=True)
    (expected * incoming).sum().backward()
    assert logits.grad.dtype == dtype and float(z.grad.abs().max()) > 0.1
    torch.testing.assert_close(logits.grad.double(), z.grad, **tolerance)
    assert not logits.grad[2].any() and not logits.grad[1, 3:5].any()  # no response there: no gradient
    with pytest.raises(RuntimeError, match="backward ran twice"):
        (kl * incoming).sum().backward()


def test_asft_default_reference_is_the_base_and_adapter_off_under_lora(tiny_model_dir):
    batch = _batch()
    full = ASFTSFT(model=tiny_model_dir)
    assert (
        isinstance(full.reference, FrozenModelReference)
        and full.reference.model_name_or_path == tiny_model_dir
    )
    full.configure_model()
    torch.testing.assert_close(
        full.select_batch(batch).selection.scores["kl"],
        torch.zeros(4, batch["labels"].shape[1] - 1),
        atol=1e-6,
        rtol=0,
    )  # at the start the model is its own anchor
    lora = ASFTSFT(model=tiny_model_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), chunk_size=4)
    assert isinstance(lora.reference, AdapterDisabledReference)
    lora.configure_model()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora.model.parameters():
            if p.requires_grad:  # lora_B starts at zero: make the adapter change the output
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    selected = lora.select_batch(batch)
    with torch.no_grad():
        _, base_logits = _logits(tiny_model_dir, batch)
        adapted = lora.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = _kl_float64(adapted, base_logits, batch["labels"])
    assert float(expected.max()) > 1e-2
    torch.testing.assert_close(selected.selection.scores["kl"].double(), expected, rtol=1e-5, atol=1e-6)


def test_asft_accumulated_step_is_the_step_on_the_whole_batch(tiny_model_dir, reference_dir):
    batch = _batch()
    module = ASFTSFT(
        model=tiny_model_dir,
        reference=FrozenModelReference(model=reference_dir),
        alpha=0.5,
        optimizer=lambda p: torch.optim.SGD(p, lr=LR),
        lr_schedule="constant",
        warmup_ratio=0.0,
    )
    snapshots = _fit_halves(module, batch, accumulate=2)
    with torch.no_grad():
        _, ref_logits = _logits(reference_dir, batch)
    expected, loss = _sgd(
        tiny_model_dir,
        snapshots.before[0],
        lambda lg: _asft_reference_loss(lg, ref_logits, batch["labels"], 0.5),
        batch,
    )
    assert snapshots.metrics[1]["train/loss"] == pytest.approx(loss, abs=1e-6)
    valid = batch["labels"][:, 1:] != -100
    assert snapshots.metrics[1]["train/kl"] == pytest.approx(
        float(
            _kl_float64(_logits(tiny_model_dir, batch)[1].detach(), ref_logits, batch["labels"])[valid].mean()
        ),
        rel=1e-5,
    )
    for key, value in expected.items():
        torch.testing.assert_close(snapshots.after[1][key], value, rtol=1e-5, atol=1e-6)
