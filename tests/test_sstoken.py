"""ssToken against independent computations: REL sign, the combined mask, warm-up, history schedule, resume."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_tokensel import SsTokenSFT
from lit_tokensel.data import SFTDataModule
from lit_tokensel.reference import FrozenModelReference, HistoryReference, ReferenceModel
from lit_tokensel.selection.scorers import minmax_per_sequence
from lit_tokensel.selection.token_loss import per_token_cross_entropy
from tests.model_fixtures import QUICKSTART_TRAIN, save_perturbed_copy


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sstoken")
    (path / "train.jsonl").write_text("\n".join(QUICKSTART_TRAIN.read_text().splitlines()[:16]) + "\n")
    return path


@pytest.fixture(scope="module")
def history_dir(tiny_model_dir: str, workdir: Path) -> str:
    """A perturbed copy of the tiny model standing in for the history."""
    return save_perturbed_copy(tiny_model_dir, workdir / "history", seed=3)


def _batch(model_dir: str, workdir: Path, size: int = 8) -> dict[str, torch.Tensor]:
    dm = SFTDataModule(
        train_file=str(workdir / "train.jsonl"),
        tokenizer=model_dir,
        batch_size=size,
        cache_dir=str(workdir / "hf"),
    )
    dm.setup("fit")
    return dm.collator([dm.train_dataset[i] for i in range(size)])


class ShiftedLosses(ReferenceModel):
    """History losses = the live model's losses, plus `delta` at one `[B, T-1]` entry."""

    def __init__(self, row: int, col: int, delta: float) -> None:
        self.row, self.col, self.delta = row, col, delta

    def token_losses(self, module, batch):
        with torch.no_grad():
            losses, valid = module.token_losses(batch)
        losses = losses.clone()
        losses[self.row, self.col] += self.delta
        return losses * valid


