"""Answer keep rate and drop persistence: `python -m lit_tokensel_bench.noisy_sft.persistence`."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import numpy as np
import pytest

from lit_tokensel_bench.noisy_sft.data import answer, make_world, true_value
from lit_tokensel_bench.noisy_sft.persistence import (
    ANSWER,
    END,
    OTHER,
    answer_keep,
    answer_pattern,
    drop_persistence,
    main,
    token_roles,
)

A, R, E = ANSWER, OTHER, END  # answer, rest, end
T, F = True, False
W = "wrong_answer"


@pytest.mark.parametrize("family", ["capital", "birth_year", "addition"])
def test_answer_patterns_find_the_generators_value_in_its_own_sentences(family):
    entities = make_world(0).sft
    keys = {
        "capital": sorted(entities.capitals)[:5],
        "birth_year": sorted(entities.birth_years)[:5],
        "addition": [(0, 0), (7, 49), (19, 43), (48, 5), (30, 12)],
    }[family]
    for key in keys:
        match = answer_pattern(family).match(answer(entities, family, key))
        assert match is not None and match["answer"] == str(true_value(entities, family, key))


def test_reverse_has_no_answer_template():
    with pytest.raises(ValueError, match="no answer template for family 'reverse'"):
        answer_pattern("reverse")


def test_token_roles_split_answer_prefix_and_end():
    assert token_roles(["1", "9", " +", " 4", "3", " =", " 6", "2", ".", "<|im_end|>"]) == [
        R,
        R,
        R,
        R,
        R,
        R,
        A,
        A,
        R,
        E,
    ]
    assert token_roles(
        ["The", " capital", " of", " V", "ora", " is", " D", "ros", "vik", ".", "<|im_end|>"]
    ) == [R, R, R, R, R, R, A, A, A, R, E]
    # a token that runs from the answer into the full stop holds answer characters: an answer token
    assert token_roles(["1", " +", " 1", " =", " 2."]) == [R, R, R, R, A]


def test_token_roles_skip_other_shapes_unless_their_family_is_asked_for():
    birth = ["T", "arin", " Os", "kel", " was", " born", " in", " 17", "83", ".", "<|im_end|>"]
    assert token_roles(["stone", ",", " river", ",", " apple", ".", "<|im_end|>"]) is None
    assert token_roles(birth) is None  # default families: capital and addition
    assert token_roles(birth, ("capital", "birth_year")) == [R, R, R, R, R, R, R, A, A, R, E]
    assert token_roles(["12", " +", " 30", " =", " 42"]) is None  # no full stop: not the template


ADD = ["1", "9", " +", " 4", "3", " =", " 6", "2", ".", "<|im_end|>"]  # answer 6-7
CAP = ["The", " capital", " of", " V", "ora", " is", " D", "ros", "vik", ".", "<|im_end|>"]  # answer 6-8
REV = ["stone", ",", " river", ",", " apple", ".", "<|im_end|>"]  # other shape: skipped
BAD = ["2", " +", " 3", " =", " 9", ".", "<|im_end|>"]  # a wrong answer: corrupted, excluded
KINDS = [[None] * 10, [None] * 11, [None] * 7, [None, None, None, None, W, None, None]]


def _record(sample_id: int, text: list[str], keep: list[bool]) -> dict:
    return {
        "sample_id": sample_id,
        "step": 10,
        "text": text,
        "keep": keep,
        "loss": [1.0] * len(text),
        "scores": {"s": [0.0] * len(text)},
    }


POINT_1 = [
    _record(0, ADD, [T, T, T, T, T, F, F, T, T, F]),
    _record(1, CAP, [T, T, F, T, T, T, F, F, T, T, F]),
    _record(2, REV, [F, F, F, F, F, F, F]),
    _record(3, BAD, [T, T, T, T, F, T, T]),
]
POINT_2 = [
    _record(0, ADD, [F, F, T, T, T, T, F, F, T, T]),
    _record(1, CAP, [T, T, T, T, T, F, F, F, T, T, T]),
    _record(3, BAD, [T, T, T, T, F, T, T]),
]


def test_answer_keep_counts_clean_answers_only():
    out = answer_keep(POINT_1, KINDS)
    # answers: sample 0 keeps 1 of 2, sample 1 keeps 1 of 3; other tokens (end excluded) 6 of 7 in each;
    # the reverse list is skipped, the corrupted addition excluded however it is kept
    assert out == {
        "answer_kept": 2 / 5,
        "other_kept": 12 / 14,
        "answer_tokens": 5,
        "answer_kept_tokens": 2,
        "other_tokens": 14,
        "other_kept_tokens": 12,
        "clean_samples": 2,
        "corrupted_samples": 1,
        "skipped_samples": 1,
    }


def test_answer_keep_names_the_file_when_kinds_belong_to_other_data():
    with pytest.raises(ValueError, match="x.jsonl: sample 0 has 10 tokens but 9 corruption kinds"):
        answer_keep(POINT_1, [[None] * 9, *KINDS[1:]], source="x.jsonl")
    with pytest.raises(ValueError, match="x.jsonl: sample 3 is not in the corruption kinds"):
        answer_keep(POINT_1, KINDS[:3], source="x.jsonl")


def test_drop_persistence_matches_a_hand_count():
    first = {0: [F, F, T, T], 1: [F, T], 2: [F]}  # sample 2 is not at the later points: left out
    second = {0: [F, T, T, T], 1: [F, T]}
    third = {0: [F, T, F, F], 1: [T, F]}
    out = drop_persistence([first, second, third])
    # 6 tokens; dropped 3, 2 and 4 of them; only token 0 of sample 0 is dropped at all three points
    assert out.pop("drop_rate") == pytest.approx([1 / 2, 1 / 3, 2 / 3])
    assert out == pytest.approx(
        {
            "samples": 2,
            "tokens": 6,
            "dropped_first": 1 / 2,
            "dropped_every": 1 / 6,
            "persistence": 1 / 3,
            "random": 2 / 9,
        }
    )


def test_drop_persistence_agrees_with_a_direct_array_computation():
    rng = random.Random(3)
    lengths = [rng.randint(1, 12) for _ in range(40)]
    masks = [{i: [rng.random() < 0.6 for _ in range(n)] for i, n in enumerate(lengths)} for _ in range(4)]
    keep = np.array([[k for i in range(40) for k in m[i]] for m in masks])  # [points, tokens]
    dropped = ~keep
    out = drop_persistence(masks)
    assert out["persistence"] == pytest.approx(dropped.all(0).sum() / dropped[0].sum())
    assert out["dropped_every"] == pytest.approx(dropped.all(0).mean())
    assert out["random"] == pytest.approx(np.prod(dropped[1:].mean(1)))


def test_drop_persistence_refuses_one_point_and_changed_token_counts():
    with pytest.raises(ValueError, match="at least two inspect points"):
        drop_persistence([{0: [T]}])
    with pytest.raises(ValueError, match=r"sample 0 has \[2, 3\] tokens"):
        drop_persistence([{0: [T, F]}, {0: [T, F, F]}])


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _workdir(root: Path) -> Path:
    """Seed 0: POINT_1 then POINT_2; seed 1: POINT_2 at both points (nothing changes between them)."""
    row = root / "pretrained" / "sstoken-0.6"
    _write(row / "seed0" / "inspect" / "0.500.jsonl", POINT_1)
    _write(row / "seed0" / "inspect" / "1.000.jsonl", POINT_2)
    _write(row / "seed1" / "inspect" / "0.500.jsonl", POINT_2)
    _write(row / "seed1" / "inspect" / "1.000.jsonl", POINT_2)
    (root / "data").mkdir()
    (root / "data" / "train.token_kinds.json").write_text(json.dumps(KINDS), encoding="utf-8")
    return root


def test_cli_reports_mean_and_std_over_seeds(tmp_path, capsys):
    workdir = _workdir(tmp_path / "run")
    main(
        [
            "--workdir",
            str(workdir),
            "--rows",
            "sstoken-0.6",
            "--seeds",
            "0",
            "1",
            "--json",
            str(tmp_path / "p.json"),
        ]
    )
    saved = json.loads((tmp_path / "p.json").read_text(encoding="utf-8"))["pretrained/sstoken-0.6"]
    assert saved["seeds"] == [0, 1] and saved["points"] == ["0.500", "1.000"]
    # POINT_2 answers: sample 0 keeps 0 of 2, sample 1 keeps 1 of 3; other tokens 5 of 7 and 6 of 7
    assert saved["answer"]["0.500"]["answer_kept"]["values"] == pytest.approx([2 / 5, 1 / 5])
    assert saved["answer"]["1.000"]["answer_kept"]["values"] == pytest.approx([1 / 5, 1 / 5])
    assert saved["answer"]["0.500"]["other_kept"]["mean"] == pytest.approx((12 / 14 + 11 / 14) / 2)
    assert saved["answer"]["0.500"]["answer_kept"]["std"] == pytest.approx(statistics.stdev([0.4, 0.2]))
    # seed 0 over samples 0, 1, 3 (28 tokens; sample 2 is not at 1.000). Dropped first: sample 0: 5, 6, 9;
    # sample 1: 2, 6, 7, 10; sample 3: 4 -> 8 tokens. Dropped at 1.000: sample 0: 0, 1, 6, 7; sample 1: 5, 6, 7;
    # sample 3: 4 -> 8 tokens. Dropped at both: sample 0: 6; sample 1: 6, 7; sample 3: 4 -> 4 tokens
    p0 = saved["per_seed"]["0"]["persistence"]
    assert (p0["samples"], p0["tokens"]) == (3, 28)
    assert (p0["dropped_first"], p0["dropped_every"]) == pytest.approx((8 / 28, 4 / 28))
    assert p0["persistence"] == pytest.approx(4 / 8)
    assert p0["random"] == pytest.approx(8 / 28)
    # seed 1 keeps the same mask: every first-point drop persists
    assert saved["per_seed"]["1"]["persistence"]["persistence"] == 1.0
    assert saved["persistence"]["persistence"]["values"] == pytest.approx([0.5, 1.0])
    out = capsys.readouterr().out
    assert "0.750 ± 0.354" in out  # persistence over the two seeds
    assert "0.300 ± 0.141" in out  # answer kept at 0.500


def test_cli_error_names_the_missing_inspect_file(tmp_path, capsys):
    workdir = _workdir(tmp_path / "run")
    (workdir / "pretrained" / "sstoken-0.6" / "seed1" / "inspect" / "1.000.jsonl").unlink()
    with pytest.raises(SystemExit):
        main(["--workdir", str(workdir), "--rows", "sstoken-0.6", "--seeds", "0", "1"])
    err = capsys.readouterr().err
    assert "pretrained/sstoken-0.6 seed 1" in err and "seed1/inspect/1.000.jsonl not found" in err


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda root: root, ["--rows", "x"], "train.token_kinds.json not found"),
        (_workdir, ["--rows", "rho1-0.6"], "no inspect files under"),
        (
            _workdir,
            ["--rows", "sstoken-0.6", "--points", "0.500", "0.750"],
            "seed0/inspect/0.750.jsonl not found",
        ),
    ],
)
def test_cli_errors_name_what_is_missing(tmp_path, capsys, make, args, message):
    workdir = make(tmp_path / "run")
    with pytest.raises(SystemExit):
        main(["--workdir", str(workdir), *args])
    assert message in capsys.readouterr().err
