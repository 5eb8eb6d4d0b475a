"""What to evaluate: an exported model directory, a Lightning checkpoint, a built-in model, or a model in memory.

Each becomes an lm-eval `HFLM`. A directory is handed to `HFLM` by path, exactly as
`lm_eval --model hf --model_args pretrained=DIR` would load it, so both give the same numbers. A
checkpoint (a `.ckpt` file, or the sharded folder of an FSDP2 run) is first exported
(`lit_tokensel.export.export_checkpoint`, LoRA merged) to a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class InMemoryModel:
    """A model object and its tokenizer, evaluated without writing anything to disk."""

    model: torch.nn.Module
    tokenizer: Any
    name: str = "in-memory"


ModelLike = str | Path | InMemoryModel


def is_checkpoint(path: Path) -> bool:
    """A Lightning checkpoint: a `.ckpt` file, or the sharded (DCP) folder of an FSDP2 run (has `.metadata`)."""
    return path.is_file() or (path.is_dir() and (path / ".metadata").is_file())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_folder(path: Path) -> str:
    """The nearest folder name that is not Lightning's `version_N`, `checkpoints` or the `export` folder."""
    for part in reversed(path.parts):
        if part not in ("checkpoints", "export", "/") and not re.fullmatch(r"version_\d+", part):
            return part
    return ""


def model_name(model: ModelLike) -> str:
    """A short run name: `runs/quickstart/full_sft/version_0/export` -> `full_sft`,
    `.../full_sft/version_0/checkpoints/last.ckpt` -> `full_sft-last`, `builtin:tiny-llama` -> `tiny-llama`."""
    if isinstance(model, InMemoryModel):
        return model.name
    text = str(model)
    if text.startswith("builtin:"):
        return text.removeprefix("builtin:")
    path = Path(text).resolve()
    if is_checkpoint(path):
        folder = _run_folder(path.parent)
        return f"{folder}-{path.stem}" if folder else path.stem
    return _run_folder(path) or text


def _check_model_dir(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a saved model directory (no config.json); pass an exported model "
            f"directory, a .ckpt checkpoint, or builtin:<name>"
        )
    quantization = json.loads(config_file.read_text()).get("quantization_config") or {}
    if quantization.get("quant_method") == "gguf" and not any(path.glob("*.gguf")):
        raise ValueError(
            f"{config_file}: declares GGUF quantization ('quantization_config') but {path} holds no GGUF file, only "
            f"plain weights (a save_pretrained of a GGUF-loaded model looks like this). lm-eval's hf model refuses "
            f"it. Delete the 'quantization_config' entry from config.json, or evaluate the loaded model in memory."
        )


def _check_chat_template(tokenizer: Any, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{where}: the tokenizer has no chat template, but the requested tasks apply one (the "
            f"bundled tasks always do). Evaluate with apply_chat_template=False, or export the model "
            f"with the tokenizer it was trained with (lit_tokensel sets a ChatML template on it)."
        )


@contextlib.contextmanager
def open_model(
    model: ModelLike,
    *,
    batch_size: int | str = 8,
    device: str | None = None,
    needs_chat_template: bool = False,
    **hflm_kwargs: Any,
) -> Iterator[Any]:
    """An `HFLM` for `model`, valid inside the `with` block.

    A checkpoint's temporary export is removed afterwards; an in-memory model gets its train/eval mode
    back (`HFLM` switches it to eval mode).
    """
    from lm_eval.models.huggingface import HFLM

    device = device or default_device()
    if isinstance(model, InMemoryModel):
        from lit_tokensel.export_files import check_finite

        check_finite(model.model.named_parameters(), model.name)  # NaN weights give meaningless scores
        if needs_chat_template:
            _check_chat_template(model.tokenizer, model.name)
        was_training = model.model.training
        try:
            yield HFLM(
                pretrained=model.model, tokenizer=model.tokenizer, batch_size=batch_size, **hflm_kwargs
            )
        finally:
            model.model.train(was_training)
        return
    text = str(model)
    if text.startswith("builtin:"):
        from lit_tokensel.modeling.loading import load_causal_lm, load_tokenizer

        loaded = InMemoryModel(load_causal_lm(text).to(device), load_tokenizer(text), model_name(text))
        with open_model(
            loaded,
            batch_size=batch_size,
            device=device,
            needs_chat_template=needs_chat_template,
            **hflm_kwargs,
        ) as lm:
            yield lm
        return
    path = Path(text)
    if is_checkpoint(path):
        from lit_tokensel.export import export_checkpoint

        with tempfile.TemporaryDirectory(prefix="lit_tokensel_eval-") as tmp:
            log.info("Exporting checkpoint %s to %s for evaluation", path, tmp)
            exported = export_checkpoint(str(path), tmp)
            with open_model(
                exported,
                batch_size=batch_size,
                device=device,
                needs_chat_template=needs_chat_template,
                **hflm_kwargs,
            ) as lm:
                yield lm
        return
    if not path.exists():
        raise FileNotFoundError(
            f"model {text!r} not found: pass an exported model directory, a .ckpt "
            f"checkpoint, or builtin:<name>"
        )
    _check_model_dir(path)
    from lit_tokensel.export_files import check_finite_dir, verify_export_dir

    verify_export_dir(path)  # the sha256 of every file, when exported by lit_tokensel
    check_finite_dir(path)
    lm = HFLM(pretrained=str(path), device=device, batch_size=batch_size, **hflm_kwargs)
    if needs_chat_template:
        _check_chat_template(lm.tokenizer, str(path))
    yield lm