def _eager_prompt_attention(model_dir: str, batch: dict) -> torch.Tensor:
    """Last layer's eager attention mass on the prompt (label -100 tokens before the response), `[B, T-1]`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        probs = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True
        ).attentions[-1]  # [B, H, T, T]
    labels, mask = batch["labels"], batch["attention_mask"]
    out = torch.zeros(labels.shape[0], labels.shape[1] - 1)
    for b in range(labels.shape[0]):
        for j in range(labels.shape[1] - 1):
            query = j + 1
            if labels[b, query] == -100:
                continue
            prompt = [k for k in range(query) if labels[b, k] == -100 and mask[b, k] == 1]
            out[b, j] = probs[b, :, query, prompt].sum(-1).mean()
    return out


def test_rel_sign_a_token_learned_since_the_history_ranks_first(tiny_model_dir, workdir):
    batch = _batch(tiny_model_dir, workdir)
    valid = batch["labels"][:, 1:] != -100
    row, col = 2, int(valid[2].nonzero()[-2])
    module = SsTokenSFT(
        history=ShiftedLosses(row, col, delta=3.0), model=tiny_model_dir, gamma=1.0, ratio=0.01
    )
    module.configure_model()
    selected = module.select_batch(batch)
    assert selected.selection.keep[row].nonzero().flatten().tolist() == [col]  # L_his > L_theta there: kept
    rel = selected.selection.scores["rel"]
    assert rel[row, col] == pytest.approx(3.0, abs=1e-4) and rel[valid].abs().sort().values[-2] < 1e-4
    # with the opposite sign (history better than the model) the token ranks last instead
    module.history = ShiftedLosses(row, col, delta=-3.0)
    scores = module.select_batch(batch).selection.scores["sstoken"]
    assert scores[row, col] == scores[row][valid[row]].min()


def test_selection_mask_equals_an_independent_computation(tiny_model_dir, history_dir, workdir):
    batch = _batch(tiny_model_dir, workdir)
    ratio, gamma = 0.6, 0.5
    module = SsTokenSFT(
        history=FrozenModelReference(model=history_dir), model=tiny_model_dir, ratio=ratio, gamma=gamma
    )
    module.configure_model()
    module.eval()
    with torch.no_grad():
        keep = module.select_batch(batch).selection.keep

    def losses(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        with torch.no_grad():
            return per_token_cross_entropy(
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                batch["labels"],
            )[0]

    rel = losses(history_dir) - losses(tiny_model_dir)  # [B, T-1]
    attention = _eager_prompt_attention(tiny_model_dir, batch)
    valid = batch["labels"][:, 1:] != -100
    for b in range(rel.shape[0]):
        positions = valid[b].nonzero().flatten().tolist()
        values = [float(rel[b, t]) for t in positions]
        lo, hi = min(values), max(values)
        combined = [
            gamma * (v - lo) / (hi - lo + 1e-8) + (1 - gamma) * float(attention[b, t])
            for v, t in zip(values, positions)
        ]
        k = math.ceil(round(ratio * len(positions), 9))
        order = sorted(range(len(positions)), key=lambda i: (-combined[i], i))
        expected = {positions[i] for i in order[:k]}
        assert keep[b].nonzero().flatten().tolist() == sorted(expected), f"sample {b}"


def test_minmax_maps_each_sequence_to_unit_range_and_constant_rows_to_zero():
    scores = torch.tensor([[1.0, 3.0, 2.0, 9.0], [5.0, 5.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    out = minmax_per_sequence(scores, valid)
    torch.testing.assert_close(
        out, torch.tensor([[0.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]), atol=1e-6, rtol=0
    )


def test_invalid_settings_are_config_errors():
    with pytest.raises(ValueError, match="gamma=1.5"):
        SsTokenSFT(gamma=1.5)
    with pytest.raises(ValueError, match="ratio=0"):
        SsTokenSFT(ratio=0)
    with pytest.raises(ValueError, match="warmup_unit"):
        SsTokenSFT(warmup_unit="steps")


class _Recorder(L.Callback):
    def __init__(self) -> None:
        self.signals: list[set[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.signals.append({k for k in trainer.callback_metrics if k.startswith("select/rel")})


def _fit(model_dir, workdir, tmp_path, *, epochs, ckpt_in=None, ckpt_out=None, accumulate=1, callbacks=()):
    L.seed_everything(0)
    history = HistoryReference("ema", decay=0.5)
    module = SsTokenSFT(
        history=history,
        model=model_dir,
        learning_rate=1e-2,
        lr_schedule="constant",
        warmup_ratio=0.0,
        warmup=0.5,
    )
    dm = SFTDataModule(
        train_file=str(workdir / "train.jsonl"),
        tokenizer=model_dir,
        batch_size=4,
        cache_dir=str(workdir / "hf"),
        seed=0,
    )
    checkpointing = any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks)
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=accumulate,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_in)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    return module, history, trainer


def test_warmup_then_rel_and_history_updated_once_per_optimizer_step(tiny_model_dir, workdir, tmp_path):
    recorder = _Recorder()
    module, history, trainer = _fit(
        tiny_model_dir, workdir, tmp_path, epochs=1, accumulate=2, callbacks=[recorder]
    )
    assert trainer.global_step == 2 and history.updates == 2  # 4 micro-batches, 2 optimizer steps
    assert module.warmup_steps == 1  # warmup 0.5 of the first epoch's 2 steps
    assert recorder.signals[0] == recorder.signals[1] == set()  # step 0: attention only, no REL computed
    assert recorder.signals[-1] == {"select/rel_mean", "select/rel_spearman_neg_loss"}


def test_resume_reproduces_an_uninterrupted_run(tiny_model_dir, workdir, tmp_path):
    full, full_history, _ = _fit(tiny_model_dir, workdir, tmp_path, epochs=2)
    _fit(tiny_model_dir, workdir, tmp_path, epochs=1, ckpt_out=tmp_path / "one.ckpt")
    resumed, resumed_history, _ = _fit(
        tiny_model_dir, workdir, tmp_path, epochs=2, ckpt_in=tmp_path / "one.ckpt"
    )
    assert full_history.updates == resumed_history.updates == 8
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    for a, b in zip(resumed_history.shadow, full_history.shadow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_mid_epoch_resume_from_a_periodic_checkpoint_continues_exactly(tiny_model_dir, workdir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    periodic = ModelCheckpoint(
        dirpath=tmp_path / "ckpts", every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    full, full_history, _ = _fit(tiny_model_dir, workdir, tmp_path, epochs=2, callbacks=[periodic])
    # step 3 is mid-epoch 0 (4 batches per epoch); resume from it and finish both epochs
    resumed, resumed_history, _ = _fit(
        tiny_model_dir, workdir, tmp_path, epochs=2, ckpt_in=tmp_path / "ckpts" / "step=3.ckpt"
    )
    assert resumed_history.updates == full_history.updates == 8
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    for a, b in zip(resumed_history.shadow, full_history.shadow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_gamma_zero_selects_by_attention_alone_and_keeps_no_history(tiny_model_dir, workdir):
    batch = _batch(tiny_model_dir, workdir)
    module = SsTokenSFT(model=tiny_model_dir, gamma=0.0, ratio=0.5)
    module.configure_model()
    assert module.reference_models() == [] and module.configure_callbacks() == []
    module.eval()
    with torch.no_grad():
        selection = module.select_batch(batch).selection
    attention = _eager_prompt_attention(tiny_model_dir, batch)
    valid = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(selection.scores["sstoken"], attention * valid, atol=1e-5, rtol=0)
    for b in range(attention.shape[0]):
        positions = valid[b].nonzero().flatten().tolist()
        order = sorted(positions, key=lambda t: (-float(selection.scores["sstoken"][b, t]), t))
        assert selection.keep[b].nonzero().flatten().tolist() == sorted(
            order[: math.ceil(0.5 * len(positions))]
        )


# ------------------------------------------------------------------ warm-up length (issue 19)


@pytest.mark.parametrize(
    ("batches", "accumulate", "total", "unit", "expected"),
    [
        (15, 1, 40, "epoch", 3),  # max_steps=40 past the first epoch: 20% of its 15 steps
        (15, 1, 20, "epoch", 3),  # max_epochs=3 + max_steps=20
        (15, 1, 45, "epoch", 3),  # three full epochs
        (15, 1, 10, "epoch", 2),  # max_steps=10 ends training inside the first epoch: 20% of 10
        (30, 2, 40, "epoch", 3),  # 30 micro-batches, 2 per step: 15 optimizer steps per epoch
        (31, 2, 40, "epoch", 4),  # the incomplete last window also steps: 16 per epoch, ceil(3.2)
        (15, 1, 40, "training", 8),  # 20% of all 40 steps
    ],
)
def test_warmup_length_counts_optimizer_steps_of_the_first_epoch(batches, accumulate, total, unit, expected):
    from lit_tokensel.methods.sstoken import optimizer_steps_per_epoch, warmup_length

    epoch_steps = optimizer_steps_per_epoch(batches, accumulate)
    assert warmup_length(0.2, unit, total, epoch_steps) == expected
    assert warmup_length(
        0.2, "epoch", total, optimizer_steps_per_epoch(float("inf"), accumulate)
    ) == math.ceil(0.2 * total - 1e-9)  # epoch length unknown (iterable data): all training


class _WarmupRecorder(L.Callback):
    """`(global_step, in_warmup)` at every micro-batch."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append((trainer.global_step, pl_module.in_warmup()))


