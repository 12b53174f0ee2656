"""Where MTP pays: end-to-end speedup by prompt and output length, the break-even output length and a
recommendation, all computed from the context sweep of a smoke receipt (context_sweep.requests).

Per document d at a context length, from the time to first token P (prompt_ms) and the decode time per token
T (1000 / predicted_per_second) of each arm: e2e(n) = P + (n - 1) * T for an output of n tokens (llama-server
samples the first token at the end of the prompt and times the other n - 1 as predicted_ms), and the speedup of
an MTP arm is e2e_vanilla(n) / e2e_mtp(n). A cell is the geometric mean over documents with the smoke's
bootstrap interval; the break-even is the output length where that mean crosses 1.
"""

from __future__ import annotations

import math

import numpy as np

from mtpquant.core.errors import CardError
from mtpquant.measure.smoke.aggregate import timed
from mtpquant.measure.smoke.stats import MIN_UNITS, figure, geomean_ratio
from mtpquant.report.card.markdown import Md, md_code, md_text
from mtpquant.report.card.nodes import Node

METHOD = 2  # the context_sweep format this module reads (measure/smoke/context.py METHOD)
OUTPUT_LENGTHS = (64, 256, 1024, 4096)
SEARCH_LIMIT = 1 << 20  # output tokens: a break-even beyond this is "never"
SPEC_FLAG = "`--spec-type draft-mtp`"


def _need(d: dict, key: str):
    if isinstance(d, Node):
        return d.need(key)
    if key not in d:
        raise CardError(f"context_sweep: no field '{key}'")
    return d[key]


# ------------------------------------------------------------------------------------------------- the numbers

def _pairs(sweep: dict, ctx: int, arm: str) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Documents where both arms' speed counts, with (P_vanilla, T_vanilla, P_arm, T_arm) in ms."""
    by = {(r["arm"], r["document"]): r for r in _need(sweep, "requests") if r["ctx"] == ctx}
    docs = sorted(d for (a, d) in by if a == "vanilla" and (arm, d) in by
                  and timed(by[("vanilla", d)]) and timed(by[(arm, d)]))

    def col(a: str, key: str) -> np.ndarray:
        return np.array([float(by[(a, d)]["timings"][key]) for d in docs], dtype=float)

    return (docs, col("vanilla", "prompt_ms"), 1000.0 / col("vanilla", "predicted_per_second"),
            col(arm, "prompt_ms"), 1000.0 / col(arm, "predicted_per_second"))


def _prompt_tokens(sweep: dict, ctx: int) -> float | None:
    """Mean prompt tokens the vanilla server counted at one length."""
    n = [float(r["timings"]["prompt_n"]) for r in _need(sweep, "requests") if r["ctx"] == ctx and r["arm"] == "vanilla"]
    return sum(n) / len(n) if n else None


def _log_gain(n: float, pv, tv, pm, tm) -> float:
    """log of the geometric-mean end-to-end speedup at n output tokens."""
    return float(np.mean(np.log(pv + (n - 1) * tv) - np.log(pm + (n - 1) * tm)))


def break_even(pv, tv, pm, tm) -> dict:
    """Where the speedup crosses 1: {"kind": always | never | over | under | mixed, "tokens": n or None}.

    `over`: MTP saves time for outputs of `tokens` tokens or more (its slower prefill paid back by faster
    decoding); `under`: only for outputs shorter than `tokens`; `mixed`: it crosses 1 more than once, first at
    `tokens`."""
    grid = [2 ** j for j in range(int(math.log2(SEARCH_LIMIT)) + 1)]
    signs = [_log_gain(n, pv, tv, pm, tm) > 0 for n in grid]
    if all(signs):
        return {"kind": "always", "tokens": None}
    if not any(signs):
        return {"kind": "never", "tokens": None}
    i = next(j for j in range(len(grid) - 1) if signs[j] != signs[j + 1])
    lo, hi = grid[i], grid[i + 1]  # the sign changes in (lo, hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if (_log_gain(mid, pv, tv, pm, tm) > 0) == signs[i] else (lo, mid)
    later = signs[i + 1:]
    if not signs[i] and all(later):
        return {"kind": "over", "tokens": hi}
    if signs[i] and not any(later):
        return {"kind": "under", "tokens": hi}
    return {"kind": "mixed", "tokens": hi}


