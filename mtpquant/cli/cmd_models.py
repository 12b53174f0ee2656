"""`mtpquant synth` and `mtpquant inspect`: make a test model, read any model or imatrix GGUF."""

from __future__ import annotations

from pathlib import Path

import click

from mtpquant import synth
from mtpquant.cli.app import emit, fmt_bytes, json_option
from mtpquant.modelfile.imatrix import is_imatrix, read_imatrix
from mtpquant.modelfile.model import read_model
from mtpquant.modelfile.summary import imatrix_summary, model_summary
from mtpquant.sources.synthetic import spec_from_dict


@click.command("synth")
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
    opts = {"arch": arch, "seed": seed, "name": out.stem}
    for key, value in (("hidden_size", hidden), ("n_layer", layers), ("n_expert", experts)):
        if value is not None:
            opts[key] = value
    if acceptance is not None:
        opts["designed"] = {"alpha": acceptance}
    spec = spec_from_dict(opts)
    if hf_layout:
        path = synth.write_hf(out, spec)
        emit({"hf_dir": str(path)}, as_json, f"wrote {path}")
        return
    paths = synth.write_gguf(out, spec, split_max_tensors=split_max_tensors)
    emit({"files": [str(p) for p in paths]}, as_json, "\n".join(f"wrote {p}" for p in paths))


@click.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--tensors/--no-tensors", default=False, help="List every tensor (always in --json).")
@json_option
def inspect_cmd(file, tensors, as_json) -> None:
    """Show a GGUF model's architecture, NextN block, types and sizes, or an imatrix file's coverage."""
    if file.is_file() and file.suffix != ".dat" and is_imatrix(file):
        info = read_imatrix(file)
        data = imatrix_summary(info)
        emit(data, as_json, _imatrix_text(data))
        return
    if file.suffix == ".dat":
        read_imatrix(file)
    info = read_model(file)
    data = model_summary(info, with_tensors=True)
    emit(data, as_json, _model_text(data, tensors))


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
        f"tensors:        {d['n_tensors']}  {fmt_bytes(d['bytes'])}  {d['bits_per_weight']:.2f} bits/weight",
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
