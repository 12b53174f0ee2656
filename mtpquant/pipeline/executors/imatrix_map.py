"""The imatrix as a map-reduce: the corpus's chunks split into ranges, each computed by an executor's task
(llama-imatrix --chunk FIRST --chunks N), then merged by llama-imatrix's own --in-file merge on the driver.

A merged file equals a single pass within float rounding, not bit for bit: llama-imatrix accumulates float32 sums
token by token, and the merge adds the parts' sums, so the same numbers are added in another order (the counts
are equal). Variants quantized with it may then differ in bytes from a single-pass build, which is why the ranges
are part of the imatrix step's key.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from mtpquant.core.errors import MtpquantError, UsageError
from mtpquant.core.progress import ProgressFn
from mtpquant.llamacpp.imatrix import (
    ImatrixResult,
    chunk_ranges,
    compute_args,
    compute_imatrix,
    merge_args,
    merge_imatrix,
)
from mtpquant.pipeline.executors.base import Executor, Task
from mtpquant.pipeline.plan import Plan
from mtpquant.recipe import Recipe

PARTS = "imatrix-parts"  # under work/
MERGE_NOTE = ("llama-imatrix --in-file adds the parts' float32 sums and counts; a single pass adds the same "
              "activations in another order, so the merged file equals a single pass within float rounding, not "
              "bit for bit (counts are equal), and variants quantized with it may differ in bytes")


def check_parts(recipe: Recipe, parts: int) -> list[tuple[int, int]]:
    """The chunk ranges of `--imatrix-parts`, checked before anything is written; [] for a single pass."""
    if parts <= 1:
        return []
    if recipe.imatrix.kind != "compute":
        raise UsageError(f"--imatrix-parts {parts}: the recipe computes no imatrix (imatrix.{recipe.imatrix.kind})",
                         "drop --imatrix-parts, or give the recipe imatrix.compute")
    return chunk_ranges(recipe.imatrix.chunks, parts)


def map_reduce(plan: Plan, ranges: list[tuple[int, int]], ex: Executor,
               progress: ProgressFn) -> tuple[ImatrixResult, list, dict]:
    """Each chunk range as a task, then the merge here: (the merged imatrix, each part's record, the merge's)."""
    spec, run = plan.recipe.imatrix, plan.run
    tasks = [Task(f"imatrix:{first}-{first + n}", partial(part, plan, first, n)) for first, n in ranges]
    done = ex.run(tasks, progress)
    parts = [{**done[t.name].value, "worker": done[t.name].record.node} for t in tasks]
    files = [Path(PARTS) / p["file"] for p in parts]
    log = run.logs / "imatrix-merge.log"
    log.unlink(missing_ok=True)
    result = merge_imatrix(plan.toolchain, plan.source.path.absolute(), files, plan.imatrix.path, log, cwd=run.work)
    if result.info.chunk_count != spec.chunks:
        raise MtpquantError(f"the merged imatrix counts {result.info.chunk_count} chunks where its parts computed "
                            f"{spec.chunks}; log: {log}", "is the corpus long enough for every part?")
    command = ["llama-imatrix", *map(str, merge_args(Path(plan.source.path.name), files,
                                                     Path(plan.imatrix.path.name)))]
    return result, parts, {"command": command, "cwd": "work", "note": MERGE_NOTE}


def part(plan: Plan, first: int, count: int, progress: ProgressFn) -> dict:
    """Chunks [first, first + count) of the corpus copy in work/, into work/imatrix-parts/."""
    spec, run = plan.recipe.imatrix, plan.run
    span = f"{first}-{first + count}"
    dest = run.work / PARTS / f"{plan.recipe.name}.chunks-{span}.imatrix.gguf"
    log = run.logs / f"imatrix-{span}.log"
    log.unlink(missing_ok=True)
    started = time.monotonic()
    r = compute_imatrix(plan.toolchain, plan.source.path.absolute(), Path(spec.corpus.name), dest, count, spec.ctx,
                        spec.nextn, log, run.work, progress, first_chunk=first, label=f"imatrix {span}")
    command = compute_args(Path(plan.source.path.name), Path(spec.corpus.name), Path(PARTS) / dest.name, count,
                           spec.ctx, spec.nextn, first_chunk=first)
    return {"chunks": [first, first + count], "file": dest.name, "sha256": r.sha256,
            "seconds": round(time.monotonic() - started, 3), "command": ["llama-imatrix", *map(str, command)]}
