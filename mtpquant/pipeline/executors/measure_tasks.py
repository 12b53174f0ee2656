"""The steps that read a verified variant back (eval, smoke) as one task per variant, each after its variant's
quantize: GPU steps, with one GPU each when the recipe asks for GPU layers (so on a host with several GPUs the
smokes of different variants run side by side)."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Protocol

from mtpquant.core.errors import GateError
from mtpquant.core.progress import ProgressFn
from mtpquant.core.receipts import SmokeReceipt
from mtpquant.core.rundir import Artifact
from mtpquant.measure import kld, smoke
from mtpquant.pipeline.executors.base import GPU, Schedule, Task
from mtpquant.pipeline.plan import Plan


class Built(Protocol):
    """What a quantize task hands the tasks after it (pipeline.build.VariantResult)."""

    tag: str
    path: object
    sha256: str


def post_tasks(plan: Plan, force: bool) -> list[Task]:
    """Eval and smoke of each variant, as the recipe asks."""
    recipe = plan.recipe
    tags = [v.variant.tag for v in plan.variants]
    gpus = 1 if recipe.smoke.gpu_layers else 0
    cpus = (recipe.smoke.threads or 1) if gpus else 0
    tasks = []
    # One variant's GPU steps together, variant by variant: in the local executor's GPU lane the smoke of the first
    # variant then runs while the next one is quantized, instead of every smoke waiting for the last eval.
    for i, t in enumerate(tags):
        if recipe.eval.enabled:  # the first eval saves the source's logits, which the others read
            tasks.append(Task(f"eval:{t}", partial(eval_task, plan, force), GPU, cpus, gpus,
                              (f"quantize:{t}",) + ((f"eval:{tags[0]}",) if i else ())))
        if recipe.smoke.enabled:
            tasks.append(Task(f"smoke:{t}", partial(smoke_task, plan, force), GPU, cpus, gpus, (f"quantize:{t}",)))
    return tasks


def eval_task(plan: Plan, force: bool, progress: ProgressFn, variant: Built, *_) -> str:
    """KLD and perplexity of one variant (receipts/eval-<variant>.json)."""
    recipe = plan.recipe
    kwargs = {"text": recipe.eval.text} if recipe.eval.text else {}
    kld.eval_run(plan.toolchain, plan.run.root, plan.source.path.absolute(), ctx=recipe.eval.ctx,
                 chunks=recipe.eval.chunks, force=force, progress=progress, source_sha256=plan.source.sha256,
                 artifacts=[Artifact(variant.tag, variant.path, variant.sha256)], **kwargs)
    return variant.tag


def smoke_task(plan: Plan, force: bool, progress: ProgressFn,
               variant: Built) -> tuple[str, tuple[str, str | None] | None, bool]:
    """The smoke of one variant: (tag, its gate failure as (message, hint) or None, whether it measured anew)."""
    run, recipe = plan.run, plan.recipe
    before = run.read(SmokeReceipt, variant.tag, stale_ok=True)
    failure = None
    try:
        smoke.smoke_run(plan.toolchain, run, recipe.smoke, progress,
                        artifacts=[Artifact(variant.tag, variant.path, variant.sha256)], force=force,
                        spec_source=f"recipe {recipe.path.name}")
    except GateError as exc:  # every receipt is written first; the build fails once all is recorded
        failure = (exc.message, exc.hint)
    return variant.tag, failure, run.read(SmokeReceipt, variant.tag) != before


def record_concurrency(plan: Plan, schedule: Schedule, results: list) -> None:
    """Write into each smoke receipt measured in this build where it ran and what else ran meanwhile."""
    for tag, _, ran in results:
        if ran:
            r = plan.run.read(SmokeReceipt, tag)
            rec = next(x for x in schedule.records if x.name == f"smoke:{tag}")
            engine = {k: v for k, v in schedule.executor.items() if k != "nodes"}  # the nodes: in the manifest
            plan.run.write(dataclasses.replace(r, concurrent={**engine, "ran": rec.to_json(),
                                                              "during": schedule.during(rec.name)}), tag)


def gate_error(results: list) -> GateError | None:
    """One GateError naming every variant below a gate, as smoke_run gives it for several."""
    failures = [f for _, f, _ in results if f is not None]
    if not failures:
        return None
    return GateError("; ".join(m for m, _ in failures), failures[0][1] if len(failures) == 1
                     else "the figures are in receipts/smoke-<variant>.json")
