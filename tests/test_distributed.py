"""Distributed training: global-batch selection, sharded references and checkpoints, DDP/FSDP2 parity.

The slow tests run 2 CPU ranks over gloo (`torchrun --standalone`, tests/distributed_worker.py) and
compare with one process that reads the same global batches: DDP and FSDP2 (Lightning's
ModelParallelStrategy) must give the weights of single-process training, the FSDP2 history and frozen
reference must be DTensor shards, a sharded checkpoint must resume exactly and export to the same model.
The others are single-process unit tests of the helpers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_tokensel.distributed import (
    FSDP2Strategy,
    check_selection_group,
    consolidate_checkpoint,
    global_top_k_per_batch,
    load_checkpoint_dict,
    resolve_process_group,
)
from lit_tokensel.distributed.callback_state import MARKER, extract_dtensors, fill_markers, marker_paths
from lit_tokensel.distributed.consolidate import main
from lit_tokensel.distributed.fsdp import decoder_layer_classes, mixed_precision_policy
from lit_tokensel.distributed.topk import encode_scores, top_k_from_parts
from lit_tokensel.selection.selectors import select_top, top_k_per_batch
from tests.model_fixtures import save_perturbed_copy

ROOT = Path(__file__).parents[1]
WORKER = Path(__file__).parent / "distributed_worker.py"
QUICKSTART_TRAIN = ROOT / "lit_tokensel" / "assets" / "quickstart" / "train.jsonl"
WORLD, PER_RANK_BATCH, STEPS = 2, 2, 4  # 8 rows: a global batch of 4, 2 optimizer steps per epoch
METHODS = ("full", "rho1", "rho1_ema", "rho1_lora", "sstoken_ema")


# ---------------------------------------------------------------------------------------------- global top-k


def _random_parts(seed: int, shapes: list[tuple[int, int]], ties: bool) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    scores, valid = [], []
    for b, t in shapes:
        s = torch.randint(0, 4, (b, t), generator=g).float() if ties else torch.randn(b, t, generator=g)
        lengths = torch.randint(0, t + 1, (b,), generator=g)
        scores.append(s)
        valid.append(torch.arange(t)[None, :] < lengths[:, None])  # right padding, like the collator
    return scores, valid


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("ratio", [0.3, 0.6, 1.0])
def test_top_k_from_parts_equals_single_process_on_the_concatenated_batch(ties, ratio):
    """Ranks with different batch sizes and widths: each rank's mask is its rows of the one-process mask."""
    shapes = [(2, 7), (3, 4), (1, 9)]
    for seed in range(5):
        scores, valid = _random_parts(seed, shapes, ties)
        width = max(t for _, t in shapes)
        concat_scores = torch.cat([torch.nn.functional.pad(s, (0, width - s.shape[1])) for s in scores])
        concat_valid = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in valid])
        expected = top_k_per_batch(concat_scores, concat_valid, ratio)  # [6, 9]
        parts = [encode_scores(s, v) for s, v in zip(scores, valid, strict=True)]
        start = 0
        for rank, (s, v) in enumerate(zip(scores, valid, strict=True)):
            keep = top_k_from_parts(parts, rank, ratio)
            assert keep.shape == s.shape and not (keep & ~v).any()
            assert torch.equal(keep, expected[start : start + s.shape[0], : s.shape[1]])
            start += s.shape[0]
        total = int(concat_valid.sum())
        kept = sum(int(top_k_from_parts(parts, r, ratio).sum()) for r in range(len(parts)))
        assert kept == math.ceil(round(ratio * total, 9))


def test_encode_scores_rejects_nan_at_response_positions():
    scores, valid = torch.tensor([[0.1, math.nan]]), torch.tensor([[True, True]])
    with pytest.raises(ValueError, match="NaN"):
        encode_scores(scores, valid)
    assert torch.isnan(encode_scores(scores, torch.tensor([[True, False]]))[0, 1])  # NaN marks invalid


def test_single_process_paths_are_unchanged():
    scores, valid = _random_parts(0, [(3, 6)], ties=True)
    expected = top_k_per_batch(scores[0], valid[0], 0.5)
    assert resolve_process_group("global") is None and resolve_process_group("rank") is None
    assert torch.equal(global_top_k_per_batch(scores[0], valid[0], 0.5), expected)
    assert torch.equal(select_top(scores[0], valid[0], 0.5, "batch", group=None), expected)
    assert torch.equal(select_top(scores[0], valid[0], 0.5, "batch"), expected)


