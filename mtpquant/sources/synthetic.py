"""`source: {synthetic: {...}}`: the project's own generator writes the BF16 source into the run directory."""

from __future__ import annotations

import dataclasses
import difflib

from mtpquant import synth
from mtpquant.core.errors import RecipeError, UsageError
from mtpquant.core.files import sha256_json
from mtpquant.core.paths import cache_root
from mtpquant.core.progress import ProgressFn
from mtpquant.core.rundir import RunDir
from mtpquant.modelfile.model import read_model
from mtpquant.recipe import Recipe
from mtpquant.sources.base import Fetched, SourceModel, check

GENERATOR = "mtpquant.synth"


def synth_spec(recipe: Recipe):
    """The generator spec a `source.synthetic` mapping describes; unknown keys are recipe errors."""
    opts = dict(recipe.source.synthetic)
    names = [f.name for f in dataclasses.fields(synth.SynthSpec)]
    problems = []
    for key in opts:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            problems.append(f"{recipe.path}: source.synthetic.{key}: unknown field"
                            + (f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(names)})"))
    if problems:
        raise RecipeError(problems)
    if "name" not in opts:
        opts["name"] = recipe.name
    try:
        return spec_from_dict(opts)
    except UsageError as exc:
        raise RecipeError([f"{recipe.path}: source.synthetic: {line}" for line in exc.message.splitlines()]) from None


def spec_from_dict(opts: dict):
    """A SynthSpec from plain values (recipe or command line); `designed` may be a mapping."""
    opts = dict(opts)
    designed = opts.get("designed")
    try:
        if isinstance(designed, dict):
            opts["designed"] = synth.Designed(**designed)
        return synth.SynthSpec(**opts)
    except TypeError as exc:
        raise UsageError(str(exc).replace("__init__() ", "")) from None


class Synthetic:
    kind = "synthetic"

    def fetch(self, recipe: Recipe, run: RunDir, previous: dict, progress: ProgressFn) -> Fetched:
        spec = synth_spec(recipe)
        spec_key = sha256_json(dataclasses.asdict(spec))
        target = run.root / "source" / f"{recipe.name}-BF16.gguf"
        if previous.get("synthetic_key") != spec_key or not target.is_file():
            progress("synth", 0, 1)
            synth.write_gguf(target, spec, overwrite=True)
            progress("synth", 1, 1)
        return Fetched(target, {"kind": self.kind, "generator": GENERATOR, "spec": dataclasses.asdict(spec),
                                "synthetic_key": spec_key}, {})

    def base_model(self, provenance: dict, named: str | None) -> tuple[str | None, str]:
        line = f"none: the source is a synthetic model made by `{provenance['generator']}`."
        if named:
            line += f" The recipe's base_model `{named}` is left out: these weights did not come from it."
        return None, line


PROVIDER = Synthetic()


def stand_in(recipe: Recipe) -> SourceModel:
    """A header-only (sparse) GGUF with the real model's exact tensor inventory, from `expect.shape`: plans and
    fits exactly like the real source without downloading it."""
    shape = recipe.expect.shape
    if shape is None:
        raise UsageError(f"{recipe.path}: expect.shape is not set, so there is no stand-in for the source",
                         "name the real model's shape, one of: " + ", ".join(synth.PRESETS))
    spec = synth.SynthSpec(name=f"{shape}-stand-in", **synth.PRESETS[shape])
    key = sha256_json(dataclasses.asdict(spec))[:16]
    path = cache_root() / "stand-in" / f"{shape}-{key}.gguf"
    if not path.is_file():
        synth.write_gguf(path, spec, sparse=True, overwrite=True)
    info = read_model(path)
    model = SourceModel(path, info, {path.name: f"stand-in:{key}"},
                        {"kind": "stand-in", "shape": shape, "for": recipe.source.kind})
    check(recipe, model)
    return model
