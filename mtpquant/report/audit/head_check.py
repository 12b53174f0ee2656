"""Each draft-head study against the variant it chose for: acceptance, paired losses and the choice re-derived from
the per-prompt counts it recorded, and the variant's file shown to be the candidate that was measured."""

from __future__ import annotations

import json

from mtpquant.core.errors import VerifyError
from mtpquant.core.files import plain_json
from mtpquant.measure import draft_head as dh
from mtpquant.measure.smoke import acceptance
from mtpquant.report.audit.state import Audit, need

PREFIX = "draft-head-"
EDITED = "the receipt was edited or written by another version of mtpquant's draft-head study"
CHOICE_SHOWN = ("outcome", "type", "tied", "qualifying")


def check_head_studies(audit: Audit, receipts: dict, quantize: dict) -> None:
    """Every receipts/draft-head-*.json studied a variant of this run, and its figures and choice hold."""
    for name in sorted(n for n in receipts if n.startswith(PREFIX)):
        tag = name[len(PREFIX):-len(".json")]
        where = f"receipts/{name}"
        q = quantize.get(tag)
        if q is None:
            raise VerifyError(f"{where}: studies a variant this run has no quantize receipt for",
                              "remove the stale receipt")
        _check_study(audit, tag, receipts[name], q, where)


def _check_study(audit: Audit, tag: str, r: dict, q: dict, where: str) -> None:
    settings, ref = need(r, "settings", where), need(r, "reference", where)
    candidates, choice = need(r, "candidates", where), need(r, "choice", where)
    ref_counts = need(need(ref, "measured", where), "per_prompt", where)
    for arm, label in [(ref, "reference"), *((c, f"candidates[{i}]") for i, c in enumerate(candidates))]:
        counts = need(need(arm, "measured", where), "per_prompt", where)
        _same(where, f"{label}.acceptance", arm.get("acceptance"), acceptance.acceptance(counts))
        if label != "reference":
            loss = dh.paired_loss(ref_counts, counts)
            _same(where, f"{label}.loss_pp", arm.get("loss_pp"), loss)
            _same(where, f"{label}.qualifies", arm.get("qualifies"), dh.qualifies(loss, settings["tolerance_pp"]))
    calibrated = {c["type"]: c for c in candidates}
    for i, a in enumerate((r.get("unweighted") or {}).get("arms") or []):
        counts = need(need(a, "measured", where), "per_prompt", where)
        label = f"unweighted.arms[{i}]"
        _same(where, f"{label}.acceptance", a.get("acceptance"), acceptance.acceptance(counts))
        _same(where, f"{label}.loss_pp", a.get("loss_pp"), dh.paired_loss(ref_counts, counts))
        w = calibrated.get(a.get("type"))
        if w is None:
            raise VerifyError(f"{where}: {label} is a {a.get('type')} head, which is not a candidate", EDITED)
        _same(where, f"{label}.vs_calibrated_pp", a.get("vs_calibrated_pp"),
              dh.paired_loss(w["measured"]["per_prompt"], counts))
    again = dh.choose(candidates, settings["tolerance_pp"], ref["type"])
    for key in CHOICE_SHOWN:
        _same(where, f"choice.{key}", choice.get(key), again[key])
    chosen = next((a for a in [*candidates, ref] if a["type"] == choice["type"]), None)
    if chosen is None or choice.get("sha256") != chosen.get("sha256"):
        raise VerifyError(f"{where}: choice.sha256 is not the sha256 of the measured {choice['type']} head", EDITED)
    if q["sha256"] != choice["sha256"]:
        raise VerifyError(f"{where}: chose the {choice['type']} head, measured as sha256 {choice['sha256']}, but "
                          f"{q['file']} is {q['sha256']}",
                          "the variant was not quantized with the chosen head; rebuild the run (mtpquant build)")
    audit.ok(f"draft head {tag}: {choice['type']} ({choice['outcome']}) re-derives from the per-prompt counts of "
             f"{len(candidates)} candidate(s) on {len(ref_counts)} prompt(s); {q['file']} is the measured candidate")


def _same(where: str, field: str, recorded, derived) -> None:
    if plain_json(recorded) != plain_json(derived):
        raise VerifyError(f"{where}: {field} is {json.dumps(recorded)}, its own counts give {json.dumps(derived)}",
                          EDITED)