def _fit_warmup(
    model_dir, tmp_path, *, rows, batch_size, accumulate=1, max_epochs=None, max_steps=-1, **method
) -> tuple[SsTokenSFT, list[tuple[int, bool]]]:
    (tmp_path / "train.jsonl").write_text("\n".join(QUICKSTART_TRAIN.read_text().splitlines()[:rows]) + "\n")
    module = SsTokenSFT(model=model_dir, gamma=0.0, ratio=0.5, learning_rate=1e-3, warmup=0.2, **method)
    dm = SFTDataModule(
        train_file=str(tmp_path / "train.jsonl"),
        tokenizer=model_dir,
        batch_size=batch_size,
        cache_dir=str(tmp_path / "hf"),
        seed=0,
        max_length=64,
    )
    recorder = _WarmupRecorder()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=accumulate,
        default_root_dir=tmp_path,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=dm)
    return module, recorder.steps


def _warm_steps(steps: list[tuple[int, bool]]) -> list[int]:
    return sorted({step for step, warm in steps if warm})


def test_warmup_with_max_steps_is_a_fifth_of_the_real_first_epoch(tiny_model_dir, tmp_path):
    module, steps = _fit_warmup(tiny_model_dir, tmp_path, rows=15, batch_size=1, max_steps=40)
    assert (module.epoch_steps, module.warmup_steps, steps[-1][0]) == (15, 3, 39)
    assert _warm_steps(steps) == [0, 1, 2]  # was 8: all 40 steps taken as the epoch


def test_warmup_with_max_epochs_and_max_steps(tiny_model_dir, tmp_path):
    module, steps = _fit_warmup(tiny_model_dir, tmp_path, rows=15, batch_size=1, max_epochs=3, max_steps=20)
    assert (module.epoch_steps, module.warmup_steps, len(steps)) == (15, 3, 20)
    assert _warm_steps(steps) == [0, 1, 2]


def test_warmup_counts_optimizer_steps_under_accumulation(tiny_model_dir, tmp_path):
    module, steps = _fit_warmup(tiny_model_dir, tmp_path, rows=30, batch_size=1, accumulate=2, max_steps=20)
    assert (module.epoch_steps, module.warmup_steps) == (15, 3)
    assert [warm for _, warm in steps[:8]] == [True] * 6 + [False] * 2  # 3 steps = 6 micro-batches


def test_warmup_over_several_epochs_once_or_every_epoch(tiny_model_dir, tmp_path):
    module, steps = _fit_warmup(tiny_model_dir, tmp_path, rows=10, batch_size=1, max_epochs=3)
    assert (module.epoch_steps, module.warmup_steps, len(steps)) == (10, 2, 30)
    assert _warm_steps(steps) == [0, 1]
    module, steps = _fit_warmup(
        tiny_model_dir, tmp_path, rows=10, batch_size=1, max_epochs=3, warmup_every_epoch=True
    )
    assert _warm_steps(steps) == [0, 1, 10, 11, 20, 21]  # the released code's repeat
    _, steps = _fit_warmup(
        tiny_model_dir, tmp_path, rows=10, batch_size=1, max_epochs=3, warmup_unit="training"
    )
    assert _warm_steps(steps) == [0, 1, 2, 3, 4, 5]  # 20% of all 30 steps


def test_warmup_every_epoch_needs_the_epoch_unit():
    with pytest.raises(ValueError, match="warmup_every_epoch"):
        SsTokenSFT(warmup_every_epoch=True, warmup_unit="training")
