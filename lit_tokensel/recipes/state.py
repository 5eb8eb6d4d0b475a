"""`recipe.json`: what each stage of a recipe produced, written atomically after every change.

It records, per stage, its status (`running`, `done`), its outputs and (for training stages) the
sha256 of the resolved config, so a re-run skips finished stages and refuses to resume or skip one
whose configuration changed. The top level summarizes the outputs a user wants: reference export,
caches, final run directory, checkpoint and export.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

FILE = "recipe.json"


class RecipeError(RuntimeError):
    """A recipe cannot go on as asked (a changed stage, stale outputs, a workdir of another recipe)."""


class RecipeState:
    """The `recipe.json` of `workdir`; created for `recipe`/`variant`, refused for another recipe."""

    def __init__(self, workdir: Path, recipe: str, variant: str) -> None:
        self.path = workdir / FILE
        if self.path.is_file():
            self.data: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
            if (self.data.get("recipe"), self.data.get("variant")) != (recipe, variant):
                raise RecipeError(
                    f"{workdir} holds a {self.data.get('recipe')}/{self.data.get('variant')} recipe, not "
                    f"{recipe}/{variant}; use another --workdir"
                )
        else:
            self.data = {"recipe": recipe, "variant": variant, "workdir": str(workdir), "stages": {}}

    def stage(self, name: str) -> dict[str, Any]:
        """The record of stage `name` (empty when it never started)."""
        return dict(self.data["stages"].get(name, {}))

    def record(self, name: str, **fields: Any) -> None:
        """Update stage `name`'s record with `fields` and save."""
        self.data["stages"].setdefault(name, {}).update(fields)
        self.save()

    def summarize(self, **fields: Any) -> None:
        """Set top-level summary fields and save."""
        self.data.update(fields)
        self.save()

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{FILE}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)
