"""Write a trained model as a plain `save_pretrained` directory (LoRA merged) plus its tokenizer.

The result loads with `AutoModelForCausalLM.from_pretrained` and lm-eval's `hf` model. Weights go
through a fresh model built from the config, which also covers GGUF-loaded models (those cannot
`save_pretrained` themselves) and leaves the trained model untouched, adapter included.

The write is atomic: everything goes to a hidden sibling directory, `export_manifest.json` records
each file's sha256, and only then is it renamed into place (the previous export stays until that
moment). A directory holding another run's export, or anything else, is refused unless `overwrite`.
"""

from __future__ import annotations

import copy
import fcntl
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lit_tokensel.distributed.checkpoint import (
    consolidate_checkpoint,
    is_sharded_checkpoint,
    load_checkpoint_dict,
)
from lit_tokensel.export_files import (
    EXPORT_MANIFEST,
    check_finite,
    read_export_manifest,
    write_export_manifest,
)
from lit_tokensel.renamed_settings import migrate_hparams
from lit_tokensel.trusted_classes import register_trusted_class, resolve_trusted_class

log = logging.getLogger(__name__)
_LORA_KEY_PARTS = (
    ".lora_A.",
    ".lora_B.",
    ".lora_embedding_A.",
    ".lora_embedding_B.",
    ".lora_magnitude_vector.",
)


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def merged_state_dict(model: torch.nn.Module) -> tuple[PreTrainedModel, dict[str, torch.Tensor]]:
    """The base model and its state dict with every active LoRA delta added to its weight.

    Computes `W + delta` per adapted layer instead of peft's in-place `merge_and_unload`, so training
    can go on after an export with bit-identical weights.
    """
    if not _is_peft(model):
        return model, {k: v.detach() for k, v in model.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if adapters:
                deltas[f"{name}.weight"] = sum(module.get_delta_weight(a) for a in adapters)
    state: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if any(part in key for part in _LORA_KEY_PARTS):
            continue
        clean = key.replace(".base_layer.", ".")
        state[clean] = (value + deltas[clean].to(value.dtype)) if clean in deltas else value.detach()
    return base, state


class ExportError(ValueError):
    """The export target is taken (another run's export, other files, or an export in progress)."""


def export_pretrained(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    *,
    source: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save `model` (LoRA merged) and `tokenizer` to `output_dir` atomically; return the directory.

    `source` names what is exported (a run id, a checkpoint path): an existing export of the same
    source is replaced, anything else in `output_dir` is refused unless `overwrite`. Weights holding
    NaN or inf are refused (`NonFiniteWeightsError` naming the tensor) before anything is written.
    """
    base, state = merged_state_dict(model)
    check_finite(state.items(), "the model to export")
    dtype = next(iter(state.values())).dtype
    config = copy.deepcopy(base.config)
    # A GGUF-loaded model's config keeps `quantization_config` (gguf); the export holds plain
    # de-quantized weights, and loaders such as lm-eval's refuse a gguf config without the file.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(state, strict=True)
    fresh.generation_config = base.generation_config
    output = Path(output_dir).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    with _export_lock(output):
        check_export_target(output, source, overwrite)
        tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            tmp.mkdir()
            fresh.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_export_manifest(tmp, source)
            _fsync_files(tmp)  # on disk before the rename makes them the export
            _replace_dir(tmp, output)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("Exported model and tokenizer to %s", output)
    return output


@contextmanager
def _export_lock(output: Path) -> Iterator[None]:
    """Hold `.<name>.lock` next to `output`; a second process exporting there now is refused."""
    lock_file = output.with_name(f".{output.name}.lock")
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(
                f"another process is exporting to {output} right now; two runs never share an export "
                f"directory. Give this one another output dir."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_export_target(output: Path, source: str | None, overwrite: bool) -> None:
    """Refuse an `output` that holds another source's export or other files (an `ExportError`)."""
    if not output.exists():
        return
    if not output.is_dir():
        raise ExportError(f"export target {output} exists and is not a directory; pick another output dir.")
    if overwrite or not any(output.iterdir()):
        return
    manifest = read_export_manifest(output) if (output / EXPORT_MANIFEST).is_file() else None
    if manifest is not None and source is not None and manifest.get("source") == source:
        return  # re-export of the same run or checkpoint: replace it
    held = (
        f"the export of {manifest.get('source')!r}"
        if manifest is not None
        else "files that are not an export of this run"
    )
    raise ExportError(
        f"export target {output} already holds {held}; two runs never share an export directory. Pick "
        f"another output dir, or pass overwrite=True (`--overwrite true`, `--export.overwrite true`) to replace it."
    )


def _fsync_files(directory: Path) -> None:
    for file in directory.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _replace_dir(new: Path, output: Path) -> None:
    """Rename `new` to `output`; an existing `output` is moved aside first and deleted only afterwards."""
    if not output.exists():
        os.rename(new, output)
        return
    old = output.with_name(f".{output.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(output, old)
    try:
        os.rename(new, output)
    except OSError:
        os.rename(old, output)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)


def gather_for_export(model: torch.nn.Module) -> torch.nn.Module | None:
    """`model` itself, or for an FSDP2-sharded model an unsharded copy on global rank 0 (None elsewhere).

    Collective under FSDP2: every rank must call it. The copy is built from the config (LoRA adapter
    re-attached with the same peft config) and loaded with the gathered full state dict, so
    `export_pretrained` then treats it like any single-process model.
    """
    from lit_tokensel.distributed.fsdp import is_fsdp

    if not is_fsdp(model):
        return model
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None  # with cpu_offload only rank 0 receives the full tensors
    base = model.get_base_model() if _is_peft(model) else model
    copy = AutoModelForCausalLM.from_config(base.config, dtype=next(iter(full.values())).dtype)
    if _is_peft(model):
        from peft import get_peft_model

        copy = get_peft_model(copy, model.peft_config[model.active_adapter])
    copy.load_state_dict(full, strict=True)
    copy.generation_config = base.generation_config
    return copy


def load_module_from_checkpoint(checkpoint: str | Path) -> L.LightningModule:
    """Rebuild the LightningModule that wrote `checkpoint` without running anything the file chooses.

    The file is read as plain data (`weights_only=True`, recorded sha256 verified), its
    `method_class` and every `class_path` in its hyper-parameters must be on the allow-list
    (`lit_tokensel.trusted_classes`), and the module is built from those hyper-parameters here, not
    by Lightning's `load_from_checkpoint` (which would follow the file's `_instantiator`). A sharded
    (DCP) checkpoint folder of an FSDP2 run is consolidated first, in this process.
    """
    if is_sharded_checkpoint(checkpoint):
        with tempfile.TemporaryDirectory(prefix="lit_tokensel-consolidated-") as tmp:
            consolidated = Path(tmp) / "consolidated.ckpt"
            consolidate_checkpoint(checkpoint, consolidated)
            return load_module_from_checkpoint(consolidated)
    state = load_checkpoint_dict(checkpoint)
    class_path = state.get("method_class")
    if not class_path:
        raise ValueError(f"{checkpoint}: no 'method_class' entry; was it written by lit_tokensel?")
    cls = resolve_trusted_class(class_path, f"{checkpoint}: method_class", base=L.LightningModule)
    hparams = {k: v for k, v in state.get("hyper_parameters", {}).items() if not k.startswith("_")}
    module = cls(**migrate_hparams(cls, hparams))  # a checkpoint saved before a setting was renamed loads
    module.configure_model()  # the order of Lightning's load_from_checkpoint
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"], strict=True)
    return module


def export_checkpoint(
    checkpoint: str, output_dir: str, overwrite: bool = False, trust_class: list[str] | None = None
) -> Path:
    """Export a Lightning checkpoint written by any lit_tokensel method to a `save_pretrained` directory.

    Args:
        checkpoint: Path of the `.ckpt` file, or the checkpoint folder of a sharded (FSDP2) run.
        output_dir: Directory to write the model and tokenizer into (atomically). One holding the export of
            another checkpoint or other files is refused unless `overwrite`.
        overwrite: Replace whatever `output_dir` holds.
        trust_class: Your own method or reference classes (`pkg.mod.Class`) the checkpoint may name,
            besides lit_tokensel's.
    """
    register_trusted_class(*(trust_class or []))
    module = load_module_from_checkpoint(checkpoint)
    source = f"checkpoint:{Path(checkpoint).absolute()}"
    return export_pretrained(module.model, module.tokenizer, output_dir, source=source, overwrite=overwrite)
