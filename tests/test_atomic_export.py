"""Export is atomic, never shared silently, checksummed, and refuses non-finite weights (export and eval)."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lit_tokensel.callbacks.export import ExportOnFitEnd
from lit_tokensel.export import ExportError, export_pretrained
from lit_tokensel.export_files import EXPORT_MANIFEST, NonFiniteWeightsError, verify_export_dir
from lit_tokensel.integrity import IntegrityError, sha256_file
from lit_tokensel.modeling.loading import load_causal_lm, load_tokenizer


@pytest.fixture
def model_and_tokenizer(tiny_model_dir):
    return load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_export_writes_a_manifest_of_every_file(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    out = export_pretrained(model, tokenizer, tmp_path / "export", source="run:a")
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    files = sorted(p.name for p in out.iterdir() if p.name != EXPORT_MANIFEST)
    assert sorted(manifest["files"]) == files and "model.safetensors" in files
    for name, entry in manifest["files"].items():
        assert entry == {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
    assert manifest["source"] == "run:a"
    assert verify_export_dir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.lock", "export"]  # no temporary left


def test_export_killed_mid_write_keeps_the_previous_export_identical(
    model_and_tokenizer, tmp_path, monkeypatch
):
    model, tokenizer = model_and_tokenizer
    out = export_pretrained(model, tokenizer, tmp_path / "export", source="run:a")
    before = _snapshot(out)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a different model, so a half-written one would show

    def dies_half_way(self, save_directory, *args, **kwargs):
        Path(save_directory, "config.json").write_text("{}")
        Path(save_directory, "model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        export_pretrained(model, tokenizer, out, source="run:a")
    monkeypatch.undo()
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.lock", "export"]
    assert verify_export_dir(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(next(reloaded.parameters()), next(model.parameters()))


def test_reexport_of_the_same_source_replaces_it(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    out = export_pretrained(model, tokenizer, tmp_path / "export", source="run:a")
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    export_pretrained(model, tokenizer, out, source="run:a")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(next(reloaded.parameters()), next(model.parameters()))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.lock", "export"]


def test_another_runs_export_or_other_files_are_refused_unless_overwrite(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    out = export_pretrained(model, tokenizer, tmp_path / "export", source="run:a")
    before = _snapshot(out)
    with pytest.raises(ExportError, match=r"already holds the export of 'run:a'; two runs never share"):
        export_pretrained(model, tokenizer, out, source="run:b")
    assert _snapshot(out) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="files that are not an export of this run"):
        export_pretrained(model, tokenizer, other, source="run:b")
    assert (other / "notes.txt").read_text() == "mine"
    export_pretrained(model, tokenizer, out, source="run:b", overwrite=True)
    assert json.loads((out / EXPORT_MANIFEST).read_text())["source"] == "run:b"


def test_a_concurrent_export_to_the_same_dir_is_refused(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    with open(tmp_path / ".export.lock", "a+") as other_process:
        fcntl.flock(other_process, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ExportError, match="another process is exporting to"):
            export_pretrained(model, tokenizer, tmp_path / "export", source="run:b")
    assert not (tmp_path / "export").exists()


def test_fit_with_a_taken_export_dir_fails_before_training(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    export_pretrained(model, tokenizer, tmp_path / "export", source="run:someone-else")
    trainer = SimpleNamespace(is_global_zero=True, log_dir=str(tmp_path), default_root_dir=str(tmp_path))
    callback = ExportOnFitEnd()
    with pytest.raises(ExportError, match="someone-else"):
        callback.on_fit_start(trainer, None)
    ExportOnFitEnd(overwrite=True).on_fit_start(trainer, None)
    resumed = ExportOnFitEnd()
    resumed.load_state_dict({"run_id": "someone-else"})  # the same run, resumed from its checkpoint
    resumed.on_fit_start(trainer, None)


def test_non_finite_weights_are_refused_naming_the_tensor(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
        model.model.layers[1].mlp.up_proj.weight[1, 0] = float("inf")
    with pytest.raises(
        NonFiniteWeightsError, match=r"'model.layers.1.mlp.up_proj.weight' \(64, 32\) holds 2 non-finite"
    ):
        export_pretrained(model, tokenizer, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_flipped_byte_in_exported_weights_is_named_by_every_loader(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    out = export_pretrained(model, tokenizer, tmp_path / "export")
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    message = rf"{weights} is corrupted: it does not match the size and sha256 recorded in {EXPORT_MANIFEST}"
    with pytest.raises(IntegrityError, match=message):
        verify_export_dir(out)
    with pytest.raises(IntegrityError, match=message):
        load_causal_lm(str(out))  # fit/score/reference with `model: <export dir>`
    pytest.importorskip("lm_eval")
    from lit_tokensel_eval.models import open_model

    with pytest.raises(IntegrityError, match=message), open_model(out, device="cpu"):
        pass


def test_eval_refuses_non_finite_weights_in_a_directory_and_in_memory(model_and_tokenizer, tmp_path):
    pytest.importorskip("lm_eval")
    from lit_tokensel_eval.models import InMemoryModel, open_model

    model, tokenizer = model_and_tokenizer
    with torch.no_grad():
        model.lm_head.weight[3, 3] = float("nan")
    model.save_pretrained(tmp_path / "plain")  # written without lit_tokensel: no manifest
    tokenizer.save_pretrained(tmp_path / "plain")
    with pytest.raises(
        NonFiniteWeightsError, match=r"model.safetensors: tensor 'lm_head.weight' \(512, 32\) holds 1"
    ):
        with open_model(tmp_path / "plain", device="cpu"):
            pass
    with pytest.raises(NonFiniteWeightsError, match="in-memory: tensor 'lm_head.weight'"):
        with open_model(InMemoryModel(model, tokenizer), device="cpu"):
            pass
