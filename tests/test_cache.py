"""Token-loss cache: scoring pass, resume, fingerprint checks, corrupted shards, and the join into shuffled batches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_tokensel import FullSFT
from lit_tokensel.cache import (
    CacheError,
    FingerprintMismatchError,
    TokenLossCache,
    TokenLossCacheWriter,
    score_to_cache,
)
from lit_tokensel.cache.store import MANIFEST
from lit_tokensel.cli import main
from lit_tokensel.data import SFTDataModule

NUM_ROWS = 18
SHARD_SIZE = 5  # 4 shards: 5, 5, 5, 3 samples


def rows(n: int = NUM_ROWS, offset: int = 0) -> list[dict]:
    return [
        {
            "prompt": f"What is {i + offset} plus {i}?" + " Think." * (i % 4),
            "completion": "Answer: " + "ab " * (1 + i % 5),
        }
        for i in range(n)
    ]


def write_rows(path: Path, data: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def train_file(workdir: Path) -> str:
    return write_rows(workdir / "train.jsonl", rows())


def make_dm(model_dir: str, train_file: str, workdir: Path, **kwargs) -> SFTDataModule:
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("max_length", 64)
    return SFTDataModule(train_file=train_file, tokenizer=model_dir, cache_dir=str(workdir / "hf"), **kwargs)


@pytest.fixture(scope="module")
def module(tiny_model_dir: str) -> FullSFT:
    module = FullSFT(model=tiny_model_dir)
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def scored(module, tiny_model_dir, train_file, workdir) -> Path:
    """A complete cache of the train split."""
    dm = make_dm(tiny_model_dir, train_file, workdir)
    return score_to_cache(module, dm, workdir / "scored", shard_size=SHARD_SIZE, progress=False)


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_cached_losses_equal_live_losses_on_shuffled_batches(
    module, scored, tiny_model_dir, train_file, workdir
):
    cache = TokenLossCache(scored)
    assert cache.complete and len(cache.rows) == NUM_ROWS and cache.split == "train"
    assert cache.model_fingerprint.startswith(f"{tiny_model_dir}@")
    dm = make_dm(tiny_model_dir, train_file, workdir, cached_losses={"ref": str(scored)})
    dm.setup("fit")
    seen = []
    module.eval()
    for batch in dm.train_dataloader():
        cached = batch["cached/ref"]  # [B, T-1]
        assert cached.dtype == torch.float32 and cached.shape == batch["labels"][:, 1:].shape
        with torch.no_grad():
            live, valid = module.token_losses(batch)
        torch.testing.assert_close(cached, live, atol=1e-6, rtol=0)
        assert (cached[batch["attention_mask"][:, 1:] == 0] == 0).all()  # padding
        assert (cached[~valid] == 0).all() and (cached[valid] > 0).all()
        seen += batch["sample_id"].tolist()
    assert sorted(seen) == list(range(NUM_ROWS)) and seen != sorted(seen), "shuffling must stay on"
    assert "cached/ref" not in dm.collator([dm.train_dataset[0]]), "the eval collator does not join"


def test_resume_skips_finished_shards(module, scored, tiny_model_dir, train_file, workdir, monkeypatch):
    out = workdir / "resumed"
    dm = make_dm(tiny_model_dir, train_file, workdir)
    score_to_cache(module, dm, out, shard_size=SHARD_SIZE, max_shards=2, progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert [s["index"] for s in manifest["shards"]] == [0, 1] and manifest["num_shards"] == 4
    with pytest.raises(CacheError, match="incomplete: 2 of 4"):
        TokenLossCache(out).verify(dm.loss_cache_fingerprint(), "train")
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}

    scored_ids: list[int] = []
    live = module.token_losses

    def counting(batch):
        scored_ids.extend(batch["sample_id"].tolist())
        return live(batch)

    monkeypatch.setattr(module, "token_losses", counting)
    score_to_cache(
        module, make_dm(tiny_model_dir, train_file, workdir), out, shard_size=SHARD_SIZE, progress=False
    )
    assert scored_ids == list(range(10, NUM_ROWS)), "only the two unfinished shards are scored"
    assert {n: (out / n).stat().st_mtime_ns for n in mtimes} == mtimes
    resumed, full = TokenLossCache(out).rows, TokenLossCache(scored).rows
    assert resumed.keys() == full.keys()
    for sid in full:
        np.testing.assert_array_equal(resumed[sid], full[sid])


@pytest.mark.parametrize(
    ("part", "kwargs"),
    [
        ("data", {"train_file": "other"}),
        ("max_length", {"max_length": 48}),
        ("train_on", {"train_on": "last_turn"}),
        (
            "tokenizer",
            {
                "chat_template": "{% for m in messages %}{{ m['role'] + ': ' }}"
                "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
                "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}",
                "override_chat_template": True,
            },
        ),
    ],
)
def test_fingerprint_mismatch_names_the_part(part, kwargs, scored, tiny_model_dir, train_file, workdir):
    if kwargs.get("train_file") == "other":
        kwargs = {"train_file": write_rows(workdir / "other.jsonl", rows(offset=100))}
    kwargs = {"train_file": train_file, **kwargs}
    dm = SFTDataModule(
        tokenizer=tiny_model_dir,
        cache_dir=str(workdir / "hf"),
        batch_size=4,
        cached_losses={"ref": str(scored)},
        **{"max_length": 64, **kwargs},
    )
    with pytest.raises(FingerprintMismatchError, match=rf"{part}: cache has") as info:
        dm.setup("fit")
    assert set(info.value.parts) == {part}
    assert str(scored) in str(info.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_shard_is_a_clear_error(damage, scored, tiny_model_dir, train_file, workdir, tmp_path):
    cache_dir = Path(shutil.copytree(scored, tmp_path / "copy"))
    shard = cache_dir / "shard-00001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(b"not parquet at all" * 10 if damage == "garbage" else data[: len(data) - 50])
    dm = make_dm(tiny_model_dir, train_file, workdir, cached_losses={"ref": str(cache_dir)})
    with pytest.raises(CacheError, match=r"shard .*shard-00001\.parquet is corrupted or truncated.*Delete"):
        dm.setup("fit")


def test_damaged_shard_is_rescored_after_deleting_it(
    module, scored, tiny_model_dir, train_file, workdir, tmp_path
):
    cache_dir = Path(shutil.copytree(scored, tmp_path / "copy"))
    (cache_dir / "shard-00002.parquet").write_bytes(b"garbage")
    dm = make_dm(tiny_model_dir, train_file, workdir)
    with pytest.raises(CacheError, match="shard-00002.parquet is corrupted"):
        score_to_cache(module, dm, cache_dir, shard_size=SHARD_SIZE, progress=False)
    (cache_dir / "shard-00002.parquet").unlink()
    score_to_cache(module, dm, cache_dir, shard_size=SHARD_SIZE, progress=False)
    np.testing.assert_array_equal(TokenLossCache(cache_dir)[12], TokenLossCache(scored)[12])


def _write_cache(path: Path, dm: SFTDataModule, drop: int | None = None, stretch: int | None = None) -> None:
    """A cache with this DataModule's fingerprint, zeros as losses; sample `drop` left out, `stretch` one too long."""
    dataset = dm.train_dataset
    writer = TokenLossCacheWriter(
        path, {**dm.loss_cache_fingerprint(), "model": "fake@0"}, "train", 100, len(dataset)
    )
    ids, losses = [], []
    for sample in dataset:
        if sample["sample_id"] == drop:
            continue
        n = len(sample["input_ids"]) - 1 + (sample["sample_id"] == stretch)
        ids.append(sample["sample_id"])
        losses.append(np.zeros(n, dtype=np.float32))
    writer.write_shard(0, ids, losses)


