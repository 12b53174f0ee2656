"""The draft-head study's measurement and choice: MTP acceptance of one head (llama-server, several slots answering
concurrent greedy requests, counts only), the loss of a candidate against the reference paired per prompt with a
bootstrap CI, and the smallest candidate whose loss stays within tolerance.

Acceptance is sum(draft_n_accepted) / sum(draft_n) over the prompts, as llama.cpp counts it. The counts a greedy
request gets do not depend on timing, so the slots answer at once and nothing here is a speed figure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtpquant.core.errors import UsageError
from mtpquant.measure.smoke.stats import bootstrap_ci

RESAMPLES = 2000
BOOTSTRAP_SEED = 20261201
LEVEL = 0.95
DECISION = ("the smallest candidate (file bytes) whose paired acceptance loss against the reference has a 95% "
            "upper bound at or below tolerance_pp; equal bytes: the lower upper bound, then the order given; "
            "none: the reference type")


# --------------------------------------------------------------------------------------------- paired loss, choice


def counts(per_prompt: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(accepted, drafted) per prompt, as float arrays."""
    return (np.array([r["draft_n_accepted"] for r in per_prompt], dtype=float),
            np.array([r["draft_n"] for r in per_prompt], dtype=float))


def paired_loss(reference: Sequence[dict], candidate: Sequence[dict], resamples: int = RESAMPLES,
                seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> dict:
    """Acceptance lost against the reference, in percentage points (positive: the candidate accepts less), with
    the smoke's BCa bootstrap CI (mtpquant.measure.smoke.stats) resampling prompts, the same prompts for both."""
    ref_ids, cand_ids = [r["prompt"] for r in reference], [r["prompt"] for r in candidate]
    if ref_ids != cand_ids:
        raise UsageError("paired loss needs the same prompts in the same order for both heads")
    ra, rd = counts(reference)
    ca, cd = counts(candidate)
    value = _loss(ra, rd, ca, cd)
    if not np.isfinite(value):
        return {"value": None, "ci95": None, "prompts": len(ref_ids)}
    ci = bootstrap_ci(_loss, [ra, rd, ca, cd], resamples=resamples, seed=seed, level=level)
    return {"value": _pp(value), "ci95": None if ci is None else [_pp(ci[0]), _pp(ci[1])], "prompts": len(ref_ids)}


def _loss(ra, rd, ca, cd) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return 100.0 * (np.sum(ra, axis=-1) / np.sum(rd, axis=-1) - np.sum(ca, axis=-1) / np.sum(cd, axis=-1))


def _pp(x) -> float:
    return round(float(x), 4) + 0.0  # + 0.0: -0.0 reads as 0.0 in a receipt


def choose(candidates: Sequence[dict], tolerance_pp: float, reference_type: str) -> dict:
    """The choice among measured candidates ({"type", "bytes", "loss_pp": {"value", "ci95"}}, in the order given).

    Outcome "chosen": one smallest qualifying candidate; "tie": several of the smallest size qualify (the lowest
    upper bound wins, then the order given); "none": no candidate qualifies, the head keeps the reference type.
    """
    qualifying = [c for c in candidates if qualifies(c["loss_pp"], tolerance_pp)]
    base = {"qualifying": [c["type"] for c in qualifying], "tolerance_pp": tolerance_pp, "rule": DECISION}
    if not qualifying:
        return {**base, "outcome": "none", "type": reference_type, "tied": [],
                "why": (f"No candidate's loss has a 95% upper bound at or below {tolerance_pp:g} pp "
                        f"({', '.join(c['type'] for c in candidates)} measured)")}
    smallest = min(c["bytes"] for c in qualifying)
    tied = [c for c in qualifying if c["bytes"] == smallest]
    best = min(tied, key=lambda c: (c["loss_pp"]["ci95"][1], tied.index(c)))
    others = [c["type"] for c in candidates if c not in qualifying]
    why = (f"{best['type']} is the smallest candidate whose loss is within {tolerance_pp:g} pp at 95% confidence "
           f"(upper bound {best['loss_pp']['ci95'][1]:g} pp)")
    if others:
        why += f"; {', '.join(others)} did not qualify"
    if len(tied) > 1:
        why += (f"; {', '.join(c['type'] for c in tied)} have the same size ({smallest} bytes): {best['type']} has "
                "the lowest upper bound (the first given, when equal)")
    return {**base, "outcome": "tie" if len(tied) > 1 else "chosen", "type": best["type"],
            "tied": [c["type"] for c in tied] if len(tied) > 1 else [], "why": why}


def qualifies(loss: dict, tolerance_pp: float) -> bool:
    """Whether a paired loss is within tolerance at 95% confidence (its CI's upper bound)."""
    ci = loss.get("ci95")
    return ci is not None and ci[1] <= tolerance_pp
