"""build: the plan first, then the imatrix, each variant, and the steps that read the variants back."""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mtpquant.core.errors import GateError
from mtpquant.core.files import atomic_path, incomplete_path, remove_stale_incomplete, sha256_file, sha256_json
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.receipts import ImatrixReceipt, QuantizeReceipt
from mtpquant.core.rundir import Artifact, RunDir, locked
from mtpquant.core.steps import Done, Step, run_step
from mtpquant.llamacpp.imatrix import ImatrixResult, compute_args, compute_imatrix
from mtpquant.llamacpp.quantize import run_quantize
from mtpquant.llamacpp.toolchain import Toolchain
from mtpquant.measure import fit, kld, smoke
from mtpquant.modelfile.imatrix import read_imatrix
from mtpquant.pipeline.plan import Plan, make_plan
from mtpquant.quant import coverage as imx
from mtpquant.quant.keys import quantize_key
from mtpquant.quant.plan import VariantPlan
from mtpquant.quant.verify import verify_output
from mtpquant.recipe import Recipe
from mtpquant.report import card


@dataclass(frozen=True)
class VariantResult:
    tag: str
    path: Path
    sha256: str
    skipped: bool
    seconds: float


@dataclass(frozen=True)
class BuildResult:
    plan: Plan
    variants: tuple[VariantResult, ...]
    imatrix: ImatrixResult | None
    extra: dict = field(default_factory=dict)


def ensure_imatrix(plan: Plan, force: bool, progress: ProgressFn) -> tuple[ImatrixResult | None, Done | None]:
    """The pinned imatrix, or the computed one (once per source, corpus, arguments and toolchain); then coverage."""
    spec = plan.recipe.imatrix
    if spec.kind == "none":
        return None, None
    done = None
    if spec.kind == "file":
        result = imx.load_pinned(plan.imatrix.path, spec.sha256)
    else:
        done = run_step(plan.run, imatrix_step(plan, progress), force)
        dest = plan.imatrix.path
        result = ImatrixResult(dest, done.receipt.sha256, read_imatrix(dest), reused=done.skipped)
    imx.check_coverage({v.variant.tag: [n for n in v.needing_imatrix() if n not in v.pins] for v in plan.variants},
                       result.info)
    return result, done


def imatrix_step(plan: Plan, progress: ProgressFn) -> Step:
    """llama-imatrix over the corpus, run in work/ on a copy named like the corpus: the dataset name it writes
    into the imatrix (and llama-quantize into every variant) is the file name, never a machine's folders."""
    spec, run = plan.recipe.imatrix, plan.run
    corpus_sha = sha256_file(spec.corpus)
    key = sha256_json({"source": plan.source.sha256, "corpus": corpus_sha, "corpus_name": spec.corpus.name,
                       "chunks": spec.chunks, "ctx": spec.ctx, "nextn": spec.nextn, "toolchain": plan.toolchain_key})
    dest = plan.imatrix.path

    def compute() -> ImatrixReceipt:
        started = time.monotonic()
        corpus = run.work / spec.corpus.name
        with atomic_path(corpus) as tmp:
            shutil.copyfile(spec.corpus, tmp)
        result = compute_imatrix(plan.toolchain, plan.source.path.absolute(), Path(corpus.name), dest,
                                 spec.chunks, spec.ctx, spec.nextn, run.logs / "imatrix.log", run.work, progress)
        nextn = tuple(f"blk.{b}." for b in plan.source.info.nextn.blocks)
        return ImatrixReceipt(
            input_key=key, file=dest.name, sha256=result.sha256, corpus=spec.corpus.name, corpus_sha256=corpus_sha,
            chunks=spec.chunks, ctx=spec.ctx, nextn=spec.nextn, seconds=round(time.monotonic() - started, 3),
            datasets=list(result.info.datasets), chunk_count=result.info.chunk_count,
            entries=len(result.info.entries), n_layer_nextn=result.info.n_layer_nextn,
            nextn_entries=[e for e in result.info.entries if e.startswith(nextn)],
            command=["llama-imatrix", *map(str, compute_args(Path(plan.source.path.name), Path(corpus.name),
                                                             Path(dest.name), spec.chunks, spec.ctx, spec.nextn))],
            toolchain=plan.toolchain.describe())

    return Step("imatrix", ImatrixReceipt, None, key, compute)


def quantize_step(plan: Plan, vplan: VariantPlan, im: ImatrixResult | None, progress: ProgressFn) -> Step:
    """Quantize into a temporary name, verify against the plan, hash; the runner renames it after the receipt."""
    run, tag = plan.run, vplan.variant.tag
    target = run.root / vplan.file_name
    tmp = incomplete_path(target)
    key = quantize_key(plan.source.sha256, vplan.variant.type, vplan.overrides, im.sha256 if im else None,
                       plan.toolchain_key)

    def quantize() -> QuantizeReceipt:
        # llama-quantize runs in the run directory with relative paths: the imatrix path it writes into the GGUF's
        # metadata then does not depend on where the run directory lives, so bytes re-derive anywhere.
        tensor_types = Path("work") / f"{tag}.tensor-types.txt" if vplan.overrides else None
        imatrix_rel = Path(os.path.relpath(im.path, run.root)) if im else None
        try:
            q = run_quantize(plan.toolchain, plan.source.path.absolute(), Path(tmp.name), vplan.variant.type,
                             f"quantize {tag}", tensor_types, imatrix_rel, run.logs / f"quantize-{tag}.log",
                             cwd=run.root, progress=progress)
            verified = verify_output(tmp, vplan.types(), vplan.variant.type, plan.source.info, vplan.total_bytes)
            progress(f"hash {tag}", 0, 1)
            sha = sha256_file(tmp)
            progress(f"hash {tag}", 1, 1)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return _quantize_receipt(plan, vplan, im, key, verified, sha, tmp.stat().st_size, q)

    def finish() -> None:
        os.replace(tmp, target)

    return Step(f"quantize:{tag}", QuantizeReceipt, tag, key, quantize, finish)


