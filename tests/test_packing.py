"""Packed batches against padded batches of the same samples: losses, selections, one optimizer step,
ssToken's attention score, and the data side (best-fit decreasing, determinism, resume)."""

from __future__ import annotations

import json
from collections.abc import Callable

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lit_tokensel import FullSFT, Rho1SFT, TokenCleaningSFT
from lit_tokensel.data import SFTDataModule
from lit_tokensel.data.collate import DataCollatorForSFT
from lit_tokensel.data.packing import PackedCollatorForSFT, best_fit_decreasing, padding_fraction
from lit_tokensel.methods.asft import ASFTSFT
from lit_tokensel.methods.base import TokenSelectionModule
from lit_tokensel.methods.dft import DFTSFT
from lit_tokensel.methods.eaft import EAFTSFT
from lit_tokensel.methods.forgetting import ForgettingSFT
from lit_tokensel.methods.profit import ProFitSFT
from lit_tokensel.methods.qtuning import QTuningSFT
from lit_tokensel.methods.random_tokens import RandomTokenSFT
from lit_tokensel.methods.sstoken import SsTokenSFT
from lit_tokensel.modeling.attention_score import PromptAttentionScore
from lit_tokensel.modeling.forward import model_inputs, unflatten
from lit_tokensel.modeling.loading import LoraSettings
from lit_tokensel.reference import (
    AdapterDisabledReference,
    CachedReference,
    FrozenModelReference,
    HistoryReference,
)
from lit_tokensel.selection.segments import (
    PACKED_KEY,
    as_samples,
    drop_samples,
    layout_of,
    sample_view,
)
from lit_tokensel.selection.selectors import global_threshold
from tests.model_fixtures import save_perturbed_copy, setup_datamodule, synthetic_rows
from tests.test_attention_score import RAGGED, make_batch, make_models, reference_scores

ATOL = 1e-5
ROW = 40  # tokens per packed row in the synthetic batches


# ---------------------------------------------------------------------------------------------- data side
def test_best_fit_decreasing_pinned() -> None:
    # longest first: 7 -> bin0 (room 3), 6 -> bin1 (4), 4 -> bin1 (0, the tighter fit), 3 -> bin0 (0), 2 -> bin2
    assert best_fit_decreasing([3, 7, 2, 6, 4], 10) == [[1, 0], [3, 4], [2]]
    assert best_fit_decreasing([5, 5, 5], 5) == [[0], [1], [2]]  # ties: the earlier index first
    with pytest.raises(ValueError, match="item 1 has 11 tokens"):
        best_fit_decreasing([3, 11], 10)


def _features(n: int = 8, seed: int = 0) -> list[dict]:
    return [
        {"input_ids": ids, "labels": labels, "sample_id": 100 + i}
        for i, (ids, labels) in enumerate(synthetic_rows(n, 500, seed))
    ]


def _cached(features: list[dict], seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f["sample_id"]: rng.uniform(0, 8, len(f["input_ids"]) - 1).astype(np.float32) for f in features}


def _data_weights(features: list[dict], seed: int) -> dict[int, list[float]]:
    """Per-token data weights by sample id (index 0 unused, as `collect_token_weights` gives them): 0 (the
    token leaves the loss), 1, and a few other values; one sample has none (1 everywhere)."""
    rng = np.random.default_rng(seed)
    values = np.array([0.0, 1.0, 1.0, 0.5, 2.0, 3.0])
    return {f["sample_id"]: rng.choice(values, len(f["input_ids"])).tolist() for f in features[1:]}


def _collators(features: list[dict], weights: bool = False, **kwargs) -> tuple[dict, dict]:
    cached = {"reference": _cached(features, 1), "base": _cached(features, 2)}
    token_weights = _data_weights(features, 3) if weights else {}
    padded = DataCollatorForSFT(0, cached=cached, token_weights=token_weights)(features)
    packed = PackedCollatorForSFT(
        0, cached=cached, token_weights=token_weights, max_tokens_per_row=ROW, **kwargs
    )(features)
    return padded, packed


