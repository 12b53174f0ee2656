"""The smoke figures from the request records: per mode and k, overall / per category / per seed, and the best k."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtpquant.measure.smoke.stats import figure, geomean_ratio, mean, ratio_of_sums, rounded
from mtpquant.measure.smoke.suite import CATEGORIES


def _arr(recs: Sequence[dict], key: str) -> np.ndarray:
    return np.array([r[key] for r in recs], dtype=float)


def _tps(recs: Sequence[dict]) -> np.ndarray:
    return np.array([max(float(r["timings"]["predicted_per_second"]), 1e-9) for r in recs], dtype=float)


def mtp_group(pairs: Sequence[tuple[dict, dict]]) -> dict:
    """The figures of (vanilla, MTP) record pairs of the same prompt and seed."""
    van = [v for v, _ in pairs]
    mtp = [m for _, m in pairs]
    d, a = _arr(mtp, "draft_n"), _arr(mtp, "draft_n_accepted")
    steps_known = all(m["draft_steps"] is not None for m in mtp)
    differs = sum(1 for v, m in pairs if v["text"] != m["text"])
    prompts = [m["prompt"] for m in mtp]
    out = {
        "units": len(pairs),
        "prompts": len(set(prompts)),
        "draft_n": int(d.sum()), "draft_n_accepted": int(a.sum()),
        "draft_steps": int(sum(m["draft_steps"] for m in mtp)) if steps_known else None,
        "acceptance": figure(ratio_of_sums, (a, d), clusters=prompts),
        "mean_accepted_length": figure(ratio_of_sums, (a, _arr(mtp, "draft_steps")), clusters=prompts)
        if steps_known else {"value": None, "ci95": None},
        "tok_s": figure(mean, (_tps(mtp),), 2, clusters=prompts),
        "vanilla_tok_s": figure(mean, (_tps(van),), 2, clusters=prompts),
        "speedup": figure(geomean_ratio, (_tps(mtp), _tps(van)), clusters=prompts),
        "differs_from_vanilla": {"count": differs, "of": len(pairs), "share": rounded(differs / len(pairs)) if pairs
                                 else None},
    }
    if steps_known and out["draft_steps"]:
        out["acceptance_per_position"] = _per_position(mtp, out["draft_steps"])
    return out


def _per_position(mtp: Sequence[dict], steps: int) -> list[float | None]:
    """Share of verification steps whose draft was accepted up to and including each position."""
    width = max(len(m["accepted_per_position"] or []) for m in mtp)
    sums = np.zeros(width)
    for m in mtp:
        pos = m["accepted_per_position"] or []
        sums[:len(pos)] += pos
    return [rounded(s / steps) for s in sums]


def _groups(pairs: Sequence[tuple[dict, dict]], seeds: Sequence[int]) -> dict:
    cats = [c for c in CATEGORIES if any(m["category"] == c for _, m in pairs)]
    cats += sorted({m["category"] for _, m in pairs} - set(cats))
    return {
        "overall": mtp_group(pairs),
        "per_category": {c: mtp_group([p for p in pairs if p[1]["category"] == c]) for c in cats},
        "per_seed": {str(s): mtp_group([p for p in pairs if p[1]["seed"] == s]) for s in seeds},
    }


def _vanilla_group(recs: Sequence[dict]) -> dict:
    return {"units": len(recs), "tok_s": figure(mean, (_tps(recs),), 2, clusters=[r["prompt"] for r in recs])}


def summarize(runs: Sequence[dict], ks: Sequence[int], seeds: Sequence[int], modes: Sequence[str]) -> dict:
    """Per mode: vanilla tok/s and, per k, the figures overall / per category / per seed; plus the best k."""
    out: dict = {}
    for mode in modes:
        van = {(r["prompt"], r["seed"]): r for r in runs if r["server"] == "vanilla" and r["mode"] == mode}
        vrecs = list(van.values())
        cats = [c for c in CATEGORIES if any(r["category"] == c for r in vrecs)]
        per_k = {}
        for k in ks:
            mtp = [r for r in runs if r["server"] == f"k{k}" and r["mode"] == mode]
            per_k[str(k)] = _groups([(van[(m["prompt"], m["seed"])], m) for m in mtp], seeds)
        out[mode] = {
            "vanilla": {"overall": _vanilla_group(vrecs),
                        "per_category": {c: _vanilla_group([r for r in vrecs if r["category"] == c]) for c in cats},
                        "per_seed": {str(s): _vanilla_group([r for r in vrecs if r["seed"] == s]) for s in seeds}},
            "k": per_k,
            "best_k": best_k(per_k),
        }
    return out


def best_k(per_k: dict) -> int | None:
    """The k with the highest overall speedup (the smaller k on a tie)."""
    scored = [(g["overall"]["speedup"]["value"], -int(k)) for k, g in per_k.items()
              if g["overall"]["speedup"]["value"] is not None]
    return -max(scored)[1] if scored else None
