"""Token-loss cache under hostile conditions: concurrent `score` processes, damaged manifests, NaN losses, bit flips."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_tokensel import FullSFT
from lit_tokensel.cache import CacheError, TokenLossCache, TokenLossCacheWriter, score_to_cache
from lit_tokensel.cache.store import MANIFEST
from tests.test_cache import SHARD_SIZE, make_dm, rows, write_rows

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache_safety")


@pytest.fixture(scope="module")
def train_file(workdir: Path) -> str:
    return write_rows(workdir / "train.jsonl", rows())


@pytest.fixture(scope="module")
def module(tiny_model_dir: str) -> FullSFT:
    module = FullSFT(model=tiny_model_dir)
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def scored(module, tiny_model_dir, train_file, workdir) -> Path:
    return score_to_cache(
        module,
        make_dm(tiny_model_dir, train_file, workdir),
        workdir / "scored",
        shard_size=SHARD_SIZE,
        progress=False,
    )


def _damage(manifest: dict, how: str) -> object:
    if how == "top_level_list":
        return [manifest]
    if how == "shards_not_list":
        manifest["shards"] = {"0": manifest["shards"][0]}
    elif how == "shard_without_sha256":
        del manifest["shards"][1]["sha256"]
    elif how == "fingerprint_null":
        manifest["fingerprint"] = None
    elif how == "path_in_file":
        manifest["shards"][0]["file"] = "../../outside.parquet"
    elif how == "num_shards_string":
        manifest["num_shards"] = "4"
    elif how == "shard_listed_twice":
        manifest["shards"].append(dict(manifest["shards"][0]))
    return manifest


DAMAGE = {
    "top_level_list": "the top level is a list",
    "shards_not_list": "'shards' is dict, not a list",
    "shard_without_sha256": r"shards\[1\]\.sha256 is None \(missing",
    "fingerprint_null": "'fingerprint' is not an object",
    "path_in_file": r"shards\[0\] has index 0 and file '\.\./\.\./outside\.parquet'",
    "num_shards_string": "'num_shards' is '4', not an integer",
    "shard_listed_twice": "'shards' lists a shard twice",
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_structurally_damaged_manifest_is_a_cache_error(
    how, module, scored, tiny_model_dir, train_file, workdir, tmp_path
):
    cache_dir = Path(shutil.copytree(scored, tmp_path / "copy"))
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    (cache_dir / MANIFEST).write_text(json.dumps(_damage(manifest, how)))  # still valid JSON
    message = rf"{cache_dir / MANIFEST} is damaged: {DAMAGE[how]}"
    with pytest.raises(CacheError, match=message):
        TokenLossCache(cache_dir)
    with pytest.raises(CacheError, match=message):  # the DataModule's reader
        make_dm(tiny_model_dir, train_file, workdir, cached_losses={"ref": str(cache_dir)}).setup("fit")
    with pytest.raises(CacheError, match=message):  # resuming the scoring pass
        score_to_cache(
            module,
            make_dm(tiny_model_dir, train_file, workdir),
            cache_dir,
            shard_size=SHARD_SIZE,
            progress=False,
        )


def test_flipped_byte_in_a_shard_is_named(scored, tiny_model_dir, train_file, workdir, tmp_path):
    cache_dir = Path(shutil.copytree(scored, tmp_path / "copy"))
    shard = cache_dir / "shard-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(
        CacheError, match=rf"shard {shard} is corrupted or truncated \(\d+ bytes, manifest says"
    ):
        make_dm(tiny_model_dir, train_file, workdir, cached_losses={"ref": str(cache_dir)}).setup("fit")


def test_score_refuses_nan_losses_naming_the_samples(tiny_model_dir, train_file, workdir, tmp_path):
    broken = FullSFT(model=tiny_model_dir)
    broken.configure_model()
    with torch.no_grad():
        broken.model.lm_head.weight.fill_(float("nan"))
    out = tmp_path / "nan_cache"
    with pytest.raises(
        CacheError,
        match=r"shard 0 of token-loss cache .*: the losses of 5 sample\(s\) are NaN or inf "
        r"\(sample_id 0, 1, 2, 3, 4\)",
    ):
        score_to_cache(
            broken, make_dm(tiny_model_dir, train_file, workdir), out, shard_size=SHARD_SIZE, progress=False
        )
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]  # no shard, no temporary file
    cache = TokenLossCache(out)
    assert not cache.complete and cache.manifest["shards"] == []


def test_writer_refuses_a_row_with_inf(tmp_path):
    with TokenLossCacheWriter(tmp_path / "c", {"model": "m@0"}, "train", 3, 3) as writer:
        with pytest.raises(CacheError, match=r"1 sample\(s\) are NaN or inf \(sample_id 11\)"):
            writer.write_shard(0, [10, 11, 12], [np.zeros(2), np.array([0.0, np.inf]), np.ones(1)])
        assert not writer.is_complete(0)


def test_a_second_writer_in_the_same_process_is_refused_not_deadlocked(tmp_path):
    with TokenLossCacheWriter(tmp_path / "c", {"model": "m@0"}, "train", 3, 3):
        with pytest.raises(CacheError, match="already open for writing in this process"):
            TokenLossCacheWriter(tmp_path / "c", {"model": "m@0"}, "train", 3, 3)
    with TokenLossCacheWriter(tmp_path / "c", {"model": "m@0"}, "train", 3, 3) as writer:  # released: resumes
        assert writer.num_shards == 1


def _wait_for(path: Path, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never appeared in {path}: {path.read_text()[-2000:]}")
        time.sleep(0.2)


@pytest.mark.slow
def test_two_concurrent_score_processes_end_with_one_valid_cache(
    scored, tiny_model_dir, train_file, workdir, tmp_path
):
    out = tmp_path / "shared"
    command = [
        sys.executable,
        "-m",
        "lit_tokensel.cli",
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
        "5",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    # Hold the lock ourselves until both processes have reached it, so they truly overlap.
    with open(tmp_path / ".shared.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = []
        for log in logs:
            handle = log.open("w")
            procs.append(
                subprocess.Popen(command, cwd=tmp_path, env=env, stdout=handle, stderr=subprocess.STDOUT)
            )
            _wait_for(log, "waiting for it to finish")
    codes = [p.wait(timeout=300) for p in procs]
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs
    assert not any("Traceback" in text for text in outputs), outputs
    assert all("token losses of" in text and "written to" in text for text in outputs)
    assert sum("waiting for it to finish" in text for text in outputs) == 2  # both met the lock
    cache, reference = TokenLossCache(out), TokenLossCache(scored)
    assert cache.complete and sorted(p.name for p in out.iterdir()) == [
        MANIFEST,
        *(f"shard-0000{i}.parquet" for i in range(4)),
    ]
    assert cache.rows.keys() == reference.rows.keys()
    for sample_id, row in reference.rows.items():
        np.testing.assert_allclose(cache[sample_id], row, atol=1e-6)
