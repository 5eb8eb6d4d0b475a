"""The CLI as a newcomer meets it: a fast, complete --help, one-line errors (exit 2), "did you mean"."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lit_tokensel.cli import COMMANDS, main

ROOT = Path(__file__).parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
HINT = "(traceback: add --debug or set LIT_TOKENSEL_DEBUG=1)"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lit_tokensel.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=300,
    )


def test_help_is_fast_and_lists_every_command_with_examples_one_per_line():
    start = time.perf_counter()
    result = _cli("--help")
    elapsed = time.perf_counter() - start
    print(f"lit-tokensel --help: {elapsed:.2f} s")  # the budget is 2 s; generous bound against load
    assert result.returncode == 0 and elapsed < 5.0
    lines = result.stdout.splitlines()
    for command in ("fit", "validate", "test", "predict", "export", "score", "inspect", "recipe"):
        assert any(line.split()[:1] == [command] and len(line.split()) > 2 for line in lines), command
    assert set(COMMANDS) == {
        "fit",
        "validate",
        "test",
        "predict",
        "export",
        "score",
        "inspect",
        "recipe",
        "data",
    }
    assert "  lit-tokensel fit -c configs/quickstart.yaml" in lines  # examples kept as lines
    assert sum(line.startswith("  lit-tokensel ") for line in lines) >= 6


def test_help_imports_no_heavy_library():
    code = (
        "import sys; from lit_tokensel.cli import usage; usage(); print(sorted(m for m in ('torch', 'lightning', "
        "'transformers', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    assert out.strip() == "[]"


def test_export_help_names_the_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: lit-tokensel export ")


def test_unknown_command_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fitt"])
    assert exit_info.value.code == 2
    assert "unknown command 'fitt'. Did you mean fit?" in capsys.readouterr().err


def _one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lit-tokensel")]
    assert len(err) == 1 and err[0].endswith(HINT), err
    return err[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--trainer.max_stepz", "3"],
            "unknown option --trainer.max_stepz. Did you mean --trainer.max_steps?",
        ),
        (
            ["--model.init_args.learning_rat", "1"],
            "unknown option --model.init_args.learning_rat of lit_tokensel.FullSFT. Did you mean "
            "--model.init_args.learning_rate?",
        ),
        (
            ["--model.class_path", "lit_tokensel.Rho1SFTT"],
            "unknown class lit_tokensel.Rho1SFTT. Did you mean "
            "lit_tokensel.Rho1SFT? Known: ASFTSFT, DFTSFT, EAFTSFT, ForgettingSFT, FullSFT,",
        ),
        (["--trainer.max_steps", "abc"], "--trainer.max_steps: Expected a <class 'int'>. Got value: abc"),
        (["--model.init_args.min_lr_ratio", "2"], "error: min_lr_ratio=2.0 must lie in [0, 1]"),
    ],
)
def test_parse_errors_are_one_line_with_exit_2_and_did_you_mean(capsys, monkeypatch, args, expected):
    monkeypatch.setattr(sys, "argv", ["lit-tokensel"])
    assert expected in _one_line_error(capsys, ["fit", "-c", str(QUICKSTART), *args])


@pytest.mark.parametrize(
    ("config", "args", "expected"),
    [
        (
            "rho1",
            ["--model.init_args.scope", "global"],
            "error: --model.init_args.scope: Expected a typing.Literal['batch', 'sequence']. Got value: global ",
        ),
        (
            "sstoken",
            ["--model.init_args.history.init_args.mode", "avg"],
            "error: --model.init_args.history.init_args.mode: Expected a typing.Literal['ema', 'lagged']. Got value: avg ",
        ),
    ],
)
def test_a_refused_choice_inside_a_class_names_the_full_flag(capsys, monkeypatch, config, args, expected):
    monkeypatch.setattr(sys, "argv", ["lit-tokensel"])
    line = _one_line_error(
        capsys, ["fit", "-c", str(QUICKSTART), "-c", str(ROOT / f"configs/methods/{config}.yaml"), *args]
    )
    assert expected in line


def test_a_reference_class_typo_is_matched_against_the_references(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-tokensel"])
    line = _one_line_error(
        capsys,
        [
            "fit",
            "-c",
            str(QUICKSTART),
            "-c",
            str(ROOT / "configs/methods/sstoken.yaml"),
            "--model.init_args.history.class_path",
            "lit_tokensel.reference.HistoryRef",
        ],
    )
    assert (
        "unknown class lit_tokensel.reference.HistoryRef. Did you mean lit_tokensel.reference.HistoryReference?"
        in line
    )


def test_a_missing_data_file_is_one_line_and_debug_shows_the_traceback(tmp_path):
    args = ("fit", "-c", str(QUICKSTART), "--data.train_file", str(tmp_path / "nope.jsonl"))
    result = _cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"lit-tokensel fit: error: FileNotFoundError: --data.train_file: data file not found: {tmp_path / 'nope.jsonl'} {HINT}"
    )
    assert "Traceback" not in result.stderr
    for debug in (_cli(*args, "--debug"), _cli(*args, env={"LIT_TOKENSEL_DEBUG": "1"})):
        assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def test_known_noise_is_filtered_by_message_only():
    import warnings

    from lit_tokensel.cli.errors import quiet_known_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_known_warnings():
            _warn_three()
    assert [str(w.message) for w in caught] == ["some other deprecation"]


def _warn_three() -> None:
    import warnings

    warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning, stacklevel=1)
    warnings.warn(
        "The number of training batches (4) is smaller than the logging interval Trainer(...)",
        UserWarning,
        stacklevel=1,
    )
    warnings.warn("some other deprecation", DeprecationWarning, stacklevel=1)  # same category: still shown


def test_eval_compare_writes_beside_the_runs_not_into_the_cwd(tmp_path, monkeypatch):
    from lit_tokensel_eval.compare import default_output

    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs" / "eval"
    assert default_output([runs / "a", runs / "b" / "results.csv"]) == runs / "comparison.md"
    assert default_output([runs / "a"]) == runs / "comparison.md"
    assert default_output([tmp_path / "x" / "a", runs / "b"]) == tmp_path / "comparison.md"
