"""The recipes `lit-tokensel recipe NAME` knows: each maps a variant to its final method config.

A recipe is always the same pipeline (warm-up reference if needed, scoring passes, final run); what
differs is the final method and whether it needs the reference model. Adding a method that ranks
`L_base - L_reference` (or only needs `L_base`) is one entry here plus its method-only YAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
"""The repository's `configs/` folder (recipe method configs are given relative to it)."""


@dataclass(frozen=True)
class RecipeSpec:
    """One variant of a recipe.

    Attributes:
        method_config: YAML of the final run, relative to `configs/` (or absolute). It is stacked after
            the user's configs, so it holds only the method's `class_path` and its own init_args (never
            base-run settings such as `model`, `learning_rate` or `lora`), plus data or trainer keys the
            method needs. The recipe sets `data.cached_losses` to caches named `base` and `reference`.
        needs_reference: Train a warm-up reference model and score it (cache `reference`) besides the base.
        chunked: One epoch per data chunk: `--chunks N` sets `model.init_args.chunks`,
            `data.epoch_chunks` and `trainer.max_epochs` to N.
        summary: One line for `--help`.
    """

    method_config: str
    needs_reference: bool
    chunked: bool = False
    summary: str = ""

    def config_path(self) -> Path:
        path = Path(self.method_config)
        path = path if path.is_absolute() else CONFIGS / path
        if not path.is_file():
            raise FileNotFoundError(
                f"recipe method config {path} not found (the recipes read the repository's configs/ folder); "
                f"pass --method_config PATH"
            )
        return path


RECIPES: dict[str, dict[str, RecipeSpec]] = {
    "token-cleaning": {
        "fixed": RecipeSpec(
            "recipes/token_cleaning/fixed.yaml",
            needs_reference=True,
            summary="fixed-model TokenCleaning: global top 60% by L_base - L_reference",
        ),
        "self-evolving": RecipeSpec(
            "recipes/token_cleaning/self_evolving.yaml",
            needs_reference=False,
            chunked=True,
            summary="self-evolving TokenCleaning: round t keeps chunk t's top 60% by L_base - L_theta_t",
        ),
    },
    "forgetting": {
        "default": RecipeSpec(
            "recipes/forgetting/method.yaml",
            needs_reference=True,
            summary="Forgetting: top 70% by L_base - L_reference learned, the rest unlearned",
        ),
    },
}
"""Recipe name -> variant name -> spec; the first variant is the default."""


def resolve(name: str, variant: str | None) -> tuple[str, RecipeSpec]:
    """The variant name and spec of recipe `name` (the first variant when `variant` is None)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    variants = RECIPES[name]
    variant = variant or next(iter(variants))
    if variant not in variants:
        raise ValueError(f"recipe {name!r} has no variant {variant!r}; available: {', '.join(variants)}")
    return variant, variants[variant]


def describe() -> str:
    """Every recipe and variant, one per line (for `--help`)."""
    return "\n".join(
        f"  {name} --variant {variant}{' (default)' if i == 0 else ''}: {spec.summary}"
        for name, variants in RECIPES.items()
        for i, (variant, spec) in enumerate(variants.items())
    )