def test_packed_collator_rows_and_sample_view() -> None:
    features = _features()
    padded, packed = _collators(features)
    lengths = [len(f["input_ids"]) for f in features]
    R, T = packed["input_ids"].shape
    assert R == len(best_fit_decreasing(lengths, ROW)) < len(features) and T <= ROW
    assert padding_fraction(packed) < padding_fraction(padded)
    index = packed["sample_index"]
    for i, f in enumerate(features):
        r, c = (index == i).nonzero(as_tuple=True)
        assert len(set(r.tolist())) == 1 and c.tolist() == list(range(int(c[0]), int(c[0]) + lengths[i]))
        row, cols = int(r[0]), c
        assert packed["input_ids"][row, cols].tolist() == f["input_ids"]
        assert packed["position_ids"][row, cols].tolist() == list(range(lengths[i]))  # restart per sample
        assert packed["labels"][row, cols[1:]].tolist() == f["labels"][1:]
        assert int(packed["labels"][row, cols[0]]) == -100  # no target crosses a sample boundary
    assert (packed["attention_mask"] == (index >= 0)).all()
    # the sample view is the padded batch
    view = sample_view(packed)
    for key in ("labels", "attention_mask", "sample_id", "cached/reference", "cached/base"):
        assert torch.equal(
            view[key][:, 1:] if key == "labels" else view[key],
            padded[key][:, 1:] if key == "labels" else padded[key],
        ), key
    real = padded["attention_mask"].bool()
    assert torch.equal(view["input_ids"][real], padded["input_ids"][real])


def test_layout_round_trip_and_errors() -> None:
    _, packed = _collators(_features())
    layout = layout_of(packed)
    x = torch.randn(*packed["input_ids"].shape, 3)  # [R, T, 3]
    real = (packed["sample_index"] >= 0)[..., None]
    assert torch.equal(layout.to_rows(layout.to_samples(x)), x * real)
    y = torch.randn(packed["input_ids"].shape[0], packed["input_ids"].shape[1] - 1)  # [R, T-1] targets
    back = layout.to_rows(layout.to_samples(y))
    covered = (packed["sample_index"][:, 1:] >= 0) & (
        packed["sample_index"][:, 1:] == packed["sample_index"][:, :-1]
    )
    assert torch.equal(back[covered], y[covered])
    broken = dict(packed, sample_index=packed["sample_index"].clone())
    broken["sample_index"][0, 1] = int(broken["sample_index"][1, 0])  # sample split over two rows
    with pytest.raises(ValueError, match="contiguous"):
        layout_of(broken)


def test_drop_samples_compacts_rows() -> None:
    features = _features()
    padded, packed = _collators(features)
    keep = torch.tensor([True, False, True, False, False, True, False, True])
    dropped = drop_samples(packed, keep)
    assert dropped["sample_id"].tolist() == padded["sample_id"][keep].tolist()
    assert int(dropped["attention_mask"].sum()) == int(padded["attention_mask"][keep].sum())
    view = sample_view(dropped, layout_of(dropped, min_width=padded["input_ids"].shape[1]))
    assert torch.equal(view["labels"][:, 1:], padded["labels"][keep][:, 1:])
    assert torch.equal(view["cached/base"], padded["cached/base"][keep])


def test_packing_is_too_long_error() -> None:
    with pytest.raises(ValueError, match=r"sample 103 has 20 tokens, more than max_tokens_per_row=19"):
        PackedCollatorForSFT(0, max_tokens_per_row=19)(_features())


