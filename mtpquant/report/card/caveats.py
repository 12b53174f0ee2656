"""The card's caveats and its list of what was not measured: statements that follow from the receipts, each
naming the figures it rests on (none is written without the measurement behind it)."""

from __future__ import annotations

from mtpquant.report.card.markdown import Md, fmt_fig, fmt_num, fmt_pct, md_code, md_text
from mtpquant.report.card.nodes import Node
from mtpquant.report.card.smoke import CHAT_ENDPOINT

NOT_MEASURED = (("smoke", "MTP acceptance and speedup in llama-server (no smoke receipt)"),
                ("eval", "KL divergence and perplexity against the BF16 source (no eval receipt)"),
                ("fit", "GPU memory fit (no fit receipt)"))


def caveats(variants: list[dict], source: Node, toolchain: dict) -> list[Md]:
    """Statements that follow from the receipts: each names the figures it rests on."""
    out: list[Md] = []
    if source.need("kind") == "synthetic":
        out.append(_synthetic(source))
    for v in variants:
        tag = md_text(v["tag"])
        out += _draft_head(tag, v)
        if v["smoke_view"] is not None:
            out += smoke_caveats(tag, v["smoke"], v["smoke_view"])
    if any(v["fit"] is not None for v in variants):
        method = next(v["fit"] for v in variants if v["fit"] is not None).need("method")
        out.append(Md(f"GPU fit is not measured on a GPU: {md_text(method)}."))
    if toolchain["commit"] is None:
        out.append(Md(f"The llama.cpp commit and build flags were not recorded: the binaries were found via "
                      f"{md_code(toolchain['found_by'] or 'unknown')} without a toolchain identity."))
    return out


def _synthetic(source: Node) -> Md:
    spec = source.need("provenance.spec")
    line = (f"The weights are synthetic ({md_code(source.need('provenance.generator'))}, seed {int(spec.need('seed'))}): "
            "a test artifact for the tooling, not a language model.")
    designed = spec.get("designed")
    if designed:
        line += (f" Its draft head was built to agree with the main model at a designed rate (alpha "
                 f"{fmt_num(designed.need('alpha'), '.2f')}, layout {md_text(designed.need('layout'))}, "
                 f"k {int(designed.need('k'))}), so its acceptance says nothing about a trained model.")
    return Md(line)


def _draft_head(tag: Md, v: dict) -> list[Md]:
    if v["nextn_pins"]:
        return [Md(f"{tag}: {len(v['nextn_pins'])} NextN tensor(s) had no imatrix statistics and were pinned "
                   f"to an imatrix-free type: " + ", ".join(md_code(p) for p in v["nextn_pins"]) + ".")]
    if v["q"].need("draft_head") == "unweighted":
        return [Md(f"{tag}: the NextN block was quantized without importance statistics (the imatrix has "
                   "none for it).")]
    return []


def smoke_caveats(tag: Md, s: Node, sv: dict) -> list[Md]:
    """What a smoke run's figures say against MTP or its settings, in the card's order."""
    best = sv["best_k"]
    if best is None:
        return [Md(f"{tag}: no k gave a defined speedup, so no k is recommended.")]
    g = sv["best"].need("overall")
    sp = g.need("speedup")
    out = _speedup(tag, sp, best) + _longer_windows(tag, sv, g, sp, best) + _differs(tag, g, best)
    return out + _raw_prompts(tag, sv) + _sweep(tag, sv) + _gates(tag, s)


def _speedup(tag: Md, sp: Node, best) -> list[Md]:
    if sp["value"] is None or not sp["ci95"]:
        return []
    lo, hi = sp["ci95"]
    if hi < 1.0:
        return [Md(f"{tag}: MTP made decoding slower: speedup {fmt_fig(sp, 'x')} at the best measured k={best}.")]
    if lo <= 1.0:
        return [Md(f"{tag}: the speedup at k={best}, {fmt_fig(sp, 'x')}, is not distinguishable from 1.00× "
                   "at 95%.")]
    return []


