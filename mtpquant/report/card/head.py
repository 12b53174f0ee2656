"""What the card shows of a draft-head study (receipts/draft-head-*.json): how it measured, every candidate's
size, acceptance and paired loss, and the type chosen with the reason."""

from __future__ import annotations

from mtpquant.report.card.markdown import Md, fmt_num, fmt_pct, fmt_size, md_code, md_sha, md_text, number
from mtpquant.report.card.nodes import Node

SCOPE_TEXT = {"eh_proj": "`nextn.eh_proj`", "nextn_block": "every quantizable tensor of the NextN block"}
REFERENCE_TEXT = {"Q8_0": "the head at Q8_0", "source": "the head at the source's own type, {type}"}
OUTCOME_TEXT = {"chosen": "Chosen", "tie": "Chosen among candidates of equal size",
                "none": "No candidate qualified; the head keeps the reference type"}
PATH_TEXT = {"collected": "collected (llama-imatrix ran the NextN block)", "pinned": "pinned to an imatrix-free type",
             "unweighted": "none (the imatrix has no NextN statistics)", "no imatrix": "none (no imatrix)"}
HEADER = ("| Head type | Head size | File size | Acceptance | Loss (pp, 95% CI) | Qualifies | Quantize s | Measure s "
          "| Server CPU s |")
UNWEIGHTED_HEADER = ("| Head type | Calibrated acceptance | Unweighted acceptance "
                     "| Calibrated − unweighted (pp, 95% CI) | Unweighted qualifies |")


def head_view(r: Node) -> dict:
    """The study's lines for the card: method, the candidates' table, the choice."""
    s, m, choice, ref = r.need("settings"), r.need("measurement"), r.need("choice"), r.need("reference")
    scope = r.need("scope_tensors")
    method = Md(
        f"The draft head ({SCOPE_TEXT.get(s.need('scope'), md_text(s.need('scope')))}: {len(scope)} tensor(s)) was "
        f"quantized at each candidate type with the trunk of {md_text(r.need('variant_type'))} held identical, and "
        f"compared with {md_text(REFERENCE_TEXT[s.need('reference')].format(type=ref.need('type')))}. "
        f"MTP acceptance (accepted / drafted) at k={int(m.need('k'))} on "
        f"{len(m.need('prompts'))} prompt(s) of {md_code(m.need('suite').get('file') or 'an inline suite')}, "
        f"{int(m.need('max_tokens'))} greedy tokens each, {int(m.need('slots'))} server slot(s) answering at once "
        "(acceptance only: no speed is measured). Loss is the reference's acceptance minus the candidate's on the same "
        f"prompts, with a 95% bootstrap CI over prompts; a candidate qualifies when the CI's upper bound is at most "
        f"{fmt_num(s.need('tolerance_pp'), 'g')} pp. Importance data of the head: "
        f"{md_text(PATH_TEXT.get(r.need('imatrix').need('head_path'), r['imatrix']['head_path']))}. Measure s is "
        "the measuring server's time from start to stop (on a GPU, the GPU time per candidate); server CPU s its "
        "own CPU time.")
    lines = [HEADER, "|---|---|---|---|---|---|---|---|---|"]
    candidates = r.need("candidates")
    if not any(c.need("is_reference") for c in candidates):  # the reference is measured, not a candidate
        lines.append(_row(ref, " (reference, not a candidate)", Md("–"), "–"))
    for c in candidates:
        lines.append(_row(c, " (reference)" if c.need("is_reference") else "", _loss(c.need("loss_pp")),
                          "yes" if c.need("qualifies") else "no"))
    verdict = Md(f"{OUTCOME_TEXT.get(choice.need('outcome'), md_text(choice.need('outcome')))}: "
                 f"**{md_text(choice.need('type'))}**. {md_text(choice.need('why'))}. The published file holds the "
                 f"head at {md_text(choice.need('type'))} (policy rule from "
                 f"{md_code(choice.need('rule').need('origin'))}), and its sha256 is the measured candidate's, "
                 f"{md_sha(choice.need('sha256'))}.")
    return {"method": method, "table": Md("\n".join(lines)), "verdict": verdict,
            "unweighted": _unweighted(r.get("unweighted"))}


def _unweighted(u: Node | None) -> Md | None:
    """Each candidate with and without the head's importance data: what calibrating the head bought."""
    if u is None:
        return None
    if not u.need("arms"):
        return Md(f"Without the head's importance data: not measured, {md_text(u.need('note'))}.")
    intro = (f"Each candidate again with the head's statistics removed from the imatrix "
             f"({md_code(u.need('imatrix').need('file'))}, everything else as before), against the calibrated head "
             "(positive: the unweighted head accepts less):")
    lines = [intro, "", UNWEIGHTED_HEADER, "|---|---|---|---|---|"]
    for a in u.need("arms"):
        lines.append(f"| {md_text(a.need('type'))} | {_share(a.need('calibrated_acceptance'))} | "
                     f"{_share(a.need('acceptance'))} | {_loss(a.need('vs_calibrated_pp'))} | "
                     f"{'yes' if a.need('qualifies') else 'no'} |")
    return Md("\n".join(lines))


def _row(arm: Node, mark: str, loss: Md, qualifies: str) -> str:
    sec = arm.need("seconds")
    return (f"| {md_text(arm.need('type'))}{mark} | {fmt_size(arm.need('head_bytes'))} | {fmt_size(arm.need('bytes'))} "
            f"| {_share(arm.need('acceptance'))} | {loss} | {qualifies} | {fmt_num(sec.need('quantize'), '.1f')} | "
            f"{fmt_num(sec.need('measure'), '.1f')} | {_opt(sec.need('server_cpu'))} |")


def _share(x) -> Md:
    return fmt_pct(x) if x is not None else Md("not defined (no drafts)")


def _loss(loss: Node) -> Md:
    if loss.need("value") is None:
        return Md("not defined")
    ci = loss.need("ci95")
    text = f"{number(loss['value'], 'a loss'):.2f}"
    return Md(text + (f" ({number(ci[0], 'a bound'):.2f} to {number(ci[1], 'a bound'):.2f})" if ci else ""))


def _opt(x) -> Md:
    return fmt_num(x, ".1f") if x is not None else Md("not recorded")
