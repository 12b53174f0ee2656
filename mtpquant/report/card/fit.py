"""The GPU memory fit of a variant as the card shows it: one summary cell and the full grid (receipts/fit-*.json)."""

from __future__ import annotations

from mtpquant.core.errors import CardError
from mtpquant.report.card.markdown import Md, fmt_num, md_text, number
from mtpquant.report.card.nodes import Node


def fit_summary(fit: Node) -> Md:
    """The smallest GPU size that holds the file at the receipt's first (ctx, KV type)."""
    rows = fit.need("rows")
    if not rows:
        raise CardError(f"{fit.where}: no rows")
    ctx, kv = rows[0].need("ctx"), rows[0].need("kv_type")
    cells = sorted((r for r in rows if r.need("ctx") == ctx and r.need("kv_type") == kv),
                   key=lambda r: r.need("vram_gb"))
    where = md_text(f"{int(ctx)} ctx, {kv} KV")
    smallest = " (the smallest size estimated)"
    full = next((r for r in cells if r.need("fit") == "fits"), None)
    if full is not None:
        return Md(f"{_gb(full['vram_gb'])}, {where}" + (smallest if full is cells[0] else ""))
    part = next((r for r in cells if r.need("fit") == "n-cpu-moe"), None)
    if part is not None:
        return Md(f"{_gb(part['vram_gb'])} with `--n-cpu-moe {int(part.need('n_cpu_moe'))}`, {where}")
    return Md(f"none up to {_gb(cells[-1]['vram_gb'])}, {where}")


def fit_grid(fit: Node) -> Md:
    """Every (context, KV type) against every GPU size: fits, no, or the --n-cpu-moe that makes it fit."""
    rows = fit.need("rows")
    sizes = sorted({r.need("vram_gb") for r in rows})
    keys = list(dict.fromkeys((r.need("ctx"), r.need("kv_type")) for r in rows))
    cells = {(r["ctx"], r["kv_type"], r["vram_gb"]): r for r in rows}
    needs = {(n.need("ctx"), n.need("kv_type")): n for n in fit.need("needs")}
    lines = ["| Context | KV | Needs MiB | " + " | ".join(_gb(g) for g in sizes) + " |",
             "|---|---|---|" + "---|" * len(sizes)]
    for c, k in keys:
        n = needs.get((c, k))
        if n is None:
            raise CardError(f"{fit.where}: no 'needs' entry for ctx {c}, {k}")
        row = [str(int(c)), md_text(k), fmt_num(n.need("total_mib"), ".1f")]
        for g in sizes:
            r = cells.get((c, k, g))
            row.append("–" if r is None else {"fits": "fits", "no": "no"}.get(
                r.need("fit"), f"`--n-cpu-moe {int(r.need('n_cpu_moe'))}`"))
        lines.append("| " + " | ".join(row) + " |")
    return Md("\n".join(lines))


def _gb(g) -> str:
    return f"{number(g, 'a GPU size'):g} GB"
