"""What the card shows of an eval receipt's perplexity ratio.

llama-perplexity's KLD pass (515e855) reads the base's log-probabilities as the saving pass stored them: floored at
16 nats below each position's top logit (`log_softmax` in tools/perplexity/perplexity.cpp). A text token the base
put below that floor counts with a smaller NLL than the base gave it, so that pass's PPL(base), and with it its
PPL(Q)/PPL(base), come out too low or too high whenever the text holds such tokens (rare tokens; every token of a
synthetic model). The saving pass computed the base's PPL from its full logits over the same tokens: when the two
PPL(base) differ, the card divides PPL(Q) by the saving pass's and says so.
"""

from __future__ import annotations

import math

from mtpquant.report.card.markdown import Md, number
from mtpquant.report.card.nodes import Node

SAME = 1e-3  # two PPL(base) figures closer than this (relative) are the same measurement
FLOOR_NATS = 16


def quality_view(e: Node) -> dict:
    """The ratio cell and the PPL(base) words for one eval receipt; `floored` when the KLD pass's base was."""
    ppl_q = number(e.need("stats.ppl_q"), "stats.ppl_q")
    kld_base = number(e.need("stats.ppl_base"), "stats.ppl_base")
    ratio = number(e.need("stats.ppl_ratio"), "stats.ppl_ratio")
    own = (e.get("base_logits") or {}).get("ppl")
    if own is None or abs(math.log(number(own, "base_logits.ppl") / kld_base)) <= SAME:
        err = number(e.need("stats.ppl_ratio_err"), "stats.ppl_ratio_err")
        return {"ratio": Md(f"{ratio:.4f} ± {err:.4f}"), "base": Md(f"PPL(base) {kld_base:.6g}"), "floored": False}
    own = float(own)
    return {
        "ratio": Md(f"{ppl_q / own:.4f}"),
        "base": Md(f"PPL(base) {own:.6g}, from the pass that saved the base's logits; the KLD pass, which reads those "
                   f"log-probabilities floored {FLOOR_NATS} nats below each position's top logit, gives "
                   f"{kld_base:.6g} and a ratio of {ratio:.4f}, which the table does not use"),
        "floored": True,
    }
