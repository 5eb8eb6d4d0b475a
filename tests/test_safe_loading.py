"""Checkpoints are data: no pickle payload or class named in a file runs, and a flipped byte is an error.

Each hostile checkpoint goes through the four readers a user has: `lit-tokensel export`,
`lit-tokensel inspect --ckpt_path`, `lit-tokensel-eval run --model X.ckpt` and `lit-tokensel fit --ckpt_path`;
each must refuse it with an error naming the file, and the payload's marker file must not exist.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import lit_tokensel.methods as methods_package
import lit_tokensel.reference as reference_package
from lit_tokensel.checkpoint_io import ChecksummedCheckpointIO, UnsafeCheckpointError, load_checkpoint_file
from lit_tokensel.cli import main
from lit_tokensel.export import load_module_from_checkpoint
from lit_tokensel.integrity import IntegrityError
from lit_tokensel.methods import FullSFT, TokenSelectionModule
from lit_tokensel.reference import ReferenceModel, reference_from_config
from lit_tokensel.trusted_classes import (
    PROJECT_CLASSES,
    UntrustedClassError,
    register_trusted_class,
    unregister_trusted_class,
)

QUICKSTART = Path(__file__).parents[1] / "configs" / "quickstart.yaml"


class TouchPayload:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class MyMethod(FullSFT):
    """A user's own method, trusted only once registered."""


@pytest.fixture(autouse=True)
def _cli_errors_propagate(monkeypatch):
    """`lit-tokensel` reports errors as one line and exit 2; with debug on, the tests see the exception itself."""
    monkeypatch.setenv("LIT_TOKENSEL_DEBUG", "1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`last.ckpt` (with its sidecar) of a 2-step quickstart fit through the CLI."""
    run_dir = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run_dir)
        mp.setattr(sys, "argv", ["lit-tokensel"])
        main(
            [
                "fit",
                "-c",
                str(QUICKSTART),
                "--trainer.max_steps",
                "2",
                "--trainer.val_check_interval",
                "1",
                "--trainer.limit_val_batches",
                "1",
                "--trainer.enable_progress_bar",
                "false",
                "--export.output_dir",
                str(run_dir / "export"),
            ]
        )
    return run_dir / "runs" / "quickstart" / "full_sft" / "version_0" / "checkpoints" / "last.ckpt"