# ---------------------------------------------------------------------------------------------- forwards
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunked", [False, True])
def test_packed_token_losses_equal_padded(tiny_model_dir: str, attn: str, chunked: bool) -> None:
    padded, packed = _collators(_features())
    module = FullSFT(model=tiny_model_dir, attn_implementation=attn, chunked_loss=chunked)
    module.configure_model()
    module.eval()
    with torch.no_grad():
        ref, valid = module.token_losses(padded)  # [N, T-1]
        rows, row_valid = module.token_losses(packed)  # [R, T-1]
        view_losses, view_valid = module.token_losses(sample_view(packed))  # [N, T-1]
    assert torch.equal(view_valid, valid) and int(row_valid.sum()) == int(valid.sum())
    torch.testing.assert_close(view_losses, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(rows[row_valid].sum(), ref[valid].sum(), atol=1e-3, rtol=0)


def test_flattened_varlen_inputs_give_the_same_losses(tiny_model_dir: str) -> None:
    """FlashAttention's varlen path takes the rows as one `[1, R*T]` row; the same inputs through SDPA
    (transformers masks by the restarting positions) give the per-row losses."""
    _, packed = _collators(_features())
    module = FullSFT(model=tiny_model_dir)
    module.configure_model()
    model = module.model.eval()
    with torch.no_grad():
        rows = model(**model_inputs(model, packed, flatten=False)).logits  # [R, T, V]
        flat_inputs = model_inputs(model, packed, flatten=True)
        assert flat_inputs["input_ids"].shape == (1, packed["input_ids"].numel())
        flat = unflatten(model(**flat_inputs).logits, packed)  # [R, T, V]
    real = packed["attention_mask"].bool()
    torch.testing.assert_close(flat[real], rows[real], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- methods
@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A perturbed copy: a reference (Rho-1) or history (ssToken) that differs from the trained model."""
    return save_perturbed_copy(tiny_model_dir, tmp_path_factory.mktemp("other"), seed=1)


COMMON = {
    "lr_schedule": "constant",
    "warmup_ratio": 0.0,
    "optimizer": lambda params: torch.optim.SGD(params, lr=1.0),
}  # update = -normalised gradient
# DFT's weight is the target's probability, about 1/V = 1/500 on the random-init model: a larger step
# makes its update as large as the others' (so the 1e-5 comparison is as strict)
DFT_STEP = {**COMMON, "optimizer": lambda params: torch.optim.SGD(params, lr=300.0)}


def _with_threshold(module: TokenSelectionModule, padded: dict, ratio: float) -> TokenSelectionModule:
    """Global-scope methods: the threshold from these samples' cached scores (normally the whole dataset's)."""
    valid = padded["labels"][:, 1:] != -100
    scores = (padded["cached/base"] - padded["cached/reference"])[valid]
    module.prepare_selection = lambda datamodule: setattr(
        module, "threshold", global_threshold(scores, ratio)
    )
    return module


def _ema_with_history(model_dir: str) -> SsTokenSFT:
    module = SsTokenSFT(model=model_dir, history=HistoryReference("ema", 0.9), warmup=0.0, **COMMON)
    module.configure_model()
    torch.manual_seed(3)
    with torch.no_grad():  # a history that has moved away from the model, as after some steps
        for shadow in module.history.shadow:
            shadow.add_(0.3 * torch.randn_like(shadow))
    return module


def _lora_adapter_off(model_dir: str) -> SsTokenSFT:
    """ssToken with LoRA and the adapter-off base as history; the adapter moved off zero so they differ."""
    module = SsTokenSFT(
        model=model_dir,
        history=AdapterDisabledReference(),
        warmup=0.0,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        **COMMON,
    )
    torch.manual_seed(4)  # LoRA's A matrices are drawn at load time
    module.configure_model()
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.add_(0.3 * torch.randn_like(param))
    return module


def _asft_lora(model_dir: str) -> ASFTSFT:
    """ASFT with LoRA: the reference is the adapter-off base; the adapter moved off zero so they differ."""
    module = ASFTSFT(
        model=model_dir, alpha=0.5, chunk_size=7, lora=LoraSettings(r=4, alpha=8, dropout=0.0), **DFT_STEP
    )
    torch.manual_seed(4)
    module.configure_model()
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.add_(0.3 * torch.randn_like(param))
    return module


METHODS: dict[str, Callable[[str, str, dict], TokenSelectionModule]] = {
    "FullSFT": lambda d, o, p: FullSFT(model=d, **COMMON),
    "Random": lambda d, o, p: RandomTokenSFT(model=d, **COMMON),
    "Rho1 (cached)": lambda d, o, p: Rho1SFT(model=d, reference=CachedReference("reference"), **COMMON),
    "Rho1 (live, sequence)": lambda d, o, p: Rho1SFT(
        model=d, reference=FrozenModelReference(model=o), scope="sequence", **COMMON
    ),
    "TokenCleaning (global)": lambda d, o, p: _with_threshold(TokenCleaningSFT(model=d, **COMMON), p, 0.6),
    "Forgetting": lambda d, o, p: _with_threshold(ForgettingSFT(model=d, **COMMON), p, 0.7),
    "ssToken (EMA)": lambda d, o, p: _ema_with_history(d),
    "ssToken (frozen history, sink excluded)": lambda d, o, p: SsTokenSFT(
        model=d, history=FrozenModelReference(model=o), warmup=0.0, exclude_sink=True, **COMMON
    ),
    "ssToken (LoRA, adapter-off history)": lambda d, o, p: _lora_adapter_off(d),
    "Q-Tuning": lambda d, o, p: QTuningSFT(model=d, sample_ratio=0.5, **COMMON),
    "ProFit": lambda d, o, p: ProFitSFT(model=d, tau=0.002, **COMMON),
    # token-weighting losses: per-token weights from the training forward's logits (chunks of 7 positions,
    # so a sample's span is cut in several chunks), ASFT's KL against a reference run on the same rows
    "DFT": lambda d, o, p: DFTSFT(model=d, **DFT_STEP),
    "EAFT": lambda d, o, p: EAFTSFT(model=d, chunk_size=7, **COMMON),
    "EAFT (chunked_loss)": lambda d, o, p: EAFTSFT(model=d, chunk_size=7, chunked_loss=True, **COMMON),
    "ASFT (frozen reference)": lambda d, o, p: ASFTSFT(
        model=d, reference=FrozenModelReference(model=o), alpha=0.5, chunk_size=7, **DFT_STEP
    ),
    "ASFT (frozen reference, chunked_loss)": lambda d, o, p: ASFTSFT(
        model=d,
        reference=FrozenModelReference(model=o),
        alpha=0.5,
        chunk_size=7,
        chunked_loss=True,
        **DFT_STEP,
    ),
    "ASFT (LoRA, adapter-off reference)": lambda d, o, p: _asft_lora(d),
}
WEIGHTED = (
    "FullSFT",
    "Rho1 (cached)",
    "ssToken (EMA)",
    "Q-Tuning",
    "DFT",
    "EAFT",
    "ASFT (frozen reference)",
    "ASFT (LoRA, adapter-off reference)",
)
"""Methods also checked with weights from the data on the samples."""


def _one_step(module: TokenSelectionModule, batch: dict) -> tuple[list, dict[str, torch.Tensor]]:
    """One optimizer step on `batch` through Lightning; the selections made and the parameter update."""
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    seen = []
    select = module.select_batch

    def record(b):
        seen.append(select(b))
        return seen[-1]

    module.select_batch = record
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    update = {n: p.detach() - before[n] for n, p in module.model.named_parameters()}
    return seen, update


@pytest.mark.parametrize(
    ("method", "weights"),
    [(m, False) for m in METHODS] + [(m, True) for m in WEIGHTED],
    ids=[*METHODS, *(f"{m}, data weights" for m in WEIGHTED)],
)
def test_method_packed_equals_padded(
    method: str, weights: bool, tiny_model_dir: str, other_model_dir: str
) -> None:
    padded, packed = _collators(_features(), weights=weights)
    make = METHODS[method]
    (sel_padded,), update_padded = _one_step(make(tiny_model_dir, other_model_dir, padded), padded)
    (sel_packed,), update_packed = _one_step(make(tiny_model_dir, other_model_dir, padded), packed)
    assert PACKED_KEY in sel_packed.batch  # the packed path ran
    if sel_padded.samples is not None:
        assert torch.equal(sel_padded.samples, sel_packed.samples)
    assert torch.equal(sel_padded.valid, sel_packed.valid)
    torch.testing.assert_close(sel_packed.token_losses, sel_padded.token_losses, atol=ATOL, rtol=0)
    keep_padded = sel_padded.selection.keep & sel_padded.valid
    keep_packed = sel_packed.selection.keep & sel_packed.valid
    assert torch.equal(keep_packed, keep_padded)
    assert 0 < int(keep_padded.sum()) <= int(sel_padded.valid.sum())
    for name, score in sel_padded.selection.scores.items():
        valid = sel_padded.valid
        # rtol: Q-Tuning's scores are perplexities (hundreds on the tiny model), where float32's summation
        # order alone moves them by a few ulps (2.2e-7 relative seen on one CPU)
        torch.testing.assert_close(
            sel_packed.selection.scores[name][valid], score[valid], atol=1e-4, rtol=1e-6
        )
    if sel_padded.selection.weights is not None:
        torch.testing.assert_close(
            sel_packed.selection.weights, sel_padded.selection.weights, atol=ATOL, rtol=0
        )
    assert sel_packed.selection.terms.keys() == sel_padded.selection.terms.keys()
    for name, term in sel_padded.selection.terms.items():  # ASFT's KL, Forgetting's ascent
        other = sel_packed.selection.terms[name]
        assert torch.equal(other.mask & sel_packed.valid, term.mask & sel_padded.valid)
        if term.losses is not None:
            torch.testing.assert_close(other.losses, term.losses, atol=ATOL, rtol=0)
    if weights:  # the data weights reach the same tokens, and 0 takes a token out of the count
        assert torch.equal(sel_packed.data_weights, sel_padded.data_weights)
        response = sel_padded.batch["labels"][:, 1:] != -100
        assert torch.equal(sel_padded.valid, response & (sel_padded.data_weights != 0))
        assert int(sel_padded.valid.sum()) < int(response.sum())
    moved = max(float(u.abs().max()) for u in update_padded.values())
    assert moved > 1e-3  # the step did something
    for name, u in update_padded.items():
        torch.testing.assert_close(update_packed[name], u, atol=ATOL, rtol=0, msg=name)


def test_selection_is_not_trivial_where_it_should_not_be(tiny_model_dir: str, other_model_dir: str) -> None:
    """The equality above is not vacuous: the scored methods drop tokens on these samples."""
    padded, _ = _collators(_features())
    for method in ("Random", "Rho1 (cached)", "ssToken (EMA)", "Q-Tuning"):
        module = METHODS[method](tiny_model_dir, other_model_dir, padded)
        module.configure_model()
        module.eval()
        with torch.no_grad():
            selected = module.select_batch(padded)
        assert int((selected.selection.keep & selected.valid).sum()) < int(
            (padded["labels"][:, 1:] != -100).sum()
        )


def test_validation_and_predict_accept_packed(tiny_model_dir: str) -> None:
    padded, packed = _collators(_features())
    module = FullSFT(model=tiny_model_dir)
    module.configure_model()
    module.eval()
    with torch.no_grad():
        for batch in (padded, packed):
            module.validation_step(batch, 0)
            loss = module.val_loss.compute()
            module.val_loss.reset()
            if batch is padded:
                ref = loss
        torch.testing.assert_close(loss, ref, atol=ATOL, rtol=0)
        a, b = module.predict_step(padded, 0), module.predict_step(packed, 0)
    assert torch.equal(a["sample_id"], b["sample_id"]) and torch.equal(a["valid"], b["valid"])
    torch.testing.assert_close(b["token_losses"], a["token_losses"], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- attention score
def _pack(samples: list[list[tuple[str, int]]], capacity: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """Packed rows of the attention test's samples, and each sample alone as an unpadded batch."""
    padded, _ = make_batch(samples, "right", seed)
    lengths = padded["attention_mask"].sum(1).tolist()
    features = [
        {
            "input_ids": padded["input_ids"][i, :n].tolist(),
            "labels": padded["labels"][i, :n].tolist(),
            "sample_id": i,
        }
        for i, n in enumerate(lengths)
    ]
    alone = [
        {k: v[i : i + 1, :n] for k, v in padded.items() if k != "sample_id"} for i, n in enumerate(lengths)
    ]
    return PackedCollatorForSFT(0, max_tokens_per_row=capacity)(features), alone


def _packed_attention(model: torch.nn.Module, packed: dict, **kwargs) -> torch.Tensor:
    scorer = PromptAttentionScore(model, **kwargs)
    with scorer.capture(packed), torch.no_grad():
        model(**model_inputs(model, packed))
    return layout_of(packed).to_samples(scorer.scores)  # [N, L-1]


@pytest.mark.parametrize("exclude_sink", [False, True])
@pytest.mark.parametrize("arch", ["llama", "mistral-window"])
def test_packed_attention_equals_eager_on_each_sample_alone(arch: str, exclude_sink: bool) -> None:
    sdpa, eager = make_models(arch)
    packed, alone = _pack(RAGGED, capacity=24)
    assert packed["input_ids"].shape[0] < len(RAGGED)  # several samples share a row
    scores = _packed_attention(sdpa, packed, layer=-1, exclude_sink=exclude_sink)
    for i, single in enumerate(alone):
        n = single["input_ids"].shape[1]
        spans = [[(kind, s, e) for kind, s, e in _spans_of(RAGGED[i])]]
        ref = reference_scores(eager, single, spans, -1, exclude_sink=exclude_sink)[0]  # [n-1]
        torch.testing.assert_close(scores[i, : n - 1], ref, atol=ATOL, rtol=0)
        assert float(ref.abs().max()) > 0.05


def _spans_of(sample: list[tuple[str, int]]) -> list[tuple[str, int, int]]:
    spans, pos = [], 0
    for kind, n in sample:
        spans.append((kind, pos, pos + n))
        pos += n
    return spans


def test_packed_attention_does_not_leak_across_samples() -> None:
    sdpa, _ = make_models("llama")
    packed, _ = _pack(RAGGED, capacity=24)
    base = _packed_attention(sdpa, packed)
    other, _ = _pack(RAGGED, capacity=24, seed=5)  # every token changes ...
    mine = packed["sample_index"] == 2  # ... except sample 2's
    changed = dict(other)
    changed["input_ids"] = torch.where(mine, packed["input_ids"], other["input_ids"])
    row = int(mine.nonzero()[0, 0])
    assert int((packed["sample_index"][row] >= 0).sum()) > int(mine.sum())  # sample 2 shares its row
    moved = _packed_attention(sdpa, changed)
    torch.testing.assert_close(moved[2], base[2], atol=1e-6, rtol=0)
    others = [i for i in range(len(RAGGED)) if i != 2]
    assert float((moved[others] - base[others]).abs().max()) > 1e-3  # the change did reach the others


# ---------------------------------------------------------------------------------------------- datamodule
def _rows(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    return [
        {
            "messages": [
                {"role": "user", "content": " ".join(rng.choice(words, 2 + i % 5))},
                {"role": "assistant", "content": " ".join(rng.choice(words, 1 + (7 * i) % 13))},
            ]
        }
        for i in range(n)
    ]


@pytest.fixture
def packed_dm(tiny_model_dir: str, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(40)))
    return lambda **kw: setup_datamodule(tiny_model_dir, tmp_path, **kw)


def _epoch(dm, epoch: int) -> list[dict]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_datamodule_packing_is_deterministic_and_matches_padded(packed_dm) -> None:
    padded_dm, dm = packed_dm(max_length=96), packed_dm(max_length=96, packing=True)
    first, again = _epoch(dm, 1), _epoch(packed_dm(max_length=96, packing=True), 1)
    for a, b in zip(first, again, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    padded = _epoch(padded_dm, 1)
    assert [b["sample_id"].tolist() for b in first] == [b["sample_id"].tolist() for b in padded]
    for p, q in zip(padded, first, strict=True):
        assert torch.equal(as_samples(q)["labels"][:, 1:], p["labels"][:, 1:])
    assert sum(padding_fraction(b) for b in first) < sum(padding_fraction(b) for b in padded)
    assert [b["sample_id"].tolist() for b in _epoch(dm, 2)] != [b["sample_id"].tolist() for b in first]


def test_datamodule_packing_resume_mid_epoch_is_exact(packed_dm) -> None:
    dm = packed_dm(max_length=96, packing=True)
    full = _epoch(dm, 1)
    resumed = packed_dm(max_length=96, packing=True)
    resumed._resume_state = (
        1,
        2 * resumed.batch_size,
    )  # what a checkpoint after 2 batches of epoch 1 restores
    rest = _epoch(resumed, 1)
    assert len(rest) == len(full) - 2
    for a, b in zip(full[2:], rest, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_inspect_and_score_accept_packed(packed_dm, tiny_model_dir: str, tmp_path) -> None:
    from lit_tokensel.cache.scoring import score_to_cache
    from lit_tokensel.cache.store import TokenLossCache
    from lit_tokensel.inspection import inspect_selection

    outputs = {}
    for packing in (False, True):
        module = RandomTokenSFT(model=tiny_model_dir)
        dm = packed_dm(max_length=96, packing=packing)
        path = inspect_selection(module, dm, tmp_path / f"inspect_{packing}.jsonl", limit=12, progress=False)
        records = [json.loads(line) for line in path.read_text().splitlines()]
        cache = TokenLossCache(score_to_cache(module, dm, tmp_path / f"cache_{packing}", progress=False))
        outputs[packing] = (records, {sid: np.asarray(cache[sid]) for sid in range(40)})
    (rec_a, cache_a), (rec_b, cache_b) = outputs[False], outputs[True]
    assert [r["sample_id"] for r in rec_a] == [r["sample_id"] for r in rec_b] == list(range(12))
    for a, b in zip(rec_a, rec_b, strict=True):
        assert a["keep"] == b["keep"] and a["positions"] == b["positions"]
        np.testing.assert_allclose(b["loss"], a["loss"], atol=ATOL)
    for sid, row in cache_a.items():
        np.testing.assert_allclose(cache_b[sid], row, atol=ATOL)


def _weighted_rows(n: int) -> list[dict]:
    """`_rows` with weights from the data: a turn weighted 0, turns weighted 0.5, character spans."""
    rows = _rows(n)
    for i, row in enumerate(rows):
        answer = row["messages"][1]
        if i % 4 == 1:
            answer["weight"] = 0
        elif i % 4 == 2:
            answer["weight"], answer["weights"] = 0.5, [[0, min(5, len(answer["content"])), 3.0]]
        elif i % 4 == 3:
            answer["weights"] = [[1, len(answer["content"]), 2.0]]
    return rows


def test_data_weights_on_packed_rows_land_on_the_same_tokens(tiny_model_dir: str, tmp_path) -> None:
    """Weights from the data, packed: each sample's (target token, weight) pairs read off the packed rows are
    the padded batch's; the sample view carries them per sample; `inspect` shows the same weights."""
    from lit_tokensel.inspection import inspect_selection

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _weighted_rows(24)))
    padded_dm = setup_datamodule(tiny_model_dir, tmp_path, max_length=96)
    packed_dm = setup_datamodule(
        tiny_model_dir, tmp_path, max_length=96, packing=True, packing_row_tokens=192
    )
    weighted = 0
    for padded, packed in zip(_epoch(padded_dm, 0), _epoch(packed_dm, 0), strict=True):
        assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # samples share rows
        view = sample_view(packed)
        assert torch.equal(view["token_weights"], padded["token_weights"])
        rows_weights = layout_of(packed).to_rows(packed["token_weights"], -1.0)  # [R, T-1]
        for i in range(padded["sample_id"].shape[0]):
            index = packed["sample_index"]
            here = (index[:, 1:] == i) & (index[:, :-1] == i)  # [R, T-1] targets of sample i, in row order
            response = padded["labels"][i, 1:] != -100
            pairs_packed = list(
                zip(packed["labels"][:, 1:][here].tolist(), rows_weights[here].tolist(), strict=True)
            )
            pairs_padded = list(
                zip(padded["labels"][i, 1:].tolist(), padded["token_weights"][i].tolist(), strict=True)
            )[: len(pairs_packed)]
            assert pairs_packed == pairs_padded
            weighted += int((padded["token_weights"][i][response] != 1).sum())
    assert weighted > 20  # the weights are not all 1
    outputs = []
    for dm in (padded_dm, packed_dm):
        path = inspect_selection(
            FullSFT(model=tiny_model_dir),
            dm,
            tmp_path / f"inspect_{dm.packing}.jsonl",
            limit=16,
            progress=False,
        )
        outputs.append([json.loads(line) for line in path.read_text().splitlines()])
    for a, b in zip(*outputs, strict=True):
        assert (a["sample_id"], a["keep"], a["data_weight"]) == (b["sample_id"], b["keep"], b["data_weight"])
        np.testing.assert_allclose(b["weight"], a["weight"], atol=ATOL)
    assert any(0.0 in r["data_weight"] for r in outputs[0]) and any(
        1.5 in r["data_weight"] for r in outputs[0]
    )


def test_default_rows_are_as_wide_as_the_longest_sample(packed_dm) -> None:
    features = _features()
    packed = PackedCollatorForSFT(0)(features)  # max_tokens_per_row=None
    longest = max(len(f["input_ids"]) for f in features)
    assert packed["input_ids"].shape == (
        len(best_fit_decreasing([len(f["input_ids"]) for f in features], longest)),
        longest,
    )
    assert packed["input_ids"].shape[0] < len(features)
    with pytest.raises(ValueError, match="packing_row_tokens=64 must be >= max_length=96"):
        packed_dm(max_length=96, packing=True, packing_row_tokens=64)
    dm = packed_dm(max_length=96, packing=True, packing_row_tokens=200)
    assert all(b["input_ids"].shape[1] <= 200 for b in _epoch(dm, 0))


def test_flattened_varlen_path_through_the_attention_hook(
    tiny_model_dir: str, other_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With FlashAttention the rows go as one `[1, R*T]` row; the same path forced onto SDPA gives ssToken
    the same selection (the attention hook folds the flat row back into the rows)."""
    padded, packed = _collators(_features())
    module = SsTokenSFT(model=tiny_model_dir, history=FrozenModelReference(model=other_model_dir), warmup=0.0)
    module.configure_model()
    module.eval()
    with torch.no_grad():
        ref = module.select_batch(padded)
        monkeypatch.setattr("lit_tokensel.modeling.forward.uses_varlen_attention", lambda model: True)
        flat = module.select_batch(packed)
    torch.testing.assert_close(flat.token_losses, ref.token_losses, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        flat.selection.scores["attention"], ref.selection.scores["attention"], atol=ATOL, rtol=0
    )
    assert torch.equal(flat.selection.keep, ref.selection.keep)


# ---------------------------------------------------------------------------------------------- training runs
def _fit_sstoken(model_dir: str, data_dir, root, *, packing: bool, ckpt_in=None, callbacks=()):
    """ssToken (EMA history, attention score) for 2 epochs of 4 batches through the DataModule."""
    L.seed_everything(0)
    history = HistoryReference("ema", decay=0.5)
    module = SsTokenSFT(
        history=history,
        model=model_dir,
        learning_rate=1e-2,
        lr_schedule="constant",
        warmup_ratio=0.0,
        warmup=0.25,
    )
    dm = SFTDataModule(
        train_file=str(data_dir / "train.jsonl"),
        tokenizer=model_dir,
        batch_size=4,
        cache_dir=str(data_dir / "hf"),
        seed=0,
        max_length=96,
        packing=packing,
    )
    checkpointing = bool(callbacks)
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=list(callbacks),
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_in)
    return module, history


@pytest.fixture(scope="module")
def run_data(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("packed_runs")
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(16)))
    return path


def test_packed_training_run_equals_padded_and_resumes_exactly(
    tiny_model_dir: str, run_data, tmp_path
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    padded, padded_history = _fit_sstoken(tiny_model_dir, run_data, tmp_path / "a", packing=False)
    periodic = ModelCheckpoint(
        dirpath=tmp_path / "ckpts", every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    packed, packed_history = _fit_sstoken(
        tiny_model_dir, run_data, tmp_path / "b", packing=True, callbacks=[periodic]
    )
    # step 3 is mid-epoch 0 (4 batches per epoch): resume from it and finish both epochs
    resumed, resumed_history = _fit_sstoken(
        tiny_model_dir, run_data, tmp_path / "c", packing=True, ckpt_in=tmp_path / "ckpts" / "step=3.ckpt"
    )
    assert packed_history.updates == resumed_history.updates == padded_history.updates == 8
    for key, value in packed.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(value, padded.model.state_dict()[key], rtol=0, atol=1e-4)
    for a, b in zip(resumed_history.shadow, packed_history.shadow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
