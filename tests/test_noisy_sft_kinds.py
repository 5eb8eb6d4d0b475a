"""The per-kind score breakdown: `python -m lit_tokensel_bench.noisy_sft.kinds`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_tokensel_bench.noisy_sft.kinds import (
    CLEAN,
    END,
    FILLER_FIRST,
    FILLER_REST,
    WRONG,
    kind_breakdown,
    main,
    token_classes,
)

F, W = "filler", "wrong_answer"


def test_token_classes_split_filler_words_and_mark_the_end_token():
    texts = ["The", " blo", "rp", " qu", "azz", "le", " is", " 7", ".", "<|im_end|>"]
    kinds = [None, F, F, F, F, F, None, W, None, None]
    # " qu" starts a second filler word right after the first: its own first token
    assert token_classes(texts, kinds) == [
        CLEAN,
        FILLER_FIRST,
        FILLER_REST,
        FILLER_FIRST,
        FILLER_REST,
        FILLER_REST,
        CLEAN,
        WRONG,
        CLEAN,
        END,
    ]


def test_token_classes_refuse_kinds_of_other_data():
    with pytest.raises(ValueError, match="2 corruption kinds for 3 tokens"):
        token_classes(["a", "b", "c"], [None, F])


RECORDS = [
    {
        "sample_id": 0,
        "step": 40,
        "text": ["A", " fo", "o", " B", "<|im_end|>"],
        "loss": [1.0, 5.0, 3.0, 2.0, 0.5],
        "scores": {"rel": [0.9, 0.7, 0.2, 0.5, -1.0], "attention": [0.6, 0.1, None, 0.8, 0.3]},
    },
    {
        "sample_id": 1,
        "step": 40,
        "text": [" C", " 9"],
        "loss": [4.0, 6.0],
        "scores": {"rel": [0.1, 0.3], "attention": [0.2, 0.4]},
    },
    {
        "sample_id": 2,
        "step": 40,
        "text": [" D"],
        "loss": [9.0],
        "scores": {},
    },  # a sample dropped whole: skipped
]
KINDS = [[None, F, F, None, None], [None, W], [F]]


def test_kind_breakdown_means_and_aucs_match_a_hand_count():
    out = kind_breakdown(RECORDS, KINDS)
    assert out["step"] == 40
    means = out["means"]
    assert means[CLEAN] == pytest.approx({"n": 3, "loss": 7 / 3, "rel": 0.5, "attention": 1.6 / 3})
    assert means[END] == pytest.approx({"n": 1, "loss": 0.5, "rel": -1.0, "attention": 0.3})
    assert means[FILLER_FIRST] == pytest.approx({"n": 1, "loss": 5.0, "rel": 0.7, "attention": 0.1})
    # the missing attention value is left out of the mean, not counted as zero
    assert means[FILLER_REST] == {"n": 1, "loss": 3.0, "rel": 0.2, "attention": None}
    assert means[WRONG] == pytest.approx({"n": 1, "loss": 6.0, "rel": 0.3, "attention": 0.4})
    # clean rel [0.9, 0.5, 0.1]: above filler-first 0.7 in 1 of 3 pairs, above filler-rest 0.2 in 2 of 3
    assert out["auc"]["rel"][FILLER_FIRST] == pytest.approx(1 / 3)
    assert out["auc"]["rel"][FILLER_REST] == pytest.approx(2 / 3)
    assert out["auc"]["rel"][WRONG] == pytest.approx(2 / 3)
    # clean attention [0.6, 0.8, 0.2] against wrong 0.4: 2 of 3; filler-rest has no value: no AUC
    assert out["auc"]["attention"][WRONG] == pytest.approx(2 / 3)
    assert out["auc"]["attention"][FILLER_REST] is None
    assert "loss" not in out["auc"]


def _workdir(root: Path) -> Path:
    inspect = root / "pretrained" / "sstoken-base-0.6" / "seed0" / "inspect"
    inspect.mkdir(parents=True)
    (inspect / "0.500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    (root / "data").mkdir()
    (root / "data" / "train.token_kinds.json").write_text(json.dumps(KINDS), encoding="utf-8")
    return root


def test_cli_writes_the_breakdown_of_every_inspect_file(tmp_path, capsys):
    workdir = _workdir(tmp_path / "run")
    main(["--workdir", str(workdir), "--rows", "sstoken-base-0.6", "--json", str(tmp_path / "kinds.json")])
    saved = json.loads((tmp_path / "kinds.json").read_text(encoding="utf-8"))
    assert list(saved) == ["pretrained/sstoken-base-0.6/0.500"]
    assert saved["pretrained/sstoken-base-0.6/0.500"]["auc"]["rel"][FILLER_FIRST] == pytest.approx(1 / 3)
    assert "filler-first" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make", "rows", "message"),
    [
        (lambda root: root, ["x"], "train.token_kinds.json not found"),
        (_workdir, ["rho1-0.6"], "no inspect files under"),
    ],
)
def test_cli_errors_name_what_is_missing(tmp_path, capsys, make, rows, message):
    workdir = make(tmp_path / "run")
    with pytest.raises(SystemExit):
        main(["--workdir", str(workdir), "--rows", *rows])
    assert message in capsys.readouterr().err
