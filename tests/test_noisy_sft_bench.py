"""The noisy-SFT benchmark's runner parts: selection metrics, the oracle, the plan, and (slow) an end-to-end run."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch

from lit_tokensel_bench.noisy_sft.metrics import selection_quality, stat
from lit_tokensel_bench.noisy_sft.oracle import OracleSFT
from lit_tokensel_bench.noisy_sft.plan import FULL, QUICK, SMOLLM2, method_rows, regime_rows
from lit_tokensel_bench.noisy_sft.run import METHOD_CONFIGS, Paths, check_workdir, common_args, method_args

RECORDS = [
    {
        "sample_id": 0,
        "tokens": list("abcd"),
        "keep": [True, False, True, True],
        "scores": {"s": [0.9, 0.1, 0.8, 0.2]},
    },
    {
        "sample_id": 1,
        "tokens": list("xyz"),
        "keep": [True, True, False],
        "weight": [1.0, -0.5, 0.0],
        "scores": {"s": [0.7, 0.3, 0.5]},
    },
    {"sample_id": 2, "tokens": list("pq"), "keep": [False, False], "scores": {}},  # a sample dropped whole
]
LABELS = [[0, 1, 0, 1], [0, 1, 0], [1, 0]]


def _pairwise_auc(scores: list[float], corrupted: list[int]) -> float:
    """P(clean score > corrupted score), ties 1/2: the definition, by enumerating pairs."""
    clean = [s for s, c in zip(scores, corrupted) if not c]
    bad = [s for s, c in zip(scores, corrupted) if c]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(clean, bad))
    return wins / (len(clean) * len(bad))


def test_selection_quality_matches_a_hand_count():
    quality = selection_quality(RECORDS, LABELS, ("s", 1))
    # corrupted tokens: (0,b) dropped, (0,d) kept, (1,y) kept with a negative weight = not learned, (2,p) dropped
    assert quality["drop_corrupted"] == pytest.approx(3 / 4)
    # clean: (0,a) kept, (0,c) kept, (1,x) kept, (1,z) dropped, (2,q) dropped
    assert quality["drop_clean"] == pytest.approx(2 / 5)
    assert quality["corrupted_share"] == pytest.approx(4 / 9)
    scored = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.5]  # sample 2 has no score: left out of the AUC
    assert quality["auc"] == pytest.approx(_pairwise_auc(scored, [0, 1, 0, 1, 0, 1, 0]))
    assert quality["auc"] == pytest.approx(1.0)
    flipped = selection_quality(RECORDS, LABELS, ("s", -1))  # a low-is-keep score, e.g. Q-Tuning's
    assert flipped["auc"] == pytest.approx(0.0)
    assert selection_quality(RECORDS, LABELS, None)["auc"] is None


def test_selection_quality_ties_and_label_mismatch():
    records = [
        {"sample_id": 0, "tokens": list("abcd"), "keep": [True] * 4, "scores": {"s": [1.0, 1.0, 2.0, 0.0]}}
    ]
    labels = [[0, 1, 1, 0]]
    assert selection_quality(records, labels, ("s", 1))["auc"] == pytest.approx(
        _pairwise_auc([1.0, 1.0, 2.0, 0.0], labels[0])
    )
    with pytest.raises(ValueError, match="sample 0: 3 labels for 4"):
        selection_quality(records, [[0, 1, 1]], ("s", 1))


def test_stat_is_mean_and_sample_std_over_seeds():
    assert stat([1.0, 2.0, 4.0]) == {
        "mean": pytest.approx(7 / 3),
        "std": pytest.approx(1.5275252, rel=1e-6),
        "values": [1.0, 2.0, 4.0],
    }
    assert stat([0.5]) == {"mean": 0.5, "std": 0.0, "values": [0.5]}
    assert stat([None, float("nan")]) is None


def test_oracle_keeps_exactly_the_clean_tokens(tmp_path, tiny_model_dir):
    labels = [[0, 1, 0], [1, 1, 0, 0, 1]]
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    module = OracleSFT(labels_file=str(tmp_path / "labels.json"), model=str(tiny_model_dir))
    valid = torch.zeros(2, 8, dtype=torch.bool)
    valid[0, 1:6] = True  # row 0 is sample 1 (5 response tokens)
    valid[1, 2:5] = True  # row 1 is sample 0 (3)
    batch = {"sample_id": torch.tensor([1, 0])}  # rows in another order than sample ids
    selection = module.select_tokens(batch, torch.zeros(2, 8), valid)
    expected = torch.zeros(2, 8, dtype=torch.bool)
    expected[0, [3, 4]] = True  # sample 1: positions 1..5, labels 1 1 0 0 1
    expected[1, [2, 4]] = True  # sample 0: positions 2..4, labels 0 1 0
    assert torch.equal(selection.keep, expected)
    with pytest.raises(ValueError, match="sample 0 has 3 labels but 2 response tokens"):
        module.select_tokens(
            {"sample_id": torch.tensor([0])}, torch.zeros(1, 8), valid[:1] & (torch.arange(8) < 3)
        )


def test_plan_rows_use_shipped_configs_and_unique_keys():
    for settings in (FULL, QUICK, SMOLLM2):
        for regime in settings.regimes:
            rows = regime_rows(settings, regime)
            keys = [r.key for r in rows]
            assert len(keys) == len(set(keys))
            for row in rows:
                if row.config not in (None, "oracle"):
                    assert (METHOD_CONFIGS / f"{row.config}.yaml").is_file(), row.config
    full = {r.key for r in method_rows(FULL)}
    for family in (
        "random",
        "rho1",
        "tokencleaning",
        "tokencleaning-se",
        "sstoken",
        "sstoken-base",
        "forgetting",
        "qtuning",
    ):
        assert {f"{family}-0.6", f"{family}-0.8"} <= full  # both keep ratios for every ratio-based method
    assert {"full", "profit", "oracle", "reference", "sstoken-gamma0-0.6", "sstoken-gamma1-0.6"} <= full
    assert {"dft", "eaft", "asft"} <= full and {"dft", "eaft", "asft"} <= set(SMOLLM2.row_keys)
    assert [r.key for r in regime_rows(SMOLLM2, "pretrained")] == list(SMOLLM2.row_keys)


@pytest.mark.slow
def test_benchmark_end_to_end_oracle_and_random(tmp_path):
    """A small real run: the oracle drops exactly the corrupted tokens, random drops ~20% of each kind."""
    from lit_tokensel_bench.noisy_sft.run import main

    report = tmp_path / "report"
    code = main(
        [
            "--quick",
            "--regimes",
            "scratch",
            "--only",
            "oracle",
            "random",
            "--workdir",
            str(tmp_path / "w"),
            "--no-readme",
            "--report-dir",
            str(report),
        ]
    )
    assert code == 0
    results = json.loads((report / "results.json").read_text())
    rows = {r["key"]: r for r in results["rows"]}
    assert set(rows) == {"full", "random-0.8", "oracle", "reference"}
    oracle, random_row, full = rows["oracle"], rows["random-0.8"], rows["full"]
    assert oracle["drop_corrupted"]["mean"] == 1.0 and oracle["drop_clean"]["mean"] == 0.0
    assert oracle["auc"]["mean"] == 1.0
    assert full["drop_corrupted"]["mean"] == 0.0 and full["auc"] is None
    assert 0.1 < random_row["drop_corrupted"]["mean"] < 0.3 and 0.1 < random_row["drop_clean"]["mean"] < 0.3
    assert 0.35 < random_row["auc"]["mean"] < 0.65
    for row in rows.values():
        assert 0.0 <= row["gen_acc"]["mean"] <= 1.0 and row["nll"]["mean"] > 0
    for name in ("results.md", "auc_curves.png", "accuracy_vs_cost.png", "tokens.html"):
        assert (report / name).stat().st_size > 0
    html = (report / "tokens.html").read_text()
    assert 'class="sample"' in html and "Oracle" in html
    # a second run finds every job done and redoes none
    assert (
        main(
            [
                "--quick",
                "--regimes",
                "scratch",
                "--only",
                "oracle",
                "random",
                "--workdir",
                str(tmp_path / "w"),
                "--no-readme",
                "--report-dir",
                str(report),
            ]
        )
        == 0
    )
    assert json.loads((report / "results.json").read_text())["rows"] == results["rows"]
    assert Path(tmp_path / "w" / "settings.json").is_file()


def test_workdir_settings_accept_an_older_file_without_a_newer_field(tmp_path):
    paths = Paths(tmp_path)
    check_workdir(paths, QUICK)
    saved = json.loads((tmp_path / "settings.json").read_text(encoding="utf-8"))
    del saved["extra_args"]  # written before the field existed; its default applies
    (tmp_path / "settings.json").write_text(json.dumps(saved), encoding="utf-8")
    check_workdir(paths, QUICK)
    with pytest.raises(SystemExit, match=r"differs in \['extra_args'\]"):
        check_workdir(
            paths, dataclasses.replace(QUICK, extra_args=("--trainer.accumulate_grad_batches", "1"))
        )


def test_smollm2_runs_stack_the_lora_preset_and_override_its_accumulation(tmp_path):
    args = common_args(
        SMOLLM2,
        Paths(tmp_path),
        config="full_sft",
        model=SMOLLM2.pretrained_model,
        train_file=tmp_path / "train.jsonl",
        seed=0,
        epochs=1,
        learning_rate=1e-3,
        run_dir=tmp_path,
    )
    preset = args.index(str(METHOD_CONFIGS.parent / "presets" / "smollm2_lora.yaml"))
    assert args[preset - 1] == "-c" and preset > args.index(str(METHOD_CONFIGS / "full_sft.yaml"))
    # flags after the configs win: the preset's accumulate_grad_batches 2 becomes 1
    assert args[-2:] == ["--trainer.accumulate_grad_batches", "1"]
    assert "--data.tokenizer" not in args  # the pretrained model brings its own tokenizer


@pytest.mark.parametrize("seed", [0, 2])
def test_random_rows_draw_their_selection_from_the_run_seed(tmp_path, seed):
    row = next(r for r in method_rows(QUICK) if r.family == "random")
    paths = Paths(tmp_path, data={"train": tmp_path / "train.jsonl"})
    args = method_args(QUICK, paths, "scratch", row, seed, tmp_path / "run")
    assert args[args.index("--model.init_args.selection_seed") + 1] == str(seed)
    assert args[args.index("--seed_everything") + 1] == str(seed)


def test_merge_keeps_the_earlier_rows_this_run_lacks_in_plan_order():
    from lit_tokensel_bench.noisy_sft.collect import merge_results

    def row(regime, key, gen):
        return {"regime": regime, "key": key, "method": key, "gen_acc": {"mean": gen}}

    earlier = {
        "command": "python -m old",
        "rows": [
            row("scratch", "full", 0.1),
            row("scratch", "rho1-0.6", 0.2),
            row("scratch", "reference", 0.3),
            row("pretrained", "full", 0.4),
            row("pretrained", "profit", 0.5),
            row("pretrained", "base-model", 0.0),
        ],
    }
    fresh = {
        "command": "python -m new --only dft",
        "settings": {},
        "rows": [
            row("scratch", "full", 0.15),
            row("scratch", "dft", 0.6),
            row("scratch", "reference", 0.35),
            row("pretrained", "full", 0.45),
            row("pretrained", "dft", 0.7),
        ],
    }
    merged = merge_results(fresh, earlier, "old/results.json")
    assert [(r["regime"], r["key"], r["gen_acc"]["mean"]) for r in merged["rows"]] == [
        ("scratch", "full", 0.15),
        ("scratch", "rho1-0.6", 0.2),
        ("scratch", "dft", 0.6),
        ("scratch", "reference", 0.35),
        ("pretrained", "full", 0.45),
        ("pretrained", "profit", 0.5),
        ("pretrained", "dft", 0.7),
        ("pretrained", "base-model", 0.0),
    ]
    assert merged["command"] == (
        "python -m new --only dft; the rows ['base-model', 'profit', 'rho1-0.6'] are kept "
        "from old/results.json (python -m old)"
    )
    assert merge_results(fresh, {"rows": []}, "x")["command"] == fresh["command"]


def test_search_rows_are_the_six_preregistered_variants_with_valid_sstoken_settings():
    """docs/beyond-sstoken.md fixes six variants at ratio 0.6; each override must be an SsTokenSFT setting."""
    import inspect as pyinspect

    from lit_tokensel import SsTokenSFT
    from lit_tokensel_bench.noisy_sft.plan import SEARCH_BASELINES, search_regime_rows, search_rows

    variants = search_rows()
    assert [row.key for row in variants] == [
        "v1-relative-0.6",
        "v2-inverted-0.6",
        "v3-eot-base-0.6",
        "v4-rank-0.6",
        "v5-middle-nosink-0.6",
        "v6-relative-eot-0.6",
    ]
    accepted = set(pyinspect.signature(SsTokenSFT.__init__).parameters)
    for row in variants:
        flags = [a.removeprefix("--model.init_args.") for a in row.overrides[::2]]
        assert set(flags) <= accepted, row.key
        assert row.config == "sstoken" and row.ratio == 0.6
    pretrained = [row.key for row in search_regime_rows(FULL, "pretrained")]
    scratch = [row.key for row in search_regime_rows(FULL, "scratch")]
    assert set(SEARCH_BASELINES) <= set(pretrained) and "v3-eot-base-0.6" in pretrained
    assert "v3-eot-base-0.6" not in scratch and "sstoken-base-0.6" not in scratch  # no base from scratch