def test_selection_group_is_validated():
    from lit_tokensel import Rho1SFT
    from lit_tokensel.reference import CachedReference

    assert check_selection_group("rank") == "rank"
    with pytest.raises(ValueError, match="selection_group"):
        check_selection_group("node")
    with pytest.raises(ValueError, match="selection_group"):
        Rho1SFT(reference=CachedReference("reference"), selection_group="all")


# ---------------------------------------------------------------------------------------------- helpers


def test_decoder_layer_classes_come_from_no_split_modules(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert {c.__name__ for c in decoder_layer_classes(model)} == {"LlamaDecoderLayer"}
    with pytest.raises(ValueError, match="decoder layer"):
        decoder_layer_classes(torch.nn.Linear(2, 2))


def test_mixed_precision_policy_follows_the_trainer_precision():
    assert mixed_precision_policy("bf16-mixed").param_dtype == torch.bfloat16
    assert mixed_precision_policy("bf16-mixed").reduce_dtype == torch.float32
    assert mixed_precision_policy("32-true").param_dtype is None


def test_fsdp2_strategy_is_pure_data_parallel():
    strategy = FSDP2Strategy()
    assert strategy._tensor_parallel_size == 1 and strategy._save_distributed_checkpoint


def test_callback_state_markers_round_trip():
    state = {
        "HistoryUpdate": {"mode": "ema", "shadow": {"w": torch.ones(2)}, "pending": [{"w": torch.zeros(2)}]}
    }
    same, moved = extract_dtensors(state)
    assert moved == {} and torch.equal(
        same["HistoryUpdate"]["shadow"]["w"], torch.ones(2)
    )  # plain tensors stay
    marked = {
        "HistoryUpdate": {"mode": "ema", "shadow": {"w": {MARKER: "/HistoryUpdate/shadow/w"}}, "pending": []}
    }
    assert marker_paths(marked) == ["/HistoryUpdate/shadow/w"]
    filled = fill_markers(marked, {"/HistoryUpdate/shadow/w": torch.full((2,), 3.0)})
    assert torch.equal(filled["HistoryUpdate"]["shadow"]["w"], torch.full((2,), 3.0))
    assert filled["HistoryUpdate"]["mode"] == "ema"


def test_chunked_loss_under_fsdp2_is_refused_with_a_fix(tiny_model_dir):
    from lit_tokensel import FullSFT

    module = FullSFT(model=tiny_model_dir, chunked_loss=True)
    module._device_mesh = object()  # what ModelParallelStrategy sets; refused before it is used
    with pytest.raises(ValueError, match="chunked_loss"):
        module.configure_model()


def test_history_under_fsdp1_is_refused_with_a_fix():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from lit_tokensel.distributed.fsdp import check_fsdp1_references
    from lit_tokensel.reference import HistoryReference

    with pytest.raises(ValueError, match="fsdp2"):
        check_fsdp1_references(FSDPStrategy(), [HistoryReference()])
    check_fsdp1_references(DDPStrategy(), [HistoryReference()])
    check_fsdp1_references(FSDPStrategy(), [])


def test_consolidate_rejects_a_plain_file_and_load_passes_it_through(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, path)
    with pytest.raises(ValueError, match="DCP"):
        consolidate_checkpoint(path)
    assert torch.equal(load_checkpoint_dict(path)["state_dict"]["w"], torch.ones(1))


# ---------------------------------------------------------------------------------------------- 2-process runs


def _run(command: list[str], log: Path, timeout: int = 400) -> None:
    with open(log, "w") as f:
        try:
            result = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"timed out after {timeout}s: {' '.join(command)}; log {log}")
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        pytest.fail(f"{' '.join(command)} exited with {result.returncode}:\n{tail}")


