"""Self-evolving TokenCleaning: the chunk sampler, round scores against an independent computation, resume, misuse."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_tokensel import FullSFT
from lit_tokensel.cache import score_to_cache
from lit_tokensel.data import SFTDataModule
from lit_tokensel.data.chunks import ChunkSampler, chunk_partition, train_chunks
from lit_tokensel.methods.self_evolving import SelfEvolvingTokenCleaningSFT
from lit_tokensel.selection.token_loss import per_token_cross_entropy
from tests.model_fixtures import QUICKSTART_TRAIN

NUM_ROWS, CHUNKS, BATCH = 24, 3, 4  # 8 samples per chunk, 2 steps per round


# ---------------------------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize(("n", "chunks"), [(10, 3), (24, 3), (7, 7), (5, 1)])
def test_chunks_are_disjoint_cover_the_data_and_differ_in_size_by_at_most_one(n, chunks):
    parts = chunk_partition(n, chunks, seed=3)
    assert len(parts) == chunks
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # chunk 0 is the largest


def test_sampler_yields_chunk_e_mod_n_shuffled_and_reproducibly():
    sampler, again = ChunkSampler(10, 3, seed=7), ChunkSampler(10, 3, seed=7)
    parts = chunk_partition(10, 3, seed=7)
    orders = {}
    for epoch in range(6):
        sampler.set_epoch(epoch)
        again.set_epoch(epoch)
        orders[epoch] = list(sampler)
        assert sorted(orders[epoch]) == parts[epoch % 3].tolist()
        assert len(sampler) == len(parts[epoch % 3]) == len(orders[epoch])
        assert list(again) == orders[epoch] and list(sampler) == orders[epoch], (
            "order depends on (seed, epoch) only"
        )
    assert orders[0] != orders[3], "the same chunk is reshuffled when it comes round again"
    other = chunk_partition(10, 3, seed=8)
    assert any(a.tolist() != b.tolist() for a, b in zip(parts, other)), "membership is seeded"
    unshuffled = ChunkSampler(10, 3, seed=7, shuffle=False)
    assert list(unshuffled) == parts[0].tolist()


def test_chunk_misuse_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot split 4 training samples into 5"):
        chunk_partition(4, 5, seed=0)
    with pytest.raises(ValueError, match="epoch_chunks=0 must be an integer >= 1"):
        chunk_partition(4, 0, seed=0)
    with pytest.raises(ValueError, match="epoch_chunks must be None or an integer >= 1"):
        SFTDataModule(train_file="x.jsonl", epoch_chunks=0)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("self_evolving")
    rows = QUICKSTART_TRAIN.read_text().splitlines()[:NUM_ROWS]
    (path / "train.jsonl").write_text("\n".join(rows) + "\n")
    return path


def make_dm(model_dir: str, workdir: Path, **kwargs) -> SFTDataModule:
    kwargs.setdefault("epoch_chunks", CHUNKS)
    dm = SFTDataModule(
        train_file=str(workdir / "train.jsonl"),
        tokenizer=model_dir,
        batch_size=BATCH,
        max_length=96,
        cache_dir=str(workdir / "hf"),
        **kwargs,
    )
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def base_cache(tiny_model_dir: str, workdir: Path) -> str:
    dm = make_dm(tiny_model_dir, workdir, epoch_chunks=None)
    return str(
        score_to_cache(FullSFT(model=tiny_model_dir), dm, workdir / "base", shard_size=16, progress=False)
    )


def trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    kwargs.setdefault("max_epochs", CHUNKS)
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )


class Recorder(L.Callback):
    """Per epoch: the weights at its start, the sample ids it trained on, and the chunk's selection after
    the round's first and last optimizer step (a whole-chunk batch through `select_tokens`)."""

    def __init__(self) -> None:
        self.start_weights: dict[int, dict] = {}
        self.seen: dict[int, list[int]] = {}
        self.selections: dict[int, list] = {}
        self.rounds: dict[int, dict | None] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):  # runs before the module's hook
        epoch = trainer.current_epoch
        if epoch not in self.start_weights:
            self.start_weights[epoch] = {k: v.clone() for k, v in module.model.state_dict().items()}
        self.seen.setdefault(epoch, []).extend(batch["sample_id"].tolist())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rounds.setdefault(trainer.current_epoch, module.round)
        chunk = chunk_batch(trainer.datamodule, trainer.current_epoch % CHUNKS)
        valid = chunk["labels"][:, 1:] != -100
        selection = module.select_tokens(chunk, torch.zeros(valid.shape), valid)
        self.selections.setdefault(trainer.current_epoch, []).append((chunk, selection))