def _quantize_receipt(plan: Plan, vplan: VariantPlan, im: ImatrixResult | None, key: str, verified, sha: str,
                      size: int, q) -> QuantizeReceipt:
    info = verified.info
    return QuantizeReceipt(
        input_key=key, file=vplan.file_name, sha256=sha, bytes=size, tensor_bytes=info.total_bytes,
        bits_per_weight=round(info.bits_per_weight, 4), type=vplan.variant.type, file_type=info.file_type,
        file_type_name=info.file_type_name, source_sha256=plan.source.sha256,
        imatrix_sha256=im.sha256 if im else None, overrides=list(vplan.overrides), pins=list(vplan.pins),
        uncovered=list(vplan.uncovered),
        draft_head=imx.draft_head_path(plan.source.info, im.info if im else None, vplan.pins),
        nextn_blocks=list(info.nextn.blocks),
        nextn_types={t.name: t.type for t in info.tensors if t.block in info.nextn.blocks},
        type_counts=dict(sorted(Counter(t.type for t in info.tensors).items())), checks=verified.checks,
        command=[Path(q.argv[0]).name, *q.argv[1:]], cwd=str(plan.run.root), seconds=q.seconds,
        toolchain=plan.toolchain.describe())


def build_variant(plan: Plan, vplan: VariantPlan, im: ImatrixResult | None, force: bool,
                  progress: ProgressFn) -> VariantResult:
    """One variant through the step runner (skipped when its receipt shows the same inputs and an intact file)."""
    done = run_step(plan.run, quantize_step(plan, vplan, im, progress), force)
    q = done.receipt
    return VariantResult(vplan.variant.tag, plan.run.root / q.file, q.sha256, done.skipped, done.seconds)


def build(recipe: Recipe, out: Path, tc: Toolchain, force: bool = False,
          progress: ProgressFn = no_progress) -> BuildResult:
    """The whole job: plan (every check first), imatrix, each variant, SHA256SUMS and manifest."""
    run = RunDir(Path(out).resolve())
    with locked(run):
        remove_stale_incomplete(run.root)
        started = time.monotonic()
        plan = make_plan(recipe, out, tc, progress, force)
        im, _ = ensure_imatrix(plan, force, progress)
        results = [build_variant(plan, v, im, force, progress) for v in plan.variants]
        sums = {r.path.name: r.sha256 for r in results}
        if im is not None and im.path.parent == run.root:
            sums[im.path.name] = im.sha256
        run.write_sha256sums(sums)  # before the steps that read the verified artifacts back
        extra, gate_error = run_post_steps(plan, results, force, progress)
        manifest = {
            "name": recipe.name, "recipe": str(recipe.path), "recipe_sha256": sha256_file(recipe.path),
            "source": {"file": plan.source.path.name, "sha256": plan.source.sha256},
            "toolchain": tc.describe(),
            "steps": {
                "imatrix": {"file": im.path.name, "sha256": im.sha256, "reused": im.reused} if im else None,
                **{f"quantize:{r.tag}": {"file": r.path.name, "sha256": r.sha256, "skipped": r.skipped,
                                         "seconds": r.seconds} for r in results},
                **extra,
            },
        }
        run.write_manifest(manifest)
        # the card is rendered from the receipts and manifest just written, then recorded in the manifest
        manifest["steps"]["card"] = {"file": card.write_card(run).name}
        manifest["seconds"] = round(time.monotonic() - started, 3)
        run.write_manifest(manifest)
        if gate_error is not None:  # receipts, card and manifest record the figures; the build still fails
            raise gate_error
        return BuildResult(plan, tuple(results), im, extra)


def run_post_steps(plan: Plan, results: list[VariantResult], force: bool,
                   progress: ProgressFn) -> tuple[dict, GateError | None]:
    """Steps that read the verified artifacts back: fit, eval and smoke (as the recipe asks), each skipped per
    variant when its receipt shows the same inputs."""
    recipe, run = plan.recipe, plan.run
    steps: dict = {}
    fits = fit.fit_run(run.root, recipe.fit.vram_gb, recipe.fit.ctx, recipe.fit.kv, force=force)
    steps.update({f"fit:{tag}": {"receipt": f"receipts/fit-{tag}.json"} for tag in fits})
    if recipe.eval.enabled:
        kwargs = {"text": recipe.eval.text} if recipe.eval.text else {}
        done = kld.eval_run(plan.toolchain, run.root, plan.source.path.absolute(), ctx=recipe.eval.ctx,
                            chunks=recipe.eval.chunks, force=force, progress=progress,
                            source_sha256=plan.source.sha256, **kwargs)
        steps.update({f"eval:{tag}": {"receipt": f"receipts/eval-{tag}.json"} for tag in done})
    gate_error = None
    if recipe.smoke.enabled:
        artifacts = [Artifact(r.tag, r.path, r.sha256) for r in results]
        try:
            smoke.smoke_run(plan.toolchain, run, recipe.smoke, progress, artifacts=artifacts, force=force,
                            spec_source=f"recipe {recipe.path.name}")
        except GateError as exc:  # the card still records what was measured before the build fails
            gate_error = exc
        steps.update({f"smoke:{r.tag}": {"receipt": f"receipts/smoke-{r.tag}.json"} for r in results})
    return steps, gate_error