def _longer_windows(tag: Md, sv: dict, g: Node, sp: Node, best) -> list[Md]:
    out = []
    best_sp = sp["value"]
    for row in sv["ks"]:
        k, kg = int(row["k"]), row["g"]
        ksp = kg.need("speedup")["value"]
        if k > int(best) and ksp is not None and best_sp is not None and ksp < best_sp:
            out.append(Md(f"{tag}: a longer draft window gave less speedup: k={k} gave "
                          f"{fmt_fig(kg.need('speedup'), 'x')} against {fmt_fig(sp, 'x')} at k={best} "
                          f"(acceptance {_pct_or_na(kg.need('acceptance')['value'])} against "
                          f"{_pct_or_na(g.need('acceptance')['value'])})."))
    return out


def _differs(tag: Md, g: Node, best) -> list[Md]:
    diff = g.need("differs_from_vanilla")
    if int(diff.need("count")) <= 0:
        return []
    return [Md(f"{tag}: {int(diff['count'])} of {int(diff.need('of'))} greedy responses at k={best} differed "
               "from the same request without speculation.")]


def _raw_prompts(tag: Md, sv: dict) -> list[Md]:
    raw = sv["raw"]
    if raw is None:
        return []
    chat_acc, raw_acc = raw["chat"].need("acceptance"), raw["raw"].need("acceptance")
    if chat_acc["value"] is None or raw_acc["value"] is None:
        return []
    how = _compare(raw_acc, chat_acc, "was lower", "was higher", "was the same")
    return [Md(f"{tag}: acceptance with raw prompts to `/completion` (no chat template) {how}: "
               f"{fmt_fig(raw_acc, 'pct')} against {fmt_fig(chat_acc, 'pct')} through "
               f"{md_code(CHAT_ENDPOINT)} (k={int(raw['k'])}); speedup "
               f"{fmt_fig(raw['raw'].need('speedup'), 'x')} against {fmt_fig(raw['chat'].need('speedup'), 'x')}.")]


def _sweep(tag: Md, sv: dict) -> list[Md]:
    sweep = sv["sweep"]
    if sweep is None or "rows" not in sweep:
        return []
    rows = [r for r in sweep["rows"] if "skipped" not in r and r.get("speedup") is not None]
    if len(rows) < 2 or not rows[-1]["speedup"] < rows[0]["speedup"]:
        return []
    return [Md(f"{tag}: longer prompts lowered the speedup: {fmt_num(rows[0]['speedup'], '.2f')}× at "
               f"{int(rows[0].need('prompt_tokens'))} prompt tokens, {fmt_num(rows[-1]['speedup'], '.2f')}× "
               f"at {int(rows[-1].need('prompt_tokens'))} (one request per length, so no CI).")]


def _gates(tag: Md, s: Node) -> list[Md]:
    gates = s.get("gates")
    if gates is None or gates.get("passed") is not False:
        return []
    failed = []
    for name, c in gates.need("checks").items():
        if c.need("passed"):
            continue
        value = c.need("value")
        shown = "not measured" if value is None else (
            fmt_pct(value) if c.need("figure") == "acceptance" else f"{fmt_num(value, '.2f')}×")
        failed.append(f"{md_code(name)} {fmt_num(c.need('gate'), 'g')} ({md_text(c['figure'])} {shown})")
    where = f" at k={int(gates['k'])}" if gates.get("k") is not None else ""
    return [Md(f"{tag}: below the recipe's gate{where}: " + "; ".join(failed) + ".")]


def _compare(a: dict, b: dict, lower: str, higher: str, same: str) -> str:
    """`lower`/`higher` only when a's 95% CI lies wholly below/above b's; else `same` (beyond the CIs)."""
    if a["ci95"] and b["ci95"]:
        if a["ci95"][1] < b["ci95"][0]:
            return lower
        if a["ci95"][0] > b["ci95"][1]:
            return higher
        return same + " within the 95% CIs"
    return lower if a["value"] < b["value"] else higher if a["value"] > b["value"] else same


def _pct_or_na(x) -> str:
    return "not defined" if x is None else fmt_pct(x)


def not_measured(variants: list[dict]) -> list[Md]:
    """One line per measurement that some variant lacks, naming the variants."""
    out = []
    for key, what in NOT_MEASURED:
        missing = [v["tag"] for v in variants if v[key] is None]
        if missing:
            who = "any variant" if len(missing) == len(variants) else ", ".join(missing)
            out.append(Md(f"{md_text(what)}: not measured for {md_text(who)}."))
    return out