def _plain(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def pickle_payload(checkpoint: Path, target: Path, marker: Path) -> Path:
    state = _plain(checkpoint)
    state["hyper_parameters"]["extra"] = TouchPayload(marker)
    torch.save(state, target)
    return target


def class_path_payload(checkpoint: Path, target: Path, marker: Path) -> Path:
    state = _plain(checkpoint)  # plain data only: loads under weights_only=True
    state["method_class"] = "lit_tokensel.methods.rho1.Rho1SFT"
    state["hyper_parameters"]["_class_path"] = "lit_tokensel.Rho1SFT"
    state["hyper_parameters"]["reference"] = {
        "class_path": "os.system",
        "init_args": {"command": f"touch {marker}"},
    }
    torch.save(state, target)
    return target


def method_class_payload(checkpoint: Path, target: Path, marker: Path) -> Path:
    state = _plain(checkpoint)
    state["method_class"] = "subprocess.getoutput"
    torch.save(state, target)
    return target


PAYLOADS = {
    "pickle": (pickle_payload, UnsafeCheckpointError, "pickled Python objects"),
    "class_path": (
        class_path_payload,
        UntrustedClassError,
        "'os.system', which is not on lit_tokensel's allow-list",
    ),
    "method_class": (method_class_payload, UntrustedClassError, "'subprocess.getoutput', which is not"),
}


def run_export(path: Path, tmp_path: Path) -> None:
    main(["export", "--checkpoint", str(path), "--output_dir", str(tmp_path / "export")])


def run_inspect(path: Path, tmp_path: Path) -> None:
    main(
        [
            "inspect",
            "-c",
            str(QUICKSTART),
            "--output",
            str(tmp_path / "kept.jsonl"),
            "--limit",
            "2",
            "--ckpt_path",
            str(path),
        ]
    )


def run_fit(path: Path, tmp_path: Path) -> None:
    main(
        [
            "fit",
            "-c",
            str(QUICKSTART),
            "--ckpt_path",
            str(path),
            "--trainer.max_steps",
            "3",
            "--trainer.default_root_dir",
            str(tmp_path / "fit"),
            "--trainer.logger",
            "false",
            "--trainer.callbacks",
            "[]",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )


READERS = {"export": run_export, "inspect": run_inspect, "fit": run_fit}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_hostile_checkpoint_is_refused_and_runs_nothing(checkpoint, tmp_path, monkeypatch, reader, payload):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    make, error, message = PAYLOADS[payload]
    hostile = make(checkpoint, tmp_path / "hostile.ckpt", marker)
    with pytest.raises(error, match=message) as info:
        READERS[reader](hostile, tmp_path)
    assert str(hostile) in str(info.value)
    assert not marker.exists(), "the checkpoint's payload ran"
    assert not (tmp_path / "export").exists() and not (tmp_path / "kept.jsonl").exists()


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_eval_cli_refuses_hostile_checkpoint(checkpoint, tmp_path, capsys, payload):
    pytest.importorskip("lm_eval")
    from lit_tokensel_eval.cli import main as eval_main

    marker = tmp_path / "pwned"
    make, _, message = PAYLOADS[payload]
    hostile = make(checkpoint, tmp_path / "hostile.ckpt", marker)
    with pytest.raises(SystemExit) as info:
        eval_main(
            [
                "run",
                "--model",
                str(hostile),
                "--tasks",
                "quickstart_mc",
                "--limit",
                "2",
                "--output_dir",
                str(tmp_path / "eval"),
                "--bootstrap_iters",
                "0",
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and str(hostile) in err
    assert not marker.exists()


def _flip_byte(source: Path, target: Path) -> Path:
    shutil.copy(source, target)
    shutil.copy(source.with_name(source.name + ".sha256"), target.with_name(target.name + ".sha256"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("reader", sorted(READERS))
def test_flipped_byte_in_checkpoint_is_named(checkpoint, tmp_path, monkeypatch, reader):
    monkeypatch.chdir(tmp_path)
    flipped = _flip_byte(checkpoint, tmp_path / "flipped.ckpt")
    with pytest.raises(IntegrityError, match=r"flipped\.ckpt is corrupted: its sha256 is"):
        READERS[reader](flipped, tmp_path)


def test_eval_cli_names_flipped_checkpoint(checkpoint, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from lit_tokensel_eval.cli import main as eval_main

    flipped = _flip_byte(checkpoint, tmp_path / "flipped.ckpt")
    with pytest.raises(SystemExit) as info:
        eval_main(
            [
                "run",
                "--model",
                str(flipped),
                "--tasks",
                "quickstart_mc",
                "--limit",
                "2",
                "--output_dir",
                str(tmp_path / "eval"),
                "--bootstrap_iters",
                "0",
            ]
        )
    assert info.value.code == 2
    assert f"{flipped} is corrupted" in capsys.readouterr().err


def test_cli_checkpoints_carry_a_matching_sha256_sidecar(checkpoint):
    sidecar = checkpoint.with_name("last.ckpt.sha256").read_text()
    assert (
        sidecar == f"{hashlib.sha256(checkpoint.read_bytes()).hexdigest()}  last.ckpt\n"
    )  # sha256sum -c format
    for ckpt in checkpoint.parent.glob("*.ckpt"):
        assert ckpt.with_name(ckpt.name + ".sha256").is_file()


def test_checkpoint_io_writes_atomically_and_removes_the_sidecar(tmp_path):
    io = ChecksummedCheckpointIO()
    target = tmp_path / "a" / "x.ckpt"
    io.save_checkpoint(
        {"state_dict": {"w": torch.arange(3.0)}, "method_class": "lit_tokensel.FullSFT"}, target
    )
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.ckpt", "x.ckpt.sha256"]  # no temporary left
    assert torch.equal(io.load_checkpoint(target)["state_dict"]["w"], torch.arange(3.0))
    io.remove_checkpoint(target)
    assert list(target.parent.iterdir()) == []


def test_checkpoint_without_sidecar_still_loads(checkpoint, tmp_path):
    copy = tmp_path / "plain.ckpt"
    shutil.copy(checkpoint, copy)
    assert load_checkpoint_file(copy)["method_class"] == "lit_tokensel.methods.full_sft.FullSFT"


def test_registered_class_is_accepted_and_unregistered_refused(checkpoint, tmp_path):
    state = _plain(checkpoint)
    state["method_class"] = f"{MyMethod.__module__}.MyMethod"
    custom = tmp_path / "custom.ckpt"
    torch.save(state, custom)
    with pytest.raises(UntrustedClassError, match="register_trusted_class"):
        load_module_from_checkpoint(custom)
    register_trusted_class(MyMethod)
    try:
        module = load_module_from_checkpoint(custom)
    finally:
        unregister_trusted_class(MyMethod)
    assert type(module) is MyMethod
    for key, value in state["state_dict"].items():
        assert torch.equal(module.state_dict()[key], value)


def test_env_variable_trusts_a_class(monkeypatch):
    name = "tests.test_safe_loading.MyMethod"
    with pytest.raises(UntrustedClassError):
        reference_from_config({"class_path": name, "init_args": {}})
    monkeypatch.setenv("LIT_TOKENSEL_TRUSTED_CLASSES", f"x.Y, {name}")
    with pytest.raises(UntrustedClassError, match="which is not a subclass of ReferenceModel"):
        reference_from_config({"class_path": name, "init_args": {}})  # trusted, but not a reference


def test_allow_list_holds_every_method_and_reference_of_the_project():
    classes = [
        c
        for c in vars(methods_package).values()
        if isinstance(c, type) and issubclass(c, TokenSelectionModule)
    ]
    classes += [
        c for c in vars(reference_package).values() if isinstance(c, type) and issubclass(c, ReferenceModel)
    ]
    concrete = [c for c in classes if not inspect.isabstract(c) and c is not TokenSelectionModule]
    assert len(concrete) == 16  # 12 methods (DFT, EAFT, ASFT included) and 4 references
    for cls in concrete:
        assert f"{cls.__module__}.{cls.__qualname__}" in PROJECT_CLASSES
    for name in sorted(PROJECT_CLASSES):
        module, _, attr = name.rpartition(".")
        assert isinstance(getattr(__import__(module, fromlist=[attr]), attr), type), name


def test_model_loading_never_enables_remote_code(monkeypatch, tmp_path):
    from lit_tokensel.modeling import loading

    calls = []

    def record(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", record)
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", record)
    for load in (loading.load_causal_lm, loading.load_tokenizer):
        with pytest.raises(RuntimeError, match="stop"):
            load("someone/remote-model")
    assert len(calls) == 2 and all(not kwargs.get("trust_remote_code", False) for kwargs in calls)


def test_fit_resumes_from_its_own_checksummed_checkpoint(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "-c",
            str(QUICKSTART),
            "--ckpt_path",
            str(checkpoint),
            "--trainer.max_steps",
            "3",
            "--trainer.default_root_dir",
            str(tmp_path / "fit"),
            "--trainer.logger",
            "false",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks",
            "[]",
            "--export.output_dir",
            str(tmp_path / "export"),
        ]
    )
    assert (tmp_path / "export" / "export_manifest.json").is_file()


def test_export_cli_trusts_a_class_given_on_the_command_line(checkpoint, tmp_path):
    state = _plain(checkpoint)
    state["method_class"] = f"{MyMethod.__module__}.MyMethod"
    custom = tmp_path / "custom.ckpt"
    torch.save(state, custom)
    try:
        main(
            [
                "export",
                "--checkpoint",
                str(custom),
                "--output_dir",
                str(tmp_path / "export"),
                "--trust_class",
                f"[{MyMethod.__module__}.MyMethod]",
            ]
        )
    finally:
        unregister_trusted_class(MyMethod)
    assert (tmp_path / "export" / "model.safetensors").is_file()
    with pytest.raises(UntrustedClassError):
        load_module_from_checkpoint(custom)


def test_inspect_api_trusts_the_class_of_the_module_it_loads_into(checkpoint, tmp_path):
    from lit_tokensel.inspection import load_training_state

    state = _plain(checkpoint)
    state["method_class"] = f"{MyMethod.__module__}.MyMethod"  # e.g. the noisy-SFT benchmark's OracleSFT
    custom = tmp_path / "custom.ckpt"
    torch.save(state, custom)
    module = MyMethod(**{k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")})
    module.configure_model()
    assert load_training_state(module, custom) == 2
    plain = FullSFT(**{k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")})
    plain.configure_model()
    with pytest.raises(UntrustedClassError, match="MyMethod"):
        load_training_state(plain, custom)


def test_sharded_checkpoint_with_a_pickle_payload_in_its_metadata_is_refused(tmp_path, monkeypatch):
    import pickle

    import torch.distributed.checkpoint as dcp

    from lit_tokensel.checkpoint_io import check_sharded_checkpoint

    good = tmp_path / "good.ckpt"
    dcp.save({"state_dict": {"w": torch.arange(4.0)}}, checkpoint_id=good, no_dist=True)
    check_sharded_checkpoint(good)  # real DCP metadata passes
    marker = tmp_path / "pwned"
    hostile = Path(shutil.copytree(good, tmp_path / "hostile.ckpt"))
    (hostile / ".metadata").write_bytes(pickle.dumps(TouchPayload(marker)))
    monkeypatch.chdir(tmp_path)
    for reader in (run_export, run_fit):
        with pytest.raises(
            UnsafeCheckpointError, match=r"hostile\.ckpt/\.metadata: refused to load the sharded"
        ):
            reader(hostile, tmp_path)
    assert not marker.exists()
