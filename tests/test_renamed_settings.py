"""One name for the keep ratio (`ratio`): the old names fail naming it, checkpoints saved with them still load."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lit_tokensel import ForgettingSFT, QTuningSFT, SsTokenSFT
from lit_tokensel.cli import main
from lit_tokensel.export import load_module_from_checkpoint
from lit_tokensel.renamed_settings import migrate_hparams

ROOT = Path(__file__).parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
HINT = "(traceback: add --debug or set LIT_TOKENSEL_DEBUG=1)"


@pytest.mark.parametrize(
    ("cls", "old"), [(SsTokenSFT, "rho"), (ForgettingSFT, "rho"), (QTuningSFT, "token_ratio")]
)
def test_the_old_name_in_python_names_the_new_one(cls, old):
    with pytest.raises(TypeError) as error:
        cls(**{old: 0.5})
    assert str(error.value) == (
        f"{cls.__name__}: `{old}` was renamed to `ratio`: write --model.init_args.ratio "
        "on the command line, `ratio:` under `init_args` in a config"
    )


def _cli_error(capsys, monkeypatch, argv: list[str]) -> str:
    monkeypatch.setattr(sys, "argv", ["lit-tokensel"])
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lit-tokensel")]
    return line


def test_the_old_flag_names_the_new_one(capsys, monkeypatch):
    line = _cli_error(
        capsys,
        monkeypatch,
        [
            "fit",
            "-c",
            str(QUICKSTART),
            "-c",
            str(ROOT / "configs/methods/sstoken.yaml"),
            "--model.init_args.rho",
            "0.5",
        ],
    )
    assert line == (
        "lit-tokensel fit: error: SsTokenSFT: `rho` was renamed to `ratio`: write "
        f"--model.init_args.ratio on the command line, `ratio:` under `init_args` in a config. {HINT}"
    )


def test_the_old_name_in_a_config_file_names_the_new_one(capsys, monkeypatch, tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text("model:\n  class_path: lit_tokensel.QTuningSFT\n  init_args:\n    token_ratio: 0.5\n")
    line = _cli_error(capsys, monkeypatch, ["fit", "-c", str(QUICKSTART), "-c", str(config)])
    assert "QTuningSFT: `token_ratio` was renamed to `ratio`: write --model.init_args.ratio" in line


def test_migrate_hparams_renames_old_keys_and_refuses_both():
    assert migrate_hparams(SsTokenSFT, {"rho": 0.4, "gamma": 1.0}) == {"ratio": 0.4, "gamma": 1.0}
    assert migrate_hparams(QTuningSFT, {"token_ratio": 0.3, "sample_ratio": 0.5}) == {
        "ratio": 0.3,
        "sample_ratio": 0.5,
    }
    assert migrate_hparams(QTuningSFT, {"rho": 0.3}) == {"rho": 0.3}  # not a rename of this class
    with pytest.raises(ValueError, match="both `rho` and `ratio`"):
        migrate_hparams(ForgettingSFT, {"rho": 0.4, "ratio": 0.5})


def test_a_checkpoint_with_the_old_name_loads_for_export(tiny_model_dir, tmp_path):
    module = QTuningSFT(model=tiny_model_dir, sample_ratio=0.5, ratio=0.3)
    module.configure_model()
    hparams = dict(module.hparams)
    hparams["token_ratio"] = hparams.pop("ratio")  # as saved before the rename
    path = tmp_path / "old.ckpt"
    torch.save(
        {
            "method_class": "lit_tokensel.methods.qtuning.QTuningSFT",
            "hyper_parameters": hparams,
            "state_dict": module.state_dict(),
        },
        path,
    )
    loaded = load_module_from_checkpoint(path)
    assert type(loaded) is QTuningSFT and loaded.ratio == 0.3 and loaded.sample_ratio == 0.5
    assert loaded.hparams["ratio"] == 0.3 and "token_ratio" not in loaded.hparams
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_fit_resumes_from_a_checkpoint_with_the_old_name(tmp_path, monkeypatch):
    """`fit --ckpt_path` reads the checkpoint's hyper-parameters into the config (LightningCLI): the old
    name is mapped to `ratio`, whose checkpointed value (0.3) then wins over the config's (0.5)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit-tokensel"])
    common = [
        "-c",
        str(QUICKSTART),
        "-c",
        str(ROOT / "configs/methods/qtuning.yaml"),
        "--data.val_file",
        "null",
        "--data.batch_size",
        "4",
        "--trainer.enable_progress_bar",
        "false",
        "--export.output_dir",
        "null",
    ]
    main(
        [
            "fit",
            *common,
            "--model.init_args.ratio",
            "0.3",
            "--trainer.max_steps",
            "1",
            "--trainer.default_root_dir",
            "first",
            "--trainer.logger.init_args.save_dir",
            "first",
        ]
    )
    (saved,) = Path("first").glob("**/checkpoints/last.ckpt")
    state = torch.load(saved, weights_only=True)
    assert state["hyper_parameters"]["ratio"] == 0.3
    state["hyper_parameters"]["token_ratio"] = state["hyper_parameters"].pop(
        "ratio"
    )  # as saved before the rename
    torch.save(state, tmp_path / "old.ckpt")
    main(
        [
            "fit",
            *common,
            "--trainer.max_steps",
            "2",
            "--ckpt_path",
            str(tmp_path / "old.ckpt"),
            "--trainer.default_root_dir",
            "second",
            "--trainer.logger.init_args.save_dir",
            "second",
        ]
    )
    (resumed,) = Path("second").glob("**/checkpoints/last.ckpt")
    state = torch.load(resumed, weights_only=True)
    assert state["global_step"] == 2
    assert state["hyper_parameters"]["ratio"] == 0.3 and "token_ratio" not in state["hyper_parameters"]
