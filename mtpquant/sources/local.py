"""`source: {path: model-BF16.gguf}`: a BF16/F16 GGUF (or a split model's first shard) already on disk."""

from __future__ import annotations

from mtpquant.core.progress import ProgressFn
from mtpquant.core.rundir import RunDir
from mtpquant.recipe import Recipe
from mtpquant.sources.base import Fetched


class LocalPath:
    kind = "path"

    def fetch(self, recipe: Recipe, run: RunDir, previous: dict, progress: ProgressFn) -> Fetched:
        # the receipt's location says where it lay on this machine; what is published names it only
        return Fetched(recipe.source.path, {"kind": self.kind, "path": recipe.source.path.name}, {})

    def base_model(self, provenance: dict, named: str | None) -> tuple[str | None, str]:
        if named:
            return named, (f"`{named}`, as the recipe states; the source was a local file, so the receipts cannot "
                           "confirm it.")
        return None, "not stated: the source was a local file and the recipe names no base model."


PROVIDER = LocalPath()