def run_jobs(out: Path, spec: dict[str, Any], distributed: list[dict], single: list[dict]) -> None:
    """The `distributed` jobs in one `torch.distributed.run` of WORLD processes (log in `out`), then the
    `single` jobs in this process, all from the same `spec`."""
    (out / "distributed.json").write_text(json.dumps({**spec, "jobs": distributed}))
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(WORLD),
            str(WORKER),
            str(out / "distributed.json"),
        ],
        out / "distributed.log",
    )

    from tests.distributed_worker import run_job

    for single_job in single:
        run_job(spec, single_job)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: str) -> Path:
    """Every training job once: single process in this process, DDP and FSDP2 in one 2-rank torchrun."""
    out = tmp_path_factory.mktemp("distributed")
    save_perturbed_copy(tiny_model_dir, out / "reference", seed=5)
    rows = QUICKSTART_TRAIN.read_text().splitlines()[: WORLD * PER_RANK_BATCH * 2]
    (out / "train.jsonl").write_text("\n".join(rows) + "\n")
    spec: dict[str, Any] = {
        "model": tiny_model_dir,
        "reference": str(out / "reference"),
        "train_file": str(out / "train.jsonl"),
        "out": str(out),
        "world": WORLD,
    }
    job = {"per_rank_batch": PER_RANK_BATCH, "max_steps": STEPS}
    single = [{"name": f"single_{m}", "method": m, "strategy": "single", **job} for m in METHODS]
    next(j for j in single if j["name"] == "single_rho1_lora")["export"] = True
    distributed = [
        {"name": f"{s}_{m}", "method": m, "strategy": s, **job} for m in METHODS for s in ("ddp", "fsdp2")
    ]
    ema = next(j for j in distributed if j["name"] == "fsdp2_rho1_ema")
    ema["checkpoint_every"] = STEPS // 2  # at the end of epoch 0 and of epoch 1
    next(j for j in distributed if j["name"] == "fsdp2_rho1_lora")["export"] = True
    middle = str(out / "fsdp2_rho1_ema" / f"step={STEPS // 2}.ckpt")
    distributed += [
        {"name": "fsdp2_resumed", "method": "rho1_ema", "strategy": "fsdp2", "resume": middle, **job},
        {
            "name": "fsdp2_resumed_from_file",
            "method": "rho1_ema",
            "strategy": "fsdp2",
            "resume": middle,
            "consolidate": True,
            **job,
        },
        {
            "name": "fsdp2_lagged",
            "method": "rho1_lagged",
            "strategy": "fsdp2",
            "checkpoint_every": STEPS // 2,
            **job,
        },
        {
            "name": "fsdp2_lagged_resumed",
            "method": "rho1_lagged",
            "strategy": "fsdp2",
            **job,
            "resume": str(out / "fsdp2_lagged" / f"step={STEPS // 2}.ckpt"),
        },
        {
            "name": "fsdp2_accumulate",
            "method": "full",
            "strategy": "fsdp2",
            "per_rank_batch": 1,
            "accumulate": 2,
            "max_steps": STEPS,
        },
        {
            "name": "fsdp2_bf16",
            "method": "rho1",
            "strategy": "fsdp2",
            "precision": "bf16-mixed",
            "per_rank_batch": PER_RANK_BATCH,
            "max_steps": 2,
        },
    ]
    run_jobs(out, spec, distributed, single)
    return out


def _result(runs: Path, name: str) -> dict[str, Any]:
    return torch.load(runs / f"{name}.pt", weights_only=False)


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tolerance: float) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, msg=lambda m, k=key: f"{k}: {m}", **tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_equal_one_process_on_the_same_global_batches(runs, method, strategy):
    """Global-batch selection and global kept-token normalization: the update of one process."""
    single, distributed = _result(runs, f"single_{method}"), _result(runs, f"{strategy}_{method}")
    assert single["global_step"] == distributed["global_step"] == STEPS
    # AdamW divides by sqrt(v): on a weight whose gradient is ~0, the reduction-order noise of the all-reduce
    # (~1e-9) becomes an update of up to ~1e-4 (seen: one element of 2048 off by 6e-5 for ssToken/EMA with
    # the package versions of 12-02). A wrong normalisation moves every weight by ~lr = 1e-2, far above this.
    _assert_same_tensors(single["weights"], distributed["weights"], rtol=1e-5, atol=1e-4)
    _assert_same_tensors(
        single["history"], distributed["history"], rtol=1e-5, atol=1e-4
    )  # averaged from them
    torch.testing.assert_close(distributed["losses"], single["losses"], rtol=1e-5, atol=1e-5)
    if method == "rho1_lora":  # the comparison has power: the adapter trained
        assert max(v.abs().max() for k, v in single["weights"].items() if "lora_B" in k) > 1e-3
    elif method != "full":  # ... and selection changed the weights
        full = _result(runs, "single_full")["weights"]
        assert max((single["weights"][k] - full[k]).abs().max() for k in full) > 1e-3


PACKED_METHODS = ("full", "rho1")  # rho1: batch scope, its top-k over the global batch's sample views


