"""The plan of a build: every check that can run before a long step (tools, source, per-variant types proven by
dry runs, imatrix coverage, outputs already there, disk)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from mtpquant.core.errors import MtpquantError, UsageError
from mtpquant.core.files import atomic_path, free_bytes, sha256_file
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.receipts import ImatrixSourceReceipt, QuantizeReceipt
from mtpquant.core.rundir import RunDir, locked
from mtpquant.hub.client import fetch_file
from mtpquant.llamacpp.toolchain import Toolchain, require
from mtpquant.measure.smoke.context import check_context
from mtpquant.modelfile.imatrix import ImatrixInfo, read_imatrix
from mtpquant.quant import coverage as imx
from mtpquant.quant.keys import toolchain_key
from mtpquant.quant.plan import VariantPlan, plan_variant
from mtpquant.recipe import Recipe
from mtpquant.sources.base import SourceModel
from mtpquant.sources.registry import prepare
from mtpquant.sources.synthetic import stand_in

DISK_MARGIN = 64 << 20


@dataclass(frozen=True)
class ImatrixPlan:
    kind: str  # none | file | compute
    path: Path | None  # where it is, or will be written
    covered: frozenset[str] | None  # weights with statistics (known for a file, predicted for compute)
    info: ImatrixInfo | None = None
    dry_run_file: Path | None = None  # what the plan's dry runs were given: the file, or a placeholder


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    run: RunDir
    toolchain: Toolchain
    source: SourceModel
    imatrix: ImatrixPlan
    variants: tuple[VariantPlan, ...]
    toolchain_key: dict = field(default_factory=dict)  # once per plan: it may hash llama-quantize

    def to_json(self) -> dict:
        return {
            "recipe": str(self.recipe.path),
            "name": self.recipe.name,
            "out": str(self.run.root),
            "source": {"file": self.source.path.name, "sha256": self.source.sha256, "architecture":
                       self.source.info.arch, "main_layers": self.source.info.n_layer,
                       "nextn_blocks": list(self.source.info.nextn.blocks), "bytes": self.source.info.total_bytes},
            "imatrix": {"kind": self.imatrix.kind, "path": str(self.imatrix.path) if self.imatrix.path else None},
            "variants": [v.to_json() for v in self.variants],
        }


def file_name(recipe: Recipe, tag: str) -> str:
    """GGUF naming convention: <name>-<TYPE>.gguf."""
    return gguf.naming_convention(recipe.name, None, None, None, None, tag) + ".gguf"


def _imatrix_plan(recipe: Recipe, run: RunDir, source: SourceModel) -> ImatrixPlan:
    spec = recipe.imatrix
    if spec.kind == "none":
        return ImatrixPlan("none", None, None)
    if spec.kind == "file":
        path = spec.path
        if spec.hf is not None:
            fetched, origin = fetch_file(spec.hf.repo, spec.hf.revision, spec.hf.path, recipe_path=recipe.path)
            # a copy in the run directory: published with the run, and a short relative path in the GGUF metadata
            path = run.root / f"{recipe.name}.imatrix.gguf"
            if not path.is_file() or sha256_file(path) != sha256_file(fetched):
                with atomic_path(path) as tmp:
                    shutil.copyfile(fetched, tmp)
            run.write(ImatrixSourceReceipt(**origin, file=path.name))
        info = read_imatrix(path)
        return ImatrixPlan("file", path, frozenset(info.entries), info, path)
    dest = run.root / f"{recipe.name}.imatrix.gguf"
    covered = imx.predicted_coverage(source.info, spec.nextn)
    placeholder = imx.write_placeholder(source.info, covered, run.work / "placeholder.imatrix.gguf")
    return ImatrixPlan("compute", dest, frozenset(covered), None, placeholder)


def _check_outputs(recipe: Recipe, run: RunDir, variants: tuple[VariantPlan, ...], force: bool) -> None:
    problems = []
    for v in variants:
        target = run.root / v.file_name
        if not target.exists() or force:
            continue
        receipt = run.read(QuantizeReceipt, v.variant.tag, stale_ok=True)
        if receipt is None or receipt.file != v.file_name:
            problems.append(f"{target} exists and no receipt of this run vouches for it")
    if problems:
        raise UsageError("; ".join(problems), "move it away, choose another --out, or rerun with --force")
    manifest = run.read_manifest()
    if manifest.get("name") not in (None, recipe.name) and not force:
        raise UsageError(f"{run.root} holds a run of recipe '{manifest['name']}', not '{recipe.name}'",
                         "choose another --out, or rerun with --force")


def make_plan(recipe: Recipe, out: Path, tc: Toolchain, progress: ProgressFn = no_progress,
              force: bool = False, use_stand_in: bool = False) -> Plan:
    """Everything that can be checked before a long step: tools, source, per-variant types, imatrix, disk.

    With `use_stand_in` the source is a header-only twin of the real model (`expect.shape`): a plan and fit from
    sizes alone, nothing downloaded, nothing to build.
    """
    require(tc, ["llama-quantize", "quantize_tensor_type_file"]
            + (["llama-imatrix"] if recipe.imatrix.kind == "compute" else [])
            + (["imatrix_nextn"] if recipe.imatrix.kind == "compute" and recipe.imatrix.nextn else [])
            + (["llama-server", "draft_mtp"] if recipe.smoke.enabled or any(v.draft_head for v in recipe.variants)
               else [])
            + (["llama-perplexity"] if recipe.eval.enabled else []))
    run = RunDir(Path(out).resolve())
    run.ensure()
    source = stand_in(recipe) if use_stand_in else prepare(recipe, run, progress)
    if recipe.smoke.enabled:
        check_context(source.path, recipe.smoke)  # a sweep past the trained context fails now, not after quantizing
    im = _imatrix_plan(recipe, run, source)
    variants = []
    for i, v in enumerate(recipe.variants):
        progress("plan", i, len(recipe.variants))
        variants.append(plan_variant(tc, source.path, source.info, v, recipe.policy, file_name(recipe, v.tag),
                                     run.work, None if im.covered is None else set(im.covered),
                                     recipe.imatrix.uncovered, recipe.imatrix.pin_type, im.dry_run_file))
    progress("plan", len(recipe.variants), len(recipe.variants))
    variants_t = tuple(variants)
    if use_stand_in:
        return Plan(recipe, run, tc, source, im, variants_t, toolchain_key(tc))
    _check_outputs(recipe, run, variants_t, force)
    pending = sum(v.total_bytes for v in variants_t
                  if force or not (run.root / v.file_name).exists())
    free = free_bytes(run.root)
    if pending + DISK_MARGIN > free:
        raise MtpquantError(f"not enough free disk in {run.root}: the planned outputs need "
                            f"{_gib(pending + DISK_MARGIN)}, {_gib(free)} is free",
                            "free some space or choose another --out")
    return Plan(recipe, run, tc, source, im, variants_t, toolchain_key(tc))


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


@contextlib.contextmanager
def plan_only(recipe: Recipe, out: Path | None, tc: Toolchain, progress: ProgressFn = no_progress,
              use_stand_in: bool = False) -> Iterator[Plan]:
    """`mtpquant plan`: with `out`, under the run directory's lock like a build; without, in a scratch folder
    removed afterwards, so a plan leaves nothing behind but what it shows."""
    if out is not None:
        run = RunDir(Path(out).resolve())
        with locked(run):
            yield make_plan(recipe, run.root, tc, progress, use_stand_in=use_stand_in)
        return
    with tempfile.TemporaryDirectory(prefix=f"mtpquant-plan-{recipe.name}-") as scratch:
        yield make_plan(recipe, Path(scratch) / recipe.name, tc, progress, use_stand_in=use_stand_in)
