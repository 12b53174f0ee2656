"""Everything the card template sees: the receipts as Nodes, plus the values derived from them here."""

from __future__ import annotations

import re
from pathlib import Path

from mtpquant.core.errors import CardError
from mtpquant.core.rundir import RunDir
from mtpquant.report.card.caveats import caveats, not_measured
from mtpquant.report.card.fit import fit_grid, fit_summary
from mtpquant.report.card.frontmatter import front_matter
from mtpquant.report.card.head import head_view
from mtpquant.report.card.inputs import CARD_STEP, card_inputs
from mtpquant.report.card.markdown import Md, md_text, shell_command
from mtpquant.report.card.nodes import Node, load_receipts, receipt_sha256s
from mtpquant.report.card.pays import pays_view
from mtpquant.report.card.provenance import base_model, display_command, pinned_imatrix, published, toolchain_facts
from mtpquant.report.card.quality import quality_view
from mtpquant.report.card.runtimes import runtimes
from mtpquant.report.card.smoke import claim, how_to_run, smoke_view, untested_run

EH_PROJ_RE = re.compile(r"^blk\.\d+\.nextn\.eh_proj\.weight$")
DRAFT_HEAD_TEXT = {
    "collected": "imatrix with NextN statistics",
    "pinned": "pinned (no NextN statistics)",
    "unweighted": "no NextN statistics",
    "no imatrix": "no imatrix",
}


def card_context(run: RunDir, inputs: dict | None = None) -> dict:
    """Everything the template sees: receipts as Nodes, plus values derived from them here."""
    receipts = load_receipts(run)
    card = _card_node(run, receipts, inputs)
    source = receipts.get("source.json")
    if source is None:
        raise CardError("receipts/source.json is missing", "rerun `mtpquant build`")
    imatrix = receipts.get("imatrix.json")
    variants = _variants(receipts, card, source)
    smoked = [v for v in variants if v["smoke"] is not None]
    kind = source.need("kind")
    named, base_note = base_model(source, card)
    toolchain = toolchain_facts(variants[0]["q"].need("toolchain"))
    listed = _receipt_rows(run, receipts)
    ctx = {
        "card": card, "title": md_text(card["title"] or card.need("name")), "name": card.need("name"),
        "source": source, "source_kind": kind, "base_model": named, "base_model_line": base_note,
        "imatrix": imatrix, "variants": variants, "smoked": smoked,
        "evaluated": [v for v in variants if v["eval"] is not None],
        "fitted": [v for v in variants if v["fit"] is not None],
        "studied": [v for v in variants if v["head"] is not None],
        "toolchain": toolchain,
        "claims": [claim(v) for v in smoked if v["smoke"].need("headline") is not None],
        "how_to_run": how_to_run(smoked[0]) if smoked else untested_run(variants[0], card),
        "runtimes": runtimes(),
        "caveats": caveats(variants, source, toolchain),
        "not_measured": not_measured(variants),
        "receipts": listed,
        "quantize_commands": {v["tag"]: Md(shell_command(display_command(v["q"], source))) for v in variants},
        "nextn_checked": all(bool(v["q"].need("checks").get("nextn_complete")) for v in variants),
        "imatrix_corpus": Path(str(imatrix.need("corpus"))).name if imatrix is not None else None,
        "pinned_imatrix": pinned_imatrix(variants) if imatrix is None else None,
        "published": published(receipts.get("publish.json")),
    }
    ctx["front_matter"] = Md(front_matter(ctx))
    return ctx


def _card_node(run: RunDir, receipts: dict[str, Node], inputs: dict | None) -> Node:
    """receipts/card.json, or `inputs` in its place; made from the recipe when the run has neither."""
    if inputs is not None:
        return Node(inputs, "receipts/card.json")
    card = receipts.get(f"{CARD_STEP}.json")
    return card if card is not None else Node(card_inputs(run), "receipts/card.json")


def _variants(receipts: dict[str, Node], card: Node, source: Node) -> list[dict]:
    """The variants in the card's order, then any other quantize receipt by name."""
    tags = list(card.need("variants"))
    tags += sorted(n[len("quantize-"):-5] for n in receipts if n.startswith("quantize-") and n[9:-5] not in tags)
    variants = [_variant(receipts, tag, source) for tag in tags]
    if not variants:
        raise CardError("no quantize receipts: nothing to describe", "run `mtpquant build` first")
    return variants


def _variant(receipts: dict[str, Node], tag: str, source: Node) -> dict:
    q = receipts.get(f"quantize-{tag}.json")
    if q is None:
        raise CardError(f"receipts/quantize-{tag}.json is missing", "rerun `mtpquant build`")
    eh = _eh_proj(q)
    fit = receipts.get(f"fit-{tag}.json")
    return {
        "tag": tag,
        "q": q,
        "smoke": receipts.get(f"smoke-{tag}.json"),
        "eval": receipts.get(f"eval-{tag}.json"),
        "quality": quality_view(receipts[f"eval-{tag}.json"]) if f"eval-{tag}.json" in receipts else None,
        "fit": fit,
        "eh_proj": eh,
        "draft_head": DRAFT_HEAD_TEXT.get(q.need("draft_head"), q.need("draft_head")),
        "nextn_pins": [p for p in q.need("pins") if any(p.startswith(f"blk.{b}.") for b in q.need("nextn_blocks"))],
        "fit_summary": fit_summary(fit) if fit is not None else None,
        "fit_grid": fit_grid(fit) if fit is not None else None,
        "smoke_view": smoke_view(receipts[f"smoke-{tag}.json"]) if f"smoke-{tag}.json" in receipts else None,
        "head": head_view(receipts[f"draft-head-{tag}.json"]) if f"draft-head-{tag}.json" in receipts else None,
        "pays": pays_view(receipts[f"smoke-{tag}.json"], fit) if f"smoke-{tag}.json" in receipts else None,
    }


def _eh_proj(q: Node) -> list[dict]:
    """The type of each NextN eh_proj tensor, and whether the recipe's overrides or llama-quantize chose it."""
    nextn_types = q.need("nextn_types")
    overrides = [line.rpartition("=")[0] for line in q.need("overrides")]
    eh = []
    for name, typ in nextn_types.items():
        if EH_PROJ_RE.match(name):
            how = "override" if any(re.search(p, name) for p in overrides) else "default"
            eh.append({"type": typ, "how": how})
    return eh


def _receipt_rows(run: RunDir, receipts: dict[str, Node]) -> list[dict]:
    shas = receipt_sha256s(run)
    return [{"file": name, "step": receipts[name].get("step"), "variant": receipts[name].get("variant"),
             "sha256": shas[name]} for name in receipts]
