"""`mtpquant plan` and `mtpquant build`."""

from __future__ import annotations

from pathlib import Path

import click

from mtpquant.cli.app import bars, emit, fmt_bytes, json_option, llama_cpp_option, quiet_option, toolchain
from mtpquant.measure.fit import fit_from_plan, format_table
from mtpquant.pipeline import executors
from mtpquant.pipeline.build import build
from mtpquant.pipeline.plan import plan_only
from mtpquant.recipe import load as load_recipe


def _default_out(recipe) -> Path:
    return Path("out") / recipe.name


@click.command("plan")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Plan in this run directory (locked like a build); default: a scratch folder removed afterwards.")
@click.option("--stand-in", "use_stand_in", is_flag=True,
              help="Plan against a header-only twin of the real model (expect.shape): nothing is downloaded.")
@click.option("--tensors/--no-tensors", default=True, help="List every tensor (always in --json).")
@llama_cpp_option
@json_option
@quiet_option
def plan_cmd(recipe_path, out, use_stand_in, tensors, llama_cpp, as_json, quiet) -> None:
    """Validate a recipe and show, per variant, every tensor's planned type, size, imatrix needs and GPU fit."""
    r = load_recipe(recipe_path)
    tc = toolchain(llama_cpp)
    with bars(quiet) as progress, plan_only(r, out, tc, progress, use_stand_in) as plan:
        data, text = _plan_report(plan, tensors)
    if out is None:
        data["out"] = None  # a scratch folder, gone now
    emit(data, as_json, text)


def _plan_report(plan, tensors: bool) -> tuple[dict, str]:
    r = plan.recipe
    data = plan.to_json()
    fits = {v.variant.tag: fit_from_plan(plan.source.info, v.tensors, r.fit.vram_gb, r.fit.ctx, r.fit.kv)
            for v in plan.variants}
    for v in data["variants"]:
        v["fit"] = fits[v["variant"]]
    lines = [f"recipe {r.name}: source {plan.source.path.name} ({plan.source.info.arch}, "
             f"{plan.source.info.n_layer} main layers, NextN blocks {list(plan.source.info.nextn.blocks)})",
             f"imatrix: {plan.imatrix.kind}"]
    for v in plan.variants:
        lines.append(f"\n{v.file_name}: {v.variant.type}, {fmt_bytes(v.total_bytes)}, "
                     f"{v.bits_per_weight:.2f} bits/weight, {len(v.overrides)} override(s), "
                     f"{len(v.needing_imatrix())} tensor(s) need an imatrix")
        for t in v.tensors if tensors else ():
            mark = f"  <- {t.rule}" if t.rule else ""
            need = " [imatrix]" if t.needs_imatrix else ""
            lines.append(f"  {t.name:<44} {t.source_type:>5} -> {t.type:<8} {t.bytes:>12}{need}{mark}")
        lines.append(format_table(fits[v.variant.tag]))
    return data, "\n".join(lines)


@click.command("build")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run directory (default out/<name>).")
@click.option("--force", is_flag=True, help="Redo every step, replacing earlier outputs.")
@click.option("--executor", "executor_name", type=click.Choice(sorted(executors.ENGINES)), default="local",
              show_default=True, help="Where the imatrix, quantize, eval and smoke tasks run: this machine, or a "
              "Ray cluster (pip install 'mtpquant[ray]'; the run directory on storage every node sees).")
@click.option("--ray-address", default=None, help="The Ray cluster of --executor ray (default: $RAY_ADDRESS).")
@click.option("--overlap", is_flag=True, help="Local: quantize the next variant while the previous one's smoke "
              "and eval run, on disjoint CPU sets (smoke.threads CPUs reserved for the smoke).")
@click.option("--imatrix-parts", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the imatrix's chunks into N ranges computed as separate tasks and merged by "
              "llama-imatrix (equal to one pass within float rounding, not bit for bit).")
@llama_cpp_option
@json_option
@quiet_option
def build_cmd(recipe_path, out, force, executor_name, ray_address, overlap, imatrix_parts, llama_cpp, as_json,
              quiet) -> None:
    """Plan, then quantize every variant, verify it, and write receipts (resumable)."""

    r = load_recipe(recipe_path)
    tc = toolchain(llama_cpp)
    ex = executors.create(executor_name, ray_address=ray_address, overlap=overlap, reserve=r.smoke.threads)
    try:
        with bars(quiet) as progress:
            result = build(r, out or _default_out(r), tc, force=force, progress=progress, executor=ex,
                           imatrix_parts=imatrix_parts)
    finally:
        ex.close()
    data = {"out": str(result.plan.run.root),
            "variants": [{"variant": v.tag, "file": str(v.path), "sha256": v.sha256, "skipped": v.skipped}
                         for v in result.variants],
            "imatrix": {"file": str(result.imatrix.path), "sha256": result.imatrix.sha256,
                        "reused": result.imatrix.reused} if result.imatrix else None,
            **result.extra}
    lines = [f"{'kept ' if v.skipped else 'built'} {v.path}  sha256 {v.sha256}" for v in result.variants]
    lines.append(f"run directory: {result.plan.run.root}")
    emit(data, as_json, "\n".join(lines))
