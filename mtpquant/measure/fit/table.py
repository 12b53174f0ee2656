"""The fit table: per (GPU size, ctx, KV type) fits / fits with --n-cpu-moe N / does not fit, its receipts per run
variant, and the table as text."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mtpquant.core.errors import UsageError
from mtpquant.core.files import sha256_json
from mtpquant.core.receipts import FitReceipt
from mtpquant.core.rundir import RunDir
from mtpquant.core.steps import Step, run_step
from mtpquant.measure.fit.estimate import GiB, MiB, Need, ServerSettings, mib, needs, place_weights
from mtpquant.measure.fit.hparams import model_kv, read_hparams, tensor_sizes
from mtpquant.modelfile.model import ModelInfo, read_model
from mtpquant.recipe.schema import KV_TYPES, FitSpec

DEFAULT_VRAM_GB, DEFAULT_CTX, DEFAULT_KV = FitSpec.vram_gb, FitSpec.ctx, FitSpec.kv


def verdict(need: Need, vram_gb: float, settings: ServerSettings) -> dict:
    """`fits`, `fits with --n-cpu-moe N` (smallest N) or `does not fit` on a card of vram_gb GiB."""
    budget = int(vram_gb * GiB) - settings.reserve_mib * MiB
    n_max = len(need.experts) if any(need.experts) else 0
    chosen = next((n for n in range(n_max + 1) if need.gpu_bytes(n) <= budget), None)
    if chosen is None:
        kind, text = "no", "does not fit"
    elif chosen == 0:
        kind, text = "fits", "fits"
    else:
        kind, text = "n-cpu-moe", f"fits with --n-cpu-moe {chosen}"
    used = need.gpu_bytes(chosen if chosen is not None else n_max)
    return {"vram_gb": vram_gb, "ctx": need.ctx, "kv_type": need.kv_type, "fit": kind, "n_cpu_moe": chosen,
            "text": text, "gpu_mib": mib(used),
            "budget_mib": mib(budget), "host_weights_mib": mib(need.host_weights + sum(need.experts[:chosen or 0]))}


def fit_from_tensors(arch: str, kv: dict, tensors, vram_gb: Sequence[float] = DEFAULT_VRAM_GB,
                     ctx: Sequence[int] = DEFAULT_CTX, kv_types: Sequence[str] = DEFAULT_KV, mtp: bool = True,
                     settings: ServerSettings | None = None) -> dict:
    """The fit table from metadata plus (name, shape, type, bytes) per tensor; no file needed."""
    settings = settings or ServerSettings()
    for k in kv_types:
        if k not in KV_TYPES:
            raise UsageError(f"unknown KV cache type {k!r}", "use one of " + ", ".join(KV_TYPES))
    ts = tensor_sizes(tensors)
    hp = read_hparams(arch, kv, ts)
    mtp = mtp and bool(hp.nextn_blocks)
    w = place_weights(hp, ts, mtp)
    need_list = [needs(hp, w, c, k, mtp, settings) for c in ctx for k in kv_types]
    rows = [verdict(n, g, settings) for n in need_list for g in vram_gb]
    return {"model": hp.to_json(), "mtp": mtp, "settings": settings.to_json(), "weights": w.to_json(),
            "needs": [n.to_json() for n in need_list], "rows": rows,
            "method": "offline estimate from the GGUF header (mtpquant.measure.fit), MTP draft KV cache at F16 "
                      "(llama-server's -ctkd default), compute buffers by formula; an --n-cpu-moe line is a memory "
                      "estimate, not a measured speed"}


def fit_table(info: ModelInfo, vram_gb: Sequence[float] = DEFAULT_VRAM_GB, ctx: Sequence[int] = DEFAULT_CTX,
              kv_types: Sequence[str] = DEFAULT_KV, mtp: bool = True, settings: ServerSettings | None = None) -> dict:
    """Per (GPU GiB, ctx, KV type): fits / fits with --n-cpu-moe N / does not fit, from a model's header.

    Each row: vram_gb, ctx, kv_type, fit ("fits" | "n-cpu-moe" | "no"), n_cpu_moe (0, N or None), text (the
    verdict in words), gpu_mib (at that N), budget_mib, host_weights_mib; `needs` has the parts per (ctx, KV type).
    """
    table = fit_from_tensors(info.arch, model_kv(info), info.tensors, vram_gb, ctx, kv_types, mtp, settings)
    table["file"] = info.paths[0].name
    table["file_bytes"] = sum(p.stat().st_size for p in info.paths if p.exists())
    return table


def fit_from_plan(source: ModelInfo, tensors, vram_gb: Sequence[float] = DEFAULT_VRAM_GB,
                  ctx: Sequence[int] = DEFAULT_CTX, kv_types: Sequence[str] = DEFAULT_KV, mtp: bool = True,
                  settings: ServerSettings | None = None) -> dict:
    """The fit of a planned variant: the source's metadata with the plan's per-tensor bytes (TensorPlan or tuples)."""
    return fit_from_tensors(source.arch, model_kv(source), tensors, vram_gb, ctx, kv_types, mtp, settings)


def fit_run(run_root: Path, vram_gb: Sequence[float] = DEFAULT_VRAM_GB, ctx: Sequence[int] = DEFAULT_CTX,
            kv_types: Sequence[str] = DEFAULT_KV, mtp: bool = True, settings: ServerSettings | None = None,
            force: bool = False) -> dict[str, FitReceipt]:
    """Fit every variant of a run directory into receipts/fit-<variant>.json (unchanged ones skipped)."""
    run = RunDir(Path(run_root))
    settings = settings or ServerSettings()
    out = {}
    for art in run.artifacts():
        key = sha256_json({"variant": art.sha256, "vram_gb": list(vram_gb), "ctx": list(ctx), "kv": list(kv_types),
                           "mtp": mtp, "settings": settings.to_json(), "version": FitReceipt.VERSION})

        def estimate(path: Path = art.path, key: str = key) -> FitReceipt:
            return FitReceipt(input_key=key, **fit_table(read_model(path), vram_gb, ctx, kv_types, mtp, settings))

        out[art.variant] = run_step(run, Step(f"fit:{art.variant}", FitReceipt, art.variant, key, estimate),
                                    force).receipt
    return out


# ----------------------------------------------------------------------------------------------- as text

def format_table(table: dict) -> str:
    """Rows = (ctx, KV type), columns = GPU sizes; each cell `fits`, `--n-cpu-moe N` or `does not fit`."""
    sizes = sorted({r["vram_gb"] for r in table["rows"]})
    cells = {(r["ctx"], r["kv_type"], r["vram_gb"]): r for r in table["rows"]}
    keys = list(dict.fromkeys((r["ctx"], r["kv_type"]) for r in table["rows"]))
    needs_by = {(n["ctx"], n["kv_type"]): n for n in table["needs"]}
    head = f"{'ctx':>7} {'KV':<5} {'need GiB':>9} " + " ".join(f"{_gb(g):>15}" for g in sizes)
    lines = [head]
    for c, k in keys:
        total = needs_by[(c, k)]["total_mib"] / 1024
        lines.append(f"{c:>7} {k:<5} {total:>9.2f} " + " ".join(f"{_cell(cells[(c, k, g)]):>15}" for g in sizes))
    w = table["weights"]
    s = table["settings"]
    lines.append(f"weights {_size(w['total_mib'])} ({_size(w['experts_mib'])} experts, {_size(w['host_fixed_mib'])} "
                 f"token embeddings kept on the CPU); MTP {'on' if table['mtp'] else 'off'}; {s['parallel']} slots; "
                 f"{s['reserve_mib']} MiB left free")
    return "\n".join(lines)


def _cell(r: dict) -> str:
    return {"fits": "fits", "no": "does not fit"}.get(r["fit"], f"--n-cpu-moe {r['n_cpu_moe']}")


def _size(mib_: float) -> str:
    return f"{mib_ / 1024:.2f} GiB" if mib_ >= 1024 else f"{mib_:.2f} MiB"


def _gb(g: float) -> str:
    return f"{g:g} GB"