def _cell(n: int, docs, pv, tv, pm, tm) -> dict:
    out = figure(geomean_ratio, (pv + (n - 1) * tv, pm + (n - 1) * tm), 4, clusters=docs)
    if out.get("note"):
        out["note"] = out["note"].replace("prompts", "documents")
    return out


def speedup_at(sweep: dict, ctx: int, arm: str, n: int) -> dict:
    """The end-to-end speedup figure of an MTP arm at one context length for an output of n tokens."""
    return _cell(n, *_pairs(sweep, ctx, arm))


def analyse(sweep: dict) -> dict:
    """Per MTP arm and context length: prompt tokens, documents, the e2e speedup at each output length, the
    speedups at one output token (first token only) and at long outputs (decode only), and the break-even."""
    arms = [a for a in _need(sweep, "arms") if a["draft_n_max"] is not None]
    out = {"arms": []}
    for arm in arms:
        label, per_ctx = arm["label"], []
        for ctx in _need(sweep, "lengths"):
            docs, pv, tv, pm, tm = _pairs(sweep, ctx, label)
            entry = {"ctx": int(ctx), "prompt_tokens": _prompt_tokens(sweep, ctx), "documents": len(docs)}
            if docs:
                entry.update(cells={n: _cell(n, docs, pv, tv, pm, tm) for n in OUTPUT_LENGTHS},
                             first_token=math.exp(_log_gain(1, pv, tv, pm, tm)),
                             decode_only=float(np.exp(np.mean(np.log(tv) - np.log(tm)))),
                             verdict=break_even(pv, tv, pm, tm))
            per_ctx.append(entry)
        out["arms"].append({"label": label, "k": int(arm["draft_n_max"]), "lengths": per_ctx})
    return out


# ------------------------------------------------------------------------------------------------- the words

def _tokens(x) -> str:
    return f"{round(float(x)):,}"


CLAUSE = {"always": "it saves time for every output length",
          "never": "it costs more than it saves for every output length",
          "over": "it costs more than it saves for outputs under {n:,} tokens",
          "under": "it saves time only for outputs under {n:,} tokens",
          "mixed": "the speedup crosses 1 more than once (first at {n:,} output tokens)"}
CELL = {"always": "every output length", "never": "never", "over": "outputs of {n:,} tokens or more",
        "under": "outputs under {n:,} tokens", "mixed": "crosses 1 at {n:,} tokens"}


def _clause(e: dict) -> str:
    v = e["verdict"]
    return f"at {_tokens(e['prompt_tokens'])} prompt tokens " + CLAUSE[v["kind"]].format(n=v["tokens"])


def recommendation(arm: dict) -> str:
    """One plain recommendation for an MTP arm, from its per-length verdicts (computed, never typed)."""
    measured = [e for e in arm["lengths"] if e.get("verdict")]
    flag = f"{SPEC_FLAG} (`--spec-draft-n-max {arm['k']}`)"
    if not measured:
        return f"No length could be timed on both arms, so there is no recommendation for {flag}."
    fewest = min(e["documents"] for e in measured)
    if fewest < MIN_UNITS:
        return _advice(measured, flag) + (f" From {fewest} document(s) per length: n too small for an interval, so "
                                          "this rests on point estimates.")
    return _advice(measured, flag)


def _advice(measured: list[dict], flag: str) -> str:
    kinds = [e["verdict"]["kind"] for e in measured]
    first, last = _tokens(measured[0]["prompt_tokens"]), _tokens(measured[-1]["prompt_tokens"])
    span = f"{first} to {last} prompt tokens" if len(measured) > 1 else f"{first} prompt tokens"
    if all(k == "always" for k in kinds):
        return f"Enable {flag} for prompts up to {last} tokens: at every length measured ({span}) it saved " \
               "end-to-end time for every output length."
    if all(k == "never" for k in kinds):
        return f"Leave {flag} off: at every length measured ({span}) it cost more end-to-end time than it saved, " \
               "for every output length."
    lead = next((i for i, k in enumerate(kinds) if k != "always"), len(kinds))
    rest = measured[lead:]
    if lead and all(e["verdict"]["kind"] == "over" for e in rest):
        worst = max(e["verdict"]["tokens"] for e in rest)
        detail = "; ".join(_clause(e) for e in rest)
        return (f"Enable {flag} for prompts up to {_tokens(measured[lead - 1]['prompt_tokens'])} tokens; above, it "
                f"costs more than it saves for outputs under {worst:,} tokens ({detail}).")
    if lead and all(e["verdict"]["kind"] == "never" for e in rest):
        return (f"Enable {flag} for prompts up to {_tokens(measured[lead - 1]['prompt_tokens'])} tokens; above "
                f"(measured at {', '.join(_tokens(e['prompt_tokens']) for e in rest)} tokens), it costs more than it "
                "saves for every output length.")
    head = f"Enable {flag} for prompts up to {_tokens(measured[lead - 1]['prompt_tokens'])} tokens; beyond, " \
        if lead else f"Whether {flag} pays depends on prompt and output length: "
    return head + "; ".join(_clause(e) for e in rest) + "."


# ------------------------------------------------------------------------------------------------- the card

def _fx(fig: dict | None) -> str:
    """A speedup figure as a table cell: value and, where there is one, its interval."""
    if not fig or fig.get("value") is None:
        return "–"
    text = f"{fig['value']:.2f}×"
    if fig.get("ci95"):
        text += f" ({fig['ci95'][0]:.2f}–{fig['ci95'][1]:.2f})"
    return text


def _v(fig: dict | None, fmt: str, unit: str) -> str:
    if not fig or fig.get("value") is None:
        return "–"
    text = format(float(fig["value"]), fmt) + unit
    if fig.get("ci95"):
        text += f" ({format(fig['ci95'][0], fmt)}–{format(fig['ci95'][1], fmt)})"
    return text


def _verdict_cell(e: dict) -> str:
    v = e.get("verdict")
    return "not timed" if v is None else CELL[v["kind"]].format(n=v["tokens"])


def _source_text(src: dict) -> str:
    if src.get("kind") == "stdlib":
        return (f"the installed Python {md_text(src.get('python', '?'))} standard library's own source (a coding-agent "
                "prompt: files concatenated in sorted order, document i starting at a different file, then a "
                "question about them)")
    return f"the recipe's own documents ({', '.join(md_code(f) for f in src.get('files', []))})"


def _measured_table(sweep: dict) -> Md:
    labels = [a["label"] for a in _need(sweep, "arms")]
    lines = [(f"| Context | Prompt tokens | Arm | Acceptance | Decode tok/s | Prefill tok/s | First token, ms | "
             f"End to end ({int(_need(sweep, 'max_tokens'))} tokens), ms |"), "|---|---|---|---|---|---|---|---|"]
    for row in _need(sweep, "rows"):
        for label in labels:
            f = row["arms"][label]
            mtp = label != "vanilla"
            acc = f"{100 * f['acceptance']['value']:.1f} %" if mtp and f["acceptance"]["value"] is not None else "–"
            lines.append(
                f"| {int(row['ctx'])} | {_v({'value': row['prompt_tokens']['value']}, ',.0f', '')} | "
                f"{'off' if not mtp else 'k=' + label[1:]} | {acc} | {_v(f['decode_tok_s'], '.1f', '')}"
                f"{' · ' + _fx(f['decode_speedup']) if mtp else ''} | {_v(f['prefill_tok_s'], '.0f', '')}"
                f"{' · ' + _fx(f['prefill_speedup']) if mtp else ''} | {_v(f['ttft_ms'], '.0f', '')} | "
                f"{_v(f['e2e_ms'], '.0f', '')}{' · ' + _fx(f['e2e_speedup']) if mtp else ''} |")
    return Md("\n".join(lines))


def _grid(arm: dict) -> Md:
    lines = ["| Context | Prompt tokens | Documents | " + " | ".join(f"{n} out" for n in OUTPUT_LENGTHS)
             + " | First token only | Decode only | MTP pays for |",
             "|---|---|---|" + "---|" * (len(OUTPUT_LENGTHS) + 3)]
    for e in arm["lengths"]:
        cells = e.get("cells") or {}
        ends = (f"{e['first_token']:.2f}×", f"{e['decode_only']:.2f}×") if cells else ("–", "–")
        pt = "–" if e["prompt_tokens"] is None else _tokens(e["prompt_tokens"])
        lines.append(f"| {e['ctx']} | {pt} | {e['documents']} | "
                     + " | ".join(_fx(cells.get(n)) for n in OUTPUT_LENGTHS)
                     + f" | {ends[0]} | {ends[1]} | {_verdict_cell(e)} |")
    return Md("\n".join(lines))


def _memory(sweep: dict, fit: Node | None, kv_type: str) -> Md | None:
    labels = [a["label"] for a in _need(sweep, "arms")]
    servers = {(int(s["ctx"]), s["arm"]): s.get("memory") or {} for s in _need(sweep, "servers")}
    if not any(m.get("total_mib") for m in servers.values()):
        return None
    needs = {(int(n["ctx"]), n["kv_type"]): n for n in fit.need("needs")} if fit is not None else {}
    head = ("| Context | " + " | ".join("off" if la == "vanilla" else f"k={la[1:]}" for la in labels)
            + (" | Fit estimate, MTP on |" if fit is not None else " |"))
    lines = [head, "|---|" + "---|" * (len(labels) + (1 if fit is not None else 0))]
    for ctx in _need(sweep, "lengths"):
        cells = []
        for la in labels:
            m = servers.get((int(ctx), la)) or {}
            per = m.get("per_device_mib") or {}
            cells.append("–" if not m.get("total_mib") else
                         f"{m['total_mib']:.1f} ({', '.join(f'{md_text(d)} {v:.1f}' for d, v in per.items())})")
        if fit is not None:
            n = needs.get((int(ctx), kv_type))
            cells.append(f"{float(n['total_mib']):.1f}" if n is not None else "not estimated at this context")
        lines.append(f"| {int(ctx)} | " + " | ".join(cells) + " |")
    return Md("\n".join(lines))


def pays_view(s: Node, fit: Node | None = None) -> dict | None:
    """The card's "Where MTP pays" section of a smoke receipt, or None when it has no context sweep."""
    sweep = s.get("context_sweep")
    if sweep is None:
        return None
    if sweep.get("method") != METHOD:
        return {"intro": Md("The context sweep of this receipt was recorded by an older smoke method; rerun "
                            "`mtpquant smoke` to measure where MTP pays."), "tables": [], "recommendations": []}
    if "skipped" in sweep:
        return {"intro": Md(f"Context sweep skipped: {md_text(sweep['skipped'])}."), "tables": [],
                "recommendations": []}
    a = analyse(sweep)
    per = int(_need(sweep, "documents_per_length"))
    ci = (f"n too small for an interval: {per} document(s) per length, so every figure is a point estimate"
          if per < MIN_UNITS else "intervals are 95% BCa bootstrap CIs over documents")
    settings = s.need("settings")
    kv = (settings.get("spec") or {}).get("kv_type") or "f16"
    intro = Md(
        f"Each context length L is the servers' `-c`; every arm ran at once on the same {per} document(s) per length "
        f"from {_source_text(_need(sweep, 'source'))}, each prompt filling L less {int(_need(sweep, 'max_tokens'))} "
        f"output tokens and {int(_need(sweep, 'reserve_tokens'))} for the chat template; greedy, seed "
        f"{int(_need(sweep, 'seed'))}. Every prompt's files, token counts and sha256 are in the receipt "
        f"(`context_sweep.prompts`); {ci}. MTP columns show the figure and, after ·, its ratio to the same document "
        "without speculation.")
    grid_intro = Md(
        "End-to-end speedup of MTP by output length n: per document, time to first token plus n − 1 tokens at the "
        "measured decode speed (as llama-server times a request), vanilla over MTP; the geometric mean over "
        "documents. First token only and decode only are the two limits (n = 1, very long outputs). Context lengths "
        "between those measured were not measured.")
    tables = [{"title": Md("Measured per context length:"), "table": _measured_table(sweep)}]
    for arm in a["arms"]:
        tables.append({"title": Md(f"{grid_intro} k={arm['k']}:"), "table": _grid(arm)})
    memory = _memory(sweep, fit, kv)
    if memory is not None:
        where = (f"; the fit estimate at the same context ({md_text(kv)} KV, its own settings: "
                 f"{int(fit.need('settings.parallel'))} slot(s), draft length {int(fit.need('settings.draft_n_max'))})"
                 if fit is not None else "")
        tables.append({"title": Md("Memory of each server in MiB, from the buffer sizes its load log prints "
                                   f"(weights, KV, recurrent state, output and compute buffers) per device{where}:"),
                       "table": memory})
    recs = [Md(f"**k={arm['k']}:** {recommendation(arm)}") for arm in a["arms"]]
    return {"intro": intro, "tables": tables, "recommendations": recs}