@pytest.fixture(scope="module")
def packed_runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: str) -> Path:
    """Packed batches (`data.packing`): FullSFT and Rho-1 in one process, padded and packed, and packed on
    2 ranks (DDP; Rho-1 also FSDP2) in one torchrun. Apart from `runs`, so it can run alone."""
    out = tmp_path_factory.mktemp("distributed_packed")
    save_perturbed_copy(tiny_model_dir, out / "reference", seed=5)
    rows = QUICKSTART_TRAIN.read_text().splitlines()[: WORLD * PER_RANK_BATCH * 2]
    (out / "train.jsonl").write_text("\n".join(rows) + "\n")
    spec: dict[str, Any] = {
        "model": tiny_model_dir,
        "reference": str(out / "reference"),
        "train_file": str(out / "train.jsonl"),
        "out": str(out),
        "world": WORLD,
    }
    job = {"per_rank_batch": PER_RANK_BATCH, "max_steps": STEPS}
    single = [
        {"name": f"single_{m}{suffix}", "method": m, "strategy": "single", "packing": packing, **job}
        for m in PACKED_METHODS
        for suffix, packing in (("", False), ("_packed", True))
    ]
    distributed = [
        {"name": f"{s}_{m}_packed", "method": m, "strategy": s, "packing": True, **job}
        for m, s in (("full", "ddp"), ("rho1", "ddp"), ("rho1", "fsdp2"))
    ]
    run_jobs(out, spec, distributed, single)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("method", "strategy"), [("full", "ddp"), ("rho1", "ddp"), ("rho1", "fsdp2")])
