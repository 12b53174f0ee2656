"""The source model: a local GGUF, the synthetic generator, or (see hub.py) a pinned Hugging Face revision."""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from mtpquant.errors import MtpquantError, RecipeError, UsageError
from mtpquant.files import sha256_file, sha256_json
from mtpquant.inspect import ModelInfo, read_model
from mtpquant.progress import ProgressFn, no_progress
from mtpquant.receipts import RunDir
from mtpquant.recipe import Recipe

QUANTIZABLE_SOURCE_TYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class SourceModel:
    path: Path  # the file llama.cpp tools are given (first shard of a split model)
    info: ModelInfo
    files: dict  # file name -> sha256, every shard
    provenance: dict  # what the receipt and card say about where it came from

    @property
    def sha256(self) -> str:
        """One digest for the whole source (its shards' digests in order)."""
        if len(self.files) == 1:
            return next(iter(self.files.values()))
        return sha256_json(sorted(self.files.items()))


def synth_spec(recipe: Recipe):
    """The generator spec a `source.synthetic` mapping describes; unknown keys are recipe errors."""
    from mtpquant import synth

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
    from mtpquant import synth

    opts = dict(opts)
    designed = opts.get("designed")
    try:
        if isinstance(designed, dict):
            opts["designed"] = synth.Designed(**designed)
        return synth.SynthSpec(**opts)
    except TypeError as exc:
        raise UsageError(str(exc).replace("__init__() ", "")) from None


def _hash_files(paths: tuple[Path, ...], cache: dict, progress: ProgressFn) -> dict[str, str]:
    """sha256 per file, reusing the previous receipt's value when size and mtime are unchanged."""
    out = {}
    total = sum(p.stat().st_size for p in paths)
    done = 0
    for p in paths:
        st = p.stat()
        key = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key in cache:
            out[p.name] = cache[key]
            done += st.st_size
            progress("hash source", done, total)
            continue

        def step(n: int, _base=done) -> None:
            nonlocal done
            done += n
            progress("hash source", done, total)

        out[p.name] = cache[key] = sha256_file(p, step)
    return out


def stand_in(recipe: Recipe) -> SourceModel:
    """A header-only (sparse) GGUF with the real model's exact tensor inventory, from `expect.shape`: plans and
    fits exactly like the real source without downloading it."""
    from mtpquant import synth
    from mtpquant.toolchain import cache_root

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


def prepare(recipe: Recipe, run: RunDir, progress: ProgressFn = no_progress) -> SourceModel:
    """Resolve the recipe's source to a GGUF on disk, hash it, read its header, check it against the recipe."""
    previous = run.read_receipt("source") or {}
    cache = previous.get("hash_cache", {})
    src = recipe.source
    provenance: dict
    if src.kind == "synthetic":
        from mtpquant import synth

        spec = synth_spec(recipe)
        spec_key = sha256_json(dataclasses.asdict(spec))
        target = run.root / "source" / f"{recipe.name}-BF16.gguf"
        if previous.get("synthetic_key") != spec_key or not target.is_file():
            progress("synth", 0, 1)
            synth.write_gguf(target, spec, overwrite=True)
            progress("synth", 1, 1)
        path = target
        provenance = {"kind": "synthetic", "generator": "mtpquant.synth", "spec": dataclasses.asdict(spec),
                      "synthetic_key": spec_key}
    elif src.kind == "path":
        path = src.path
        provenance = {"kind": "path", "path": str(path)}
    else:
        from mtpquant import hub

        path, provenance = hub.fetch_source(recipe, run, progress)
        cache.update(provenance.get("hf_verified") or {})  # hub.py hashed these while verifying the download
    info = read_model(path)
    files = _hash_files(info.paths, cache, progress)
    model = SourceModel(path, info, files, provenance)
    check(recipe, model)
    run.write_receipt("source", {
        **provenance, "file": path.name, "files": files, "sha256": model.sha256,
        "architecture": info.arch, "block_count": info.block_count, "main_layers": info.n_layer,
        "nextn_predict_layers": info.nextn.layers, "nextn_complete": info.nextn.complete,
        "file_type": info.file_type_name, "bytes": info.total_bytes, "n_elements": info.n_elements,
        "n_tensors": len(info.tensors), "synthetic_key": provenance.get("synthetic_key"),
        "hash_cache": {k: v for k, v in cache.items() if any(k.startswith(str(p.resolve()) + ":") for p in info.paths)},
    })
    return model


def expect_problems(recipe: Recipe, arch: str | None, main_layers: int | None, nextn_layers: int | None,
                    nextn_field: str | None = None) -> list[str]:
    """What about a source's architecture and layer counts contradicts `expect:` and `mtp.require` (None: unknown,
    not checked). Shared by the local check and the early checks of Hugging Face headers and configs."""
    e, problems = recipe.expect, []
    if recipe.mtp_require and nextn_layers == 0:
        problems.append(f"has no NextN/MTP block ({nextn_field or f'{arch}.nextn_predict_layers'} is absent or 0)")
    if e.arch and arch is not None and e.arch != arch:
        problems.append(f"architecture is {arch}, the recipe expects {e.arch}")
    if e.main_layers is not None and main_layers is not None and e.main_layers != main_layers:
        problems.append(f"has {main_layers} main layers, the recipe expects {e.main_layers}")
    if e.nextn_layers is not None and nextn_layers is not None and e.nextn_layers != nextn_layers:
        problems.append(f"has {nextn_layers} NextN layer(s), the recipe expects {e.nextn_layers}")
    return problems


def raise_problems(where: str, problems: list[str]) -> None:
    if problems:
        hint = "mtp.require: false builds without a draft head" if "NextN" in problems[0] else \
            "check the recipe's source and expect fields"
        raise MtpquantError(f"source {where}: " + "; ".join(problems), hint)


def check(recipe: Recipe, model: SourceModel) -> None:
    """The source matches what the recipe expects: sha256 pin, MTP block, architecture, layer counts, type."""
    info = model.info
    problems = []
    if recipe.source.sha256 and recipe.source.sha256 != model.sha256:
        problems.append(f"sha256 is {model.sha256}, the recipe pins {recipe.source.sha256}")
    problems += expect_problems(recipe, info.arch, info.n_layer, info.nextn.layers)
    if recipe.mtp_require and info.nextn.layers and not info.nextn.complete:
        problems.append(f"NextN block incomplete, missing {', '.join(info.nextn.missing[:6])}")
    quantized = sorted({t.type for t in info.tensors if len(t.shape) >= 2} - set(QUANTIZABLE_SOURCE_TYPES))
    if quantized:
        problems.append(f"is already quantized ({', '.join(quantized)}); llama-quantize refuses to requantize")
    raise_problems(model.path.name, problems)


def free_bytes(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize
