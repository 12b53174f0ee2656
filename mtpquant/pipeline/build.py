"""build: the plan first, then the imatrix, each variant, and the steps that read the variants back."""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from mtpquant.core.errors import GateError
from mtpquant.core.files import atomic_path, incomplete_path, remove_stale_incomplete, sha256_file, sha256_json
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.receipts import ImatrixReceipt, QuantizeReceipt, SmokeReceipt
from mtpquant.core.rundir import RunDir, locked
from mtpquant.core.steps import Done, Step, run_step
from mtpquant.llamacpp.imatrix import ImatrixResult, chunk_ranges, compute_args, compute_imatrix
from mtpquant.llamacpp.quantize import run_quantize
from mtpquant.llamacpp.toolchain import Toolchain
from mtpquant.measure import fit
from mtpquant.modelfile.imatrix import read_imatrix
from mtpquant.pipeline import head_study
from mtpquant.pipeline.executors import imatrix_map, local, measure_tasks
from mtpquant.pipeline.executors.base import GPU, Executor, Schedule, Task
from mtpquant.pipeline.executors.nodes import needs_of
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


def ensure_imatrix(plan: Plan, force: bool, progress: ProgressFn, executor: Executor | None = None,
                   parts: int = 1) -> tuple[ImatrixResult | None, Done | None]:
    """The pinned imatrix, or the computed one (once per source, corpus, arguments and toolchain; where the
    executor places it, or over `parts` chunk ranges merged); then coverage, on the file the variants will read."""
    spec = plan.recipe.imatrix
    if spec.kind == "none":
        return None, None
    done = None
    if spec.kind == "file":
        result = imx.load_pinned(plan.imatrix.path, spec.sha256)
    else:
        ex = executor or local.Executor()
        if parts > 1:  # the map runs on the executor, the merge here
            done = run_step(plan.run, imatrix_step(plan, progress, ex, parts), force)
        else:
            done = ex.run([Task("imatrix", partial(_imatrix_once, plan, force))], progress)["imatrix"].value
        dest = plan.imatrix.path
        result = ImatrixResult(dest, done.receipt.sha256, read_imatrix(dest), reused=done.skipped)
    imx.check_coverage({v.variant.tag: [n for n in v.needing_imatrix() if n not in v.pins] for v in plan.variants},
                       result.info)
    return result, done


def imatrix_step(plan: Plan, progress: ProgressFn, executor: Executor | None = None, parts: int = 1) -> Step:
    """llama-imatrix over the corpus, run in work/ on a copy named like the corpus: the dataset name it writes
    into the imatrix (and llama-quantize into every variant) is the file name, never a machine's folders. With
    `parts` > 1 the chunks are split into ranges computed by the executor's tasks and merged by llama-imatrix."""
    spec, run = plan.recipe.imatrix, plan.run
    corpus_sha = sha256_file(spec.corpus)
    ranges = chunk_ranges(spec.chunks, parts) if parts > 1 else []
    # a merged file is not bit-identical to a single pass (see executors/imatrix_map.py): the ranges are an input
    key = sha256_json({"source": plan.source.sha256, "corpus": corpus_sha, "corpus_name": spec.corpus.name,
                       "chunks": spec.chunks, "ctx": spec.ctx, "nextn": spec.nextn, "toolchain": plan.toolchain_key,
                       **({"ranges": ranges} if ranges else {})})
    dest = plan.imatrix.path

    def compute() -> ImatrixReceipt:
        started = time.monotonic()
        corpus = run.work / spec.corpus.name
        with atomic_path(corpus) as tmp:
            shutil.copyfile(spec.corpus, tmp)
        parts_run, merge = [], None
        if ranges:
            result, parts_run, merge = imatrix_map.map_reduce(plan, ranges, executor or local.Executor(), progress)
        else:
            result = compute_imatrix(plan.toolchain, plan.source.path.absolute(), Path(corpus.name), dest,
                                     spec.chunks, spec.ctx, spec.nextn, run.logs / "imatrix.log", run.work, progress)
        nextn = tuple(f"blk.{b}." for b in plan.source.info.nextn.blocks)
        return ImatrixReceipt(
            input_key=key, file=dest.name, sha256=result.sha256, corpus=spec.corpus.name, corpus_sha256=corpus_sha,
            chunks=spec.chunks, ctx=spec.ctx, nextn=spec.nextn, seconds=round(time.monotonic() - started, 3),
            datasets=list(result.info.datasets), chunk_count=result.info.chunk_count,
            entries=len(result.info.entries), n_layer_nextn=result.info.n_layer_nextn,
            nextn_entries=[e for e in result.info.entries if e.startswith(nextn)],
            command=merge["command"] if merge else ["llama-imatrix", *map(str, compute_args(
                Path(plan.source.path.name), Path(corpus.name), Path(dest.name), spec.chunks, spec.ctx, spec.nextn))],
            toolchain=plan.toolchain.describe(), parts=parts_run, merge=merge)

    return Step("imatrix", ImatrixReceipt, None, key, compute)


def _imatrix_once(plan: Plan, force: bool, progress: ProgressFn) -> Done:
    return run_step(plan.run, imatrix_step(plan, progress), force)


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
        command=recorded_command(q.argv, plan.source.path.name, vplan.file_name), cwd=".", seconds=q.seconds,
        toolchain=plan.toolchain.describe())


def recorded_command(argv: tuple[str, ...], source_name: str, output_name: str) -> list[str]:
    """llama-quantize's argv as the receipt records it: the binary, the source and the output by name (receipts are
    published; where they lay on the building machine is not theirs to say, and the temporary output name holds a
    pid), everything else as run in the run directory."""
    return [Path(argv[0]).name, *argv[1:-4], source_name, output_name, *argv[-2:]]


def build_variant(plan: Plan, vplan: VariantPlan, im: ImatrixResult | None, force: bool,
                  progress: ProgressFn) -> VariantResult:
    """One variant through the step runner (skipped when its receipt shows the same inputs and an intact file)."""
    done = run_step(plan.run, quantize_step(plan, vplan, im, progress), force)
    q = done.receipt
    return VariantResult(vplan.variant.tag, plan.run.root / q.file, q.sha256, done.skipped, done.seconds)


def build(recipe: Recipe, out: Path, tc: Toolchain, force: bool = False, progress: ProgressFn = no_progress,
          executor: Executor | None = None, imatrix_parts: int = 1) -> BuildResult:
    """The whole job: plan (every check first), imatrix, each variant, SHA256SUMS and manifest. The planning is
    here; the imatrix, each variant and each smoke or eval run where `executor` places them (default: in order
    on this machine)."""
    ex = executor or local.Executor()
    first = len(ex.records)
    imatrix_map.check_parts(recipe, imatrix_parts)
    run = RunDir(Path(out).resolve())
    with locked(run):
        remove_stale_incomplete(run.root)
        started = time.monotonic()
        plan = make_plan(recipe, out, tc, progress, force)
        if ex.remote:  # before anything is placed: every node sees the run directory, the source, the toolchain
            ex.check_nodes(needs_of(run, plan.source.path, plan.source.files, tc.describe(),
                                    max((t.gpus for t in measure_tasks.post_tasks(plan, force)), default=0)), progress)
        im, _ = ensure_imatrix(plan, force, progress, ex, imatrix_parts)
        plan, studies = head_study.run_studies(plan, im, force, progress)  # variants with draft_head, re-planned
        results, extra, gate_error = run_tasks(plan, im, force, progress, ex, first)
        remove_stale_incomplete(run.root)  # what a killed worker left; every task has ended
        extra = {**studies, **extra}
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
        manifest["gates"] = _gate_state(run, [r.tag for r in results])
        manifest["executor"] = Schedule(ex.describe(), ex.records[first:]).to_json()
        run.write_manifest(manifest)
        # the card is rendered from the receipts and manifest just written, then recorded in the manifest
        manifest["steps"]["card"] = {"file": card.write_card(run).name}
        manifest["seconds"] = round(time.monotonic() - started, 3)
        run.write_manifest(manifest)
        if gate_error is not None:  # receipts, card and manifest record the figures; the build still fails
            raise gate_error
        return BuildResult(plan, tuple(results), im, extra)


def _gate_state(run: RunDir, tags: list[str]) -> dict:
    """Per smoked variant: whether its gates held, and which failed (the run's state until it is rebuilt)."""
    out = {}
    for tag in tags:
        r = run.read(SmokeReceipt, tag, stale_ok=True)
        if r is not None and r.gates:
            out[tag] = {"passed": r.gates.get("passed"), "k": r.gates.get("k"),
                        "failed": [n for n, c in (r.gates.get("checks") or {}).items() if not c.get("passed")]}
    return out


def run_tasks(plan: Plan, im: ImatrixResult | None, force: bool, progress: ProgressFn, ex: Executor,
              first: int = 0) -> tuple[list[VariantResult], dict, GateError | None]:
    """Each variant's quantize + verify, then the steps that read it back (eval, smoke: one task per variant),
    through the executor; SHA256SUMS and fit are written here as soon as the last variant is verified."""
    recipe, run = plan.recipe, plan.run
    tags = [v.variant.tag for v in plan.variants]
    tasks = [Task(f"quantize:{v.variant.tag}", partial(build_variant, plan, v, im, force)) for v in plan.variants]
    tasks += measure_tasks.post_tasks(plan, force)
    results: dict[str, VariantResult] = {}
    fits: dict = {}

    def on_done(name: str, value) -> None:
        if isinstance(value, VariantResult):
            results[value.tag] = value
            if len(results) == len(tags):  # before the steps that read the verified artifacts back
                sums = {r.path.name: r.sha256 for r in results.values()}
                if im is not None and im.path.parent == run.root:
                    sums[im.path.name] = im.sha256
                run.write_sha256sums(sums)
                fits.update(fit.fit_run(run.root, recipe.fit.vram_gb, recipe.fit.ctx, recipe.fit.kv, force=force))

    done = ex.run(tasks, progress, on_done)
    schedule = Schedule(ex.describe(), ex.records[first:])  # this build's tasks (`first` on), imatrix included
    steps: dict = {f"fit:{tag}": {"receipt": f"receipts/fit-{tag}.json"} for tag in fits}
    steps.update({t.name: {"receipt": f"receipts/{t.name.replace(':', '-')}.json"} for t in tasks if t.kind == GPU})
    smokes = [done[f"smoke:{tag}"].value for tag in tags if f"smoke:{tag}" in done]
    measure_tasks.record_concurrency(plan, schedule, smokes)  # what else ran meanwhile is known only now
    return [results[t] for t in tags], steps, measure_tasks.gate_error(smokes)
