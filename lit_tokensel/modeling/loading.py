"""Load a causal LM and its tokenizer: hub id, local directory, GGUF file or a built-in tiny model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lit_tokensel.builtin.models import resolve_builtin
from lit_tokensel.export_files import verify_export_dir

WeightDType = Literal["float32", "bfloat16", "float16"]
"""The weight dtypes a model loads in (`DTYPES` maps them to torch's)."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft). `target_modules="all-linear"` adapts every linear projection."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")


def resolve_model_path(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map `builtin:<name>` to a local directory (and its GGUF file); pass anything else through."""
    if name_or_path.startswith("builtin:"):
        path, builtin_gguf = resolve_builtin(name_or_path)
        return path, gguf_file or builtin_gguf
    return name_or_path, gguf_file


def load_tokenizer(name_or_path: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Tokenizer for a model; pads with eos when the tokenizer has no pad token."""
    path, gguf_file = resolve_model_path(name_or_path, gguf_file)
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    dtype: WeightDType = "float32",
    attn_implementation: str = "sdpa",
    gguf_file: str | None = None,
    gradient_checkpointing: bool = False,
    lora: LoraSettings | None = None,
) -> PreTrainedModel:
    """Instantiate the model to train, optionally wrapped in a LoRA adapter.

    With LoRA only the adapter weights are trainable; the base stays frozen, and the base without
    the adapter is available through peft's `disable_adapter()` (the reference providers use it).
    A directory exported by lit_tokensel has its files' sha256 checked first. Remote code from the
    hub is never run (`trust_remote_code` stays at transformers' default, off).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")
    path, gguf_file = resolve_model_path(name_or_path, gguf_file)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "attn_implementation": attn_implementation}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if os.path.isdir(path):
        verify_export_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora is not None:
        model = apply_lora(model, lora)
    return model


def apply_lora(model: PreTrainedModel, lora: LoraSettings) -> PreTrainedModel:
    """Wrap `model` in a peft LoRA adapter (needs the `lora` extra)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("LoRA needs peft: pip install 'lit-tokensel[lora]'") from err
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    flag = (
        "is_activation_checkpointing"
        if hasattr(model, "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    if getattr(model, flag, False):
        model.enable_input_require_grads()
    return get_peft_model(model, config)
