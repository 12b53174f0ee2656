"""`mtpquant fit` and `mtpquant eval`: each turns its arguments into one library call."""

from __future__ import annotations

from pathlib import Path

import click

from mtpquant.cli.app import bars, emit, json_option, llama_cpp_option, quiet_option, toolchain
from mtpquant.core.errors import UsageError
from mtpquant.core.paths import cache_root
from mtpquant.measure import fit as fitmod
from mtpquant.measure import kld as ev
from mtpquant.modelfile.model import read_model
from mtpquant.recipe.schema import EvalSpec, FitSpec


def _list(value: str, option: str, kind, minimum=None) -> list:
    out = []
    for part in (p.strip() for p in value.split(",")):
        try:
            v = kind(part)
        except ValueError:
            raise UsageError(f"{option}: {part!r} is not a{'n integer' if kind is int else ' number'}",
                             f"give a comma-separated list, e.g. {option} 12,16,24") from None
        if minimum is not None and v < minimum:
            raise UsageError(f"{option}: {part} is below the minimum of {minimum}")
        out.append(v)
    return out


@click.command("fit")
@click.argument("target", metavar="GGUF|RUN_DIR", type=click.Path(path_type=Path))
@click.option("--vram", default=",".join(map(str, FitSpec.vram_gb)), show_default=True, help="GPU sizes in GB (GiB), comma-separated.")
@click.option("--ctx", "ctx_list", default=",".join(map(str, FitSpec.ctx)), show_default=True, help="Context lengths.")
@click.option("--kv", default=",".join(FitSpec.kv), show_default=True, help="KV cache types (-ctk/-ctv).")
@click.option("--mtp/--no-mtp", default=True, show_default=True,
              help="Count the NextN block and its draft context (llama-server --spec-type draft-mtp).")
@click.option("--parallel", type=int, default=4, show_default=True, help="llama-server slots (--parallel).")
@click.option("--reserve", type=int, default=1024, show_default=True, help="MiB to leave free on the GPU.")
@json_option
def fit(target, vram, ctx_list, kv, mtp, parallel, reserve, as_json) -> None:
    """Say which GPU sizes and contexts a variant fits, and the --n-cpu-moe to use (offline, from the header)."""
    sizes = _list(vram, "--vram", float, 1)
    ctxs = _list(ctx_list, "--ctx", int, 64)
    kvs = [k.strip().lower() for k in kv.split(",")]
    for k in kvs:
        if k not in fitmod.KV_TYPES:
            raise UsageError(f"--kv: unknown KV cache type {k!r}", "use " + ", ".join(fitmod.KV_TYPES))
    if parallel < 1 or reserve < 0:
        raise UsageError("--parallel must be at least 1 and --reserve at least 0")
    settings = fitmod.ServerSettings(parallel=parallel, reserve_mib=reserve)
    if target.is_dir():
        tables = {tag: r.body() for tag, r in fitmod.fit_run(target, sizes, ctxs, kvs, mtp, settings).items()}
        text = "\n\n".join(f"{t['file']} ({tag}):\n{fitmod.format_table(t)}" for tag, t in tables.items())
        emit(tables, as_json, text + f"\n\nreceipts: {target / 'receipts'}/fit-*.json")
        return
    if target.suffix != ".gguf":
        raise UsageError(f"{target}: not a .gguf file or a run directory", "give a model GGUF or a run directory")
    table = fitmod.fit_table(read_model(target), sizes, ctxs, kvs, mtp, settings)
    emit(table, as_json, f"{table['file']}:\n{fitmod.format_table(table)}")


@click.command("eval")
@click.argument("target", metavar="RUN_DIR|GGUF", type=click.Path(path_type=Path))
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="The BF16/F16 source GGUF (default for a run directory: the one its receipts name).")
@click.option("--text", type=click.Path(path_type=Path), default=None,
              help="Evaluation text (default: the one shipped with mtpquant).")
@click.option("--ctx", type=int, default=EvalSpec.ctx, show_default=True, help="Tokens per chunk (-c, and -b).")
@click.option("--chunks", type=int, default=EvalSpec.chunks, show_default=True, help="Chunks to evaluate.")
@click.option("--threads", type=int, default=None, help="llama-perplexity -t.")
@click.option("--force", is_flag=True, help="Evaluate again even where a receipt has the same inputs.")
@llama_cpp_option
@json_option
@quiet_option
def eval_(target, source, text, ctx, chunks, threads, force, llama_cpp, as_json, quiet) -> None:
    """KL divergence and perplexity of each variant against the BF16 source (llama-perplexity)."""
    tc = toolchain(llama_cpp)
    if target.is_dir():
        with bars(quiet) as progress:
            results = ev.eval_run(tc, target, source, text, ctx, chunks, threads=threads, force=force,
                                  progress=progress)
        bodies = {tag: r.body() for tag, r in results.items()}
        emit(bodies, as_json, ev.format_results(bodies) + f"\nreceipts: {target / 'receipts'}/eval-*.json")
        return
    if target.suffix != ".gguf":
        raise UsageError(f"{target}: not a .gguf file or a run directory", "give a variant GGUF or a run directory")
    if source is None:
        raise UsageError("evaluating a single GGUF needs --source BF16.gguf", "give the file it was quantized from")
    result = ev.eval_file(tc, target, source, text, ctx, chunks, cache_root() / "eval", threads=threads)
    emit(result, as_json, ev.format_results({target.stem: result}))