def test_missing_sample_id_and_wrong_length_are_errors(tiny_model_dir, train_file, workdir, tmp_path):
    dm = make_dm(tiny_model_dir, train_file, workdir)
    dm.setup_data()
    _write_cache(tmp_path / "missing", dm, drop=7)
    _write_cache(tmp_path / "long", dm, stretch=3)
    with pytest.raises(CacheError, match=rf"sample_id 7 is not in token-loss cache {tmp_path / 'missing'}"):
        make_dm(tiny_model_dir, train_file, workdir, cached_losses={"ref": str(tmp_path / "missing")}).setup(
            "fit"
        )
    with pytest.raises(CacheError, match=r"sample_id 3: .* has \d+ losses, but the sample has \d+ tokens"):
        make_dm(tiny_model_dir, train_file, workdir, cached_losses={"ref": str(tmp_path / "long")}).setup(
            "fit"
        )


def test_existing_dir_with_other_fingerprint_is_refused_untouched(
    module, scored, tiny_model_dir, train_file, workdir
):
    before = snapshot(scored)
    dm = make_dm(tiny_model_dir, train_file, workdir, max_length=48)
    with pytest.raises(
        FingerprintMismatchError, match="(?s)max_length: cache has 64, current is 48.*Refusing"
    ):
        score_to_cache(module, dm, scored, shard_size=SHARD_SIZE, progress=False)
    with pytest.raises(CacheError, match="shard_size=5, now shard_size=6"):
        score_to_cache(
            module, make_dm(tiny_model_dir, train_file, workdir), scored, shard_size=6, progress=False
        )
    assert snapshot(scored) == before


def test_other_model_is_refused_and_nonempty_dir_without_manifest(
    module, scored, tiny_model_dir, train_file, workdir
):
    other = FullSFT(model=tiny_model_dir)
    other.configure_model()
    with torch.no_grad():
        next(other.model.parameters()).add_(0.5)
    with pytest.raises(FingerprintMismatchError, match="model: cache has"):
        score_to_cache(other, make_dm(tiny_model_dir, train_file, workdir), scored, shard_size=SHARD_SIZE)
    (workdir / "busy").mkdir()
    (workdir / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty but has no manifest.json"):
        score_to_cache(module, make_dm(tiny_model_dir, train_file, workdir), workdir / "busy")


def test_score_command(scored, tiny_model_dir, train_file, workdir, monkeypatch):
    out = workdir / "cli"
    monkeypatch.setattr("sys.argv", ["lit-tokensel"])
    main(
        [
            "score",
            "--model.class_path",
            "lit_tokensel.FullSFT",
            "--model.init_args.model",
            tiny_model_dir,
            "--data.train_file",
            train_file,
            "--data.max_length",
            "64",
            "--data.cache_dir",
            str(workdir / "hf"),
            "--output_dir",
            str(out),
            "--shard_size",
            "8",
        ]
    )
    cache, reference = TokenLossCache(out), TokenLossCache(scored)
    assert cache.complete and cache.manifest["num_shards"] == 3
    assert cache.fingerprint == reference.fingerprint
    for sid, row in reference.rows.items():
        np.testing.assert_allclose(cache[sid], row, atol=1e-6)
