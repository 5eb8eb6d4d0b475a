"""Write a trained model as a plain `save_pretrained` directory (LoRA merged) plus its tokenizer.

The result loads with `AutoModelForCausalLM.from_pretrained` and lm-eval's `hf` model. Weights go
through a fresh model built from the config, which also covers GGUF-loaded models (those cannot
`save_pretrained` themselves) and leaves the trained model untouched, adapter included.
"""

from __future__ import annotations

import copy
import importlib
import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lit_tokensel.distributed.checkpoint import consolidate_checkpoint, is_sharded_checkpoint

log = logging.getLogger(__name__)
_LORA_KEY_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


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


def export_pretrained(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, output_dir: str | Path
) -> Path:
    """Save `model` (LoRA merged) and `tokenizer` to `output_dir`; return the directory."""
    base, state = merged_state_dict(model)
    dtype = next(iter(state.values())).dtype
    config = copy.deepcopy(base.config)
    # A GGUF-loaded model's config keeps `quantization_config` (gguf); the export holds plain
    # de-quantized weights, and loaders such as lm-eval's refuse a gguf config without the file.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(state, strict=True)
    fresh.generation_config = base.generation_config
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(output)
    tokenizer.save_pretrained(output)
    log.info("Exported model and tokenizer to %s", output)
    return output


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


def load_module_from_checkpoint(checkpoint: str | Path) -> torch.nn.Module:
    """Rebuild the LightningModule that wrote `checkpoint` (its class is recorded in the file).

    A sharded (DCP) checkpoint folder of an FSDP2 run is consolidated first, in this process.
    """
    if is_sharded_checkpoint(checkpoint):
        with tempfile.TemporaryDirectory(prefix="lit_tokensel-consolidated-") as tmp:
            consolidated = Path(tmp) / "consolidated.ckpt"
            consolidate_checkpoint(checkpoint, consolidated)
            return load_module_from_checkpoint(consolidated)
    meta = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    class_path = meta.get("method_class")
    if not class_path:
        raise ValueError(f"{checkpoint}: no 'method_class' entry; was it written by lit_tokensel?")
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)


def export_checkpoint(checkpoint: str, output_dir: str) -> Path:
    """Export a Lightning checkpoint written by any lit_tokensel method to a `save_pretrained` directory.

    Args:
        checkpoint: Path of the `.ckpt` file, or the checkpoint folder of a sharded (FSDP2) run.
        output_dir: Directory to write the model and tokenizer into.
    """
    module = load_module_from_checkpoint(checkpoint)
    return export_pretrained(module.model, module.tokenizer, output_dir)