def test_two_ranks_packed_equal_one_process_packed(packed_runs, method, strategy):
    """Packing on 2 ranks: each rank packs its own samples; the global-batch selection and the global kept-token
    count make the update that of one process packing the same global batches, which is the padded run's."""
    single = _result(packed_runs, f"single_{method}_packed")
    distributed = _result(packed_runs, f"{strategy}_{method}_packed")
    padded = _result(packed_runs, f"single_{method}")
    assert single["global_step"] == distributed["global_step"] == padded["global_step"] == STEPS
    _assert_same_tensors(single["weights"], distributed["weights"], rtol=1e-5, atol=1e-4)  # AdamW: see above
    torch.testing.assert_close(distributed["losses"], single["losses"], rtol=1e-5, atol=1e-5)
    _assert_same_tensors(padded["weights"], single["weights"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(single["losses"], padded["losses"], rtol=1e-5, atol=1e-5)
    if method != "full":  # the comparison has power: selection changed the weights
        full = _result(packed_runs, "single_full_packed")["weights"]
        assert max((single["weights"][k] - full[k]).abs().max() for k in full) > 1e-3


@pytest.mark.slow
def test_fsdp2_with_gradient_accumulation_equals_one_process(runs):
    """Two micro-batches of 1 per rank and step: the window's kept count is summed over micro-batches and ranks."""
    single, accumulated = _result(runs, "single_full"), _result(runs, "fsdp2_accumulate")
    assert accumulated["global_step"] == STEPS
    _assert_same_tensors(single["weights"], accumulated["weights"], rtol=1e-5, atol=2e-5)


@pytest.mark.slow
def test_fsdp2_history_reference_and_model_are_sharded(runs):
    for rank in range(WORLD):
        ema = json.loads((runs / f"fsdp2_rho1_ema.rank{rank}.json").read_text())
        assert ema["world"] == WORLD and ema["updates"] == STEPS
        frozen = json.loads((runs / f"fsdp2_rho1.rank{rank}.json").read_text())
        for layouts in (ema["shadow"], ema["model"], frozen["reference"]):
            assert layouts
            for name, layout in layouts.items():
                assert layout["dtensor"], name
                assert layout["local"][0] == layout["full"][0] // WORLD, (name, layout)
    ddp = json.loads((runs / "ddp_rho1_ema.rank1.json").read_text())
    assert not any(layout["dtensor"] for layout in ddp["shadow"].values())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("uninterrupted", "resumed"),
    [
        ("fsdp2_rho1_ema", "fsdp2_resumed"),
        ("fsdp2_rho1_ema", "fsdp2_resumed_from_file"),
        ("fsdp2_lagged", "fsdp2_lagged_resumed"),  # its snapshot queue has no live shard to load into yet
    ],
)
def test_fsdp2_resume_continues_exactly(runs, uninterrupted, resumed):
    """Fit 2 steps, checkpoint (DCP folder, or its consolidated file), resume to 4 == 4 steps uninterrupted."""
    full, part = _result(runs, uninterrupted), _result(runs, resumed)
    assert part["global_step"] == STEPS and len(part["losses"]) == STEPS // 2
    _assert_same_tensors(full["weights"], part["weights"], rtol=0, atol=1e-7)
    _assert_same_tensors(full["history"], part["history"], rtol=0, atol=1e-7)
    assert part["losses"] == pytest.approx(full["losses"][STEPS // 2 :], abs=1e-6)


@pytest.mark.slow
def test_sharded_checkpoint_holds_every_rank_of_the_history(runs):
    folder = runs / "fsdp2_rho1_ema" / f"step={STEPS}.ckpt"
    meta = torch.load(folder / "meta.pt", weights_only=True)  # rank 0's pickle holds markers, not shards
    shadow = meta["callbacks"]["HistoryUpdate"]["shadow"]
    assert all(set(v) == {MARKER} for v in shadow.values())
    main([str(folder), str(runs / "consolidated.ckpt")])  # python -m lit_tokensel.distributed.consolidate
    checkpoint = consolidate_checkpoint(folder)
    history = _result(runs, "fsdp2_rho1_ema")["history"]
    _assert_same_tensors(history, checkpoint["callbacks"]["HistoryUpdate"]["shadow"], rtol=0, atol=0)
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}  # module -> HF names
    _assert_same_tensors(_result(runs, "fsdp2_rho1_ema")["weights"], weights, rtol=0, atol=0)
    assert torch.load(runs / "consolidated.ckpt", weights_only=False)["global_step"] == STEPS


@pytest.mark.slow
def test_export_from_sharded_checkpoint_reloads_with_identical_logits(runs, tiny_model_dir):
    from lit_tokensel.export import export_checkpoint

    exported = export_checkpoint(str(runs / "fsdp2_rho1_ema" / f"step={STEPS}.ckpt"), str(runs / "export"))
    reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()
    trained = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    trained.load_state_dict(_result(runs, "fsdp2_rho1_ema")["weights"])
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, trained(ids).logits)


@pytest.mark.slow
def test_export_on_fit_end_of_a_sharded_lora_run_equals_one_process(runs):
    from safetensors.torch import load_file

    single = load_file(runs / "single_rho1_lora_export" / "model.safetensors")
    sharded = load_file(runs / "fsdp2_rho1_lora_export" / "model.safetensors")
    _assert_same_tensors(single, sharded, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fsdp2_bf16_mixed_precision_trains(runs):
    result = _result(runs, "fsdp2_bf16")
    assert len(result["losses"]) == 2 and all(math.isfinite(v) for v in result["losses"])
    assert all(v.dtype == torch.float32 for v in result["weights"].values())  # fp32 master weights


@pytest.mark.slow
def test_cli_fit_with_fsdp2_preset_exports_and_reexports(tmp_path, tiny_model_dir, runs):
    """`lit-tokensel fit` with the preset: Lightning launches the ranks; fit-end export == DCP export."""
    from safetensors.torch import load_file

    configs = ROOT / "configs"
    _run(
        [
            sys.executable,
            "-m",
            "lit_tokensel.cli",
            "fit",
            "-c",
            str(configs / "quickstart.yaml"),
            "-c",
            str(configs / "methods" / "rho1.yaml"),
            "-c",
            str(configs / "presets" / "fsdp2.yaml"),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            str(WORLD),
            "--trainer.precision",
            "32-true",
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--data.train_file",
            str(runs / "train.jsonl"),
            "--data.val_file",
            str(runs / "train.jsonl"),
            "--data.batch_size",
            str(PER_RANK_BATCH),
            "--data.cache_dir",
            str(tmp_path / "hf"),
            "--model.init_args.model",
            tiny_model_dir,
            "--model.init_args.reference.init_args.model",
            str(runs / "reference"),
        ],
        tmp_path / "fit.log",
    )
    version = tmp_path / "full_sft" / "version_0"
    last = version / "checkpoints" / "last.ckpt"
    assert (last / ".metadata").is_file()
    _run(
        [
            sys.executable,
            "-m",
            "lit_tokensel.cli",
            "export",
            "--checkpoint",
            str(last),
            "--output_dir",
            str(tmp_path / "reexport"),
        ],
        tmp_path / "export.log",
    )
    at_fit_end = load_file(version / "export" / "model.safetensors")
    _assert_same_tensors(at_fit_end, load_file(tmp_path / "reexport" / "model.safetensors"), rtol=0, atol=0)
