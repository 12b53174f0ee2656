"""What the card shows of an eval receipt's perplexity ratio: llama-perplexity's own, or, where its KLD pass read a
floored base (measure.kld.ppl_ratio says when and why), PPL(Q) over the PPL the source measured of itself."""

from __future__ import annotations

from mtpquant.measure.kld import FLOOR_NATS, ppl_ratio
from mtpquant.report.card.markdown import Md, number
from mtpquant.report.card.nodes import Node


def quality_view(e: Node) -> dict:
    """The ratio cell and the PPL(base) words for one eval receipt; `floored` when the KLD pass's base was."""
    figures = {k: number(e.need(f"stats.{k}"), f"stats.{k}")
               for k in ("ppl_q", "ppl_base", "ppl_ratio", "ppl_ratio_err")}
    own = (e.get("base_logits") or {}).get("ppl")
    ratio, err, base, floored = ppl_ratio(figures, None if own is None else number(own, "base_logits.ppl"))
    if not floored:
        return {"ratio": Md(f"{ratio:.4f} ± {err:.4f}"), "base": Md(f"PPL(base) {base:.6g}"), "floored": False,
                "floor_nats": FLOOR_NATS}
    return {
        "ratio": Md(f"{ratio:.4f}"),
        "base": Md(f"PPL(base) {base:.6g}, from the pass that saved the base's logits; the KLD pass, which reads those "
                   f"log-probabilities floored {FLOOR_NATS} nats below each position's top logit, gives "
                   f"{figures['ppl_base']:.6g} and a ratio of {figures['ppl_ratio']:.4f}, which the table does not "
                   "use"),
        "floored": True,
        "floor_nats": FLOOR_NATS,
    }
