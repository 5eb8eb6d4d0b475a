"""One-command pipelines (`lit-tokensel recipe NAME`): warm-up reference, scoring passes, final method run."""

from lit_tokensel.recipes.registry import RECIPES, RecipeSpec
from lit_tokensel.recipes.runner import RecipeOptions, run_recipe
from lit_tokensel.recipes.state import RecipeError

__all__ = ["RECIPES", "RecipeError", "RecipeOptions", "RecipeSpec", "run_recipe"]