def chunk_batch(dm: SFTDataModule, chunk: int) -> dict[str, torch.Tensor]:
    return dm.train_collator([dm.train_dataset[i] for i in train_chunks(dm)[chunk].tolist()])


def independent_losses(model_dir: str, batch: dict, state: dict | None = None) -> torch.Tensor:
    """Per-token CE of a freshly loaded model (optionally with `state` loaded), full logits, eval mode."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if state is not None:
        model.load_state_dict(state)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_token_cross_entropy(logits, batch["labels"])[0]  # [B, T-1]


def top_ratio_by_sorting(
    scores: torch.Tensor, valid: torch.Tensor, ratio: float
) -> tuple[torch.Tensor, float]:
    ordered = sorted(scores[valid].tolist(), reverse=True)
    threshold = ordered[math.ceil(round(ratio * len(ordered), 9)) - 1]
    return (scores >= threshold) & valid, threshold


# ---------------------------------------------------------------------------------------------- the method


@pytest.fixture(scope="module")
def chunk_run(tiny_model_dir, base_cache, workdir, tmp_path_factory):
    """One fit of 3 rounds (scope chunk) with per-step checkpoints; returns (module, dm, recorder, ckpt dir)."""
    tmp = tmp_path_factory.mktemp("chunk_run")
    dm = make_dm(tiny_model_dir, workdir, cached_losses={"base": base_cache})
    module = SelfEvolvingTokenCleaningSFT(
        model=tiny_model_dir, chunks=CHUNKS, learning_rate=2e-2, lr_schedule="constant", warmup_ratio=0.0
    )
    recorder = Recorder()
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp / "ckpt", filename="{step}", save_top_k=-1, every_n_train_steps=1
    )
    fit = trainer(tmp, [recorder, checkpoints], log_every_n_steps=1)
    fit.fit(module, datamodule=dm)
    assert fit.global_step == fit.estimated_stepping_batches == CHUNKS * 2  # len(sampler) is the chunk's
    return module, dm, recorder, tmp / "ckpt"


def test_each_round_trains_on_its_chunk_only(chunk_run):
    module, dm, recorder, _ = chunk_run
    ids = np.asarray(dm.train_dataset["sample_id"])
    for epoch in range(CHUNKS):
        assert sorted(recorder.seen[epoch]) == sorted(ids[train_chunks(dm)[epoch]].tolist())


def test_round_zero_keeps_every_response_token(chunk_run):
    _, _, recorder, _ = chunk_run
    for chunk, selection in recorder.selections[0]:
        assert torch.equal(selection.keep, chunk["labels"][:, 1:] != -100)


@pytest.mark.parametrize("epoch", [1, 2])
def test_round_keeps_the_chunk_top_60_percent_by_base_minus_round_start_loss(
    chunk_run, tiny_model_dir, epoch
):
    module, _, recorder, _ = chunk_run
    (chunk, first), (_, last) = recorder.selections[epoch]
    # the reference is frozen for the round: a training step inside the round changes nothing
    assert torch.equal(first.keep, last.keep) and torch.equal(
        first.scores["influence"], last.scores["influence"]
    )
    # independent: fresh base and round-start models, full-logit CE, threshold by sorting the chunk's scores
    valid = chunk["labels"][:, 1:] != -100
    score = independent_losses(tiny_model_dir, chunk) - independent_losses(
        tiny_model_dir, chunk, recorder.start_weights[epoch]
    )
    torch.testing.assert_close(last.scores["influence"] * valid, score * valid, atol=1e-4, rtol=0)
    keep, threshold = top_ratio_by_sorting(score, valid, 0.6)
    near = (score - threshold).abs() < 1e-4
    assert torch.equal(last.keep & ~near, keep & ~near)
    assert last.diagnostics["round"] == epoch
    assert last.diagnostics["chunk_threshold"] == pytest.approx(threshold, abs=1e-4)
    assert abs(int(last.keep.sum()) - math.ceil(0.6 * int(valid.sum()))) <= int(near.sum())
    # the model did move during the round, so a live reference would have given other scores
    assert not torch.equal(
        recorder.start_weights[epoch]["lm_head.weight"], module.model.state_dict()["lm_head.weight"]
    )


def test_outside_training_other_chunks_keep_nothing_and_inside_training_they_are_an_error(chunk_run):
    module, dm, _, _ = chunk_run
    other = chunk_batch(dm, 0)  # the module's round is 2, over chunk 2
    valid = other["labels"][:, 1:] != -100
    module.eval()
    assert not module.select_tokens(other, torch.zeros(valid.shape), valid).keep.any()
    module.train()
    with pytest.raises(RuntimeError, match="samples of other chunks"):
        module.select_tokens(other, torch.zeros(valid.shape), valid)


def test_resume_at_a_round_boundary_rescores_and_mid_round_restores(
    chunk_run, tiny_model_dir, base_cache, workdir, tmp_path
):
    _, _, recorder, ckpt_dir = chunk_run
    reference_round = recorder.rounds[1]
    for step, expect_equal_weights in (
        (2, True),
        (3, False),
    ):  # step 2 ends round 0; step 3 is inside round 1
        module = SelfEvolvingTokenCleaningSFT(
            model=tiny_model_dir, chunks=CHUNKS, learning_rate=2e-2, lr_schedule="constant", warmup_ratio=0.0
        )
        resumed = Recorder()
        trainer(tmp_path / str(step), [resumed], max_steps=4).fit(
            module,
            datamodule=make_dm(tiny_model_dir, workdir, cached_losses={"base": base_cache}),
            ckpt_path=ckpt_dir / f"step={step}.ckpt",
        )
        weights_at_resume = resumed.start_weights[1]
        same = all(torch.equal(v, recorder.start_weights[1][k]) for k, v in weights_at_resume.items())
        assert same == expect_equal_weights
        got = resumed.rounds[1]
        assert got["epoch"] == 1 and torch.equal(got["sample_ids"], reference_round["sample_ids"])
        # boundary: rescored from the checkpoint (= the round-start model); mid-round: restored, not rescored
        # from the mid-round weights, so in both cases the round-start model's scores
        torch.testing.assert_close(got["scores"], reference_round["scores"], atol=1e-6, rtol=0)
        assert got["threshold"] == pytest.approx(reference_round["threshold"], abs=1e-6)


def test_sequence_scope_keeps_the_top_of_each_sample(tiny_model_dir, base_cache, workdir, tmp_path):
    module = SelfEvolvingTokenCleaningSFT(
        model=tiny_model_dir, chunks=CHUNKS, scope="sequence", learning_rate=2e-2
    )
    recorder = Recorder()
    trainer(tmp_path, [recorder], max_epochs=2).fit(
        module, datamodule=make_dm(tiny_model_dir, workdir, cached_losses={"base": base_cache})
    )
    chunk, selection = recorder.selections[1][-1]
    valid = chunk["labels"][:, 1:] != -100
    score = selection.scores["influence"]
    for row in range(valid.shape[0]):
        keep, _ = top_ratio_by_sorting(score[row : row + 1], valid[row : row + 1], 0.6)
        assert torch.equal(selection.keep[row], keep[0])
    assert "chunk_threshold" not in selection.diagnostics


# ---------------------------------------------------------------------------------------------- misuse


def test_scope_and_chunks_are_checked_at_construction():
    with pytest.raises(ValueError, match="TokenCleaningSFT \\(fixed-model cleaning\\)"):
        SelfEvolvingTokenCleaningSFT(scope="global")
    with pytest.raises(ValueError, match="chunks=0 must be an integer >= 1"):
        SelfEvolvingTokenCleaningSFT(chunks=0)


@pytest.mark.parametrize(
    ("dm_kwargs", "message"),
    [
        ({"epoch_chunks": 2}, r"DataModule has epoch_chunks=2\. Set `data.epoch_chunks: 3`"),
        ({"epoch_chunks": None}, r"DataModule has epoch_chunks=None"),
        ({"epoch_chunks": 3, "cached_losses": {}}, r"cached losses named 'base' in `data.cached_losses`"),
    ],
)
def test_mismatched_chunks_and_missing_base_cache_are_clear_errors(
    dm_kwargs, message, tiny_model_dir, base_cache, workdir, tmp_path
):
    dm_kwargs = {"cached_losses": {"base": base_cache}, **dm_kwargs}
    module = SelfEvolvingTokenCleaningSFT(model=tiny_model_dir, chunks=CHUNKS)
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, []).fit(module, datamodule=make_dm(tiny_model_dir, workdir, **dm_kwargs))
