"""The smoke figures from the request records: per mode and k, overall / per category / per seed, and the best k."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtpquant.measure.smoke.stats import figure, geomean_ratio, mean, ratio_of_sums, rounded
from mtpquant.measure.smoke.suite import CATEGORIES


def _arr(recs: Sequence[dict], key: str) -> np.ndarray:
    return np.array([r[key] for r in recs], dtype=float)


MIN_TIMED_TOKENS = 16  # fewer generated tokens give no meaningful predicted_per_second: never in a ratio
FULL_LENGTH = ("length", "limit")  # finish_reason (chat) / stop_type (raw) of a request that ran to max_tokens


def _t(recs: Sequence[dict], key: str) -> np.ndarray:
    return np.array([float(r["timings"][key]) for r in recs], dtype=float)


def timed(rec: dict) -> bool:
    """Whether a request's speed can enter a figure: it ran to max_tokens and generated enough tokens."""
    t = rec["timings"]
    return (rec.get("finish_reason") in FULL_LENGTH and int(t.get("predicted_n", 0)) >= MIN_TIMED_TOKENS
            and float(t.get("predicted_per_second", 0)) > 0 and float(t.get("prompt_per_second", 0)) > 0)


def e2e_ms(rec: dict) -> float:
    """End-to-end time of a request as the server timed it: prompt processing plus generation."""
    return float(rec["timings"]["prompt_ms"]) + float(rec["timings"]["predicted_ms"])


def mtp_group(pairs: Sequence[tuple[dict, dict]]) -> dict:
    """The figures of (vanilla, MTP) record pairs of the same prompt and seed.

    Acceptance counts every request; speed figures only pairs where both requests ran to max_tokens with at least
    MIN_TIMED_TOKENS tokens (the others are counted under `excluded`)."""
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
        if steps_known else {"value": None, "ci95": None, "n": 0, "note": "verification steps not known"},
        "tokens_per_step": figure(ratio_of_sums, (a + _arr(mtp, "draft_steps"), _arr(mtp, "draft_steps")),
                                  clusters=prompts) if steps_known else None,
        **_speed(pairs),
        "differs_from_vanilla": {"count": differs, "of": len(pairs), "share": rounded(differs / len(pairs)) if pairs
                                 else None},
    }
    if steps_known and out["draft_steps"]:
        out["acceptance_per_position"], out["conditional_acceptance_per_position"] = _per_position(mtp, out[
            "draft_steps"])
    return out


def _speed(pairs: Sequence[tuple[dict, dict]]) -> dict:
    """Decode, prefill and end-to-end figures of both arms over the pairs whose speed is meaningful."""
    ok = [(v, m) for v, m in pairs if timed(v) and timed(m)]
    van, mtp = [v for v, _ in ok], [m for _, m in ok]
    prompts = [m["prompt"] for m in mtp]
    early = sum(1 for v, m in pairs if v.get("finish_reason") not in FULL_LENGTH or
                m.get("finish_reason") not in FULL_LENGTH)
    return {
        "timed_units": len(ok),
        "excluded": {"stopped_early": early, "too_short_or_untimed": len(pairs) - len(ok) - early,
                     "rule": f"speed figures use pairs where both requests ran to max_tokens with at least "
                             f"{MIN_TIMED_TOKENS} tokens"},
        "tok_s": figure(mean, (_t(mtp, "predicted_per_second"),), 2, clusters=prompts),
        "vanilla_tok_s": figure(mean, (_t(van, "predicted_per_second"),), 2, clusters=prompts),
        "speedup": figure(geomean_ratio, (_t(mtp, "predicted_per_second"), _t(van, "predicted_per_second")),
                          clusters=prompts),
        "prompt_tok_s": figure(mean, (_t(mtp, "prompt_per_second"),), 1, clusters=prompts),
        "vanilla_prompt_tok_s": figure(mean, (_t(van, "prompt_per_second"),), 1, clusters=prompts),
        "prefill_speedup": figure(geomean_ratio, (_t(mtp, "prompt_per_second"), _t(van, "prompt_per_second")),
                                  clusters=prompts),
        "e2e_ms": figure(mean, (np.array([e2e_ms(m) for m in mtp]),), 1, clusters=prompts),
        "vanilla_e2e_ms": figure(mean, (np.array([e2e_ms(v) for v in van]),), 1, clusters=prompts),
        "e2e_speedup": figure(geomean_ratio, (np.array([e2e_ms(v) for v in van]),
                                              np.array([e2e_ms(m) for m in mtp])), clusters=prompts),
    }


def _per_position(mtp: Sequence[dict], steps: int) -> tuple[list[float | None], list[float | None]]:
    """Per draft position i: the share of verification steps that accepted at least i+1 drafted tokens, and the
    conditional acceptance P(position i accepted | position i-1 accepted)."""
    width = max(len(m["accepted_per_position"] or []) for m in mtp)
    sums = np.zeros(width)
    for m in mtp:
        pos = m["accepted_per_position"] or []
        sums[:len(pos)] += pos
    reached = np.concatenate([[steps], sums[:-1]])
    conditional = [rounded(s / r) if r else None for s, r in zip(sums, reached)]
    return [rounded(s / steps) for s in sums], conditional


def _groups(pairs: Sequence[tuple[dict, dict]], seeds: Sequence[int]) -> dict:
    cats = [c for c in CATEGORIES if any(m["category"] == c for _, m in pairs)]
    cats += sorted({m["category"] for _, m in pairs} - set(cats))
    return {
        "overall": mtp_group(pairs),
        "per_category": {c: mtp_group([p for p in pairs if p[1]["category"] == c]) for c in cats},
        "per_seed": {str(s): mtp_group([p for p in pairs if p[1]["seed"] == s]) for s in seeds},
    }


def _vanilla_group(recs: Sequence[dict]) -> dict:
    ok = [r for r in recs if timed(r)]
    return {"units": len(recs), "timed_units": len(ok),
            "tok_s": figure(mean, (_t(ok, "predicted_per_second"),), 2, clusters=[r["prompt"] for r in ok])}


def summarize(runs: Sequence[dict], ks: Sequence[int], seeds: Sequence[int], modes: Sequence[str],
              split: dict | None = None) -> dict:
    """Per mode: vanilla tok/s and, per k, the figures overall / per category / per seed on every prompt; then the
    best k chosen on the `split`'s selection prompts and its figures on the other (report) prompts."""
    out: dict = {}
    for mode in modes:
        van = {(r["prompt"], r["seed"]): r for r in runs if r["server"] == "vanilla" and r["mode"] == mode}
        vrecs = list(van.values())
        cats = [c for c in CATEGORIES if any(r["category"] == c for r in vrecs)]
        pairs = {k: [(van[(m["prompt"], m["seed"])], m) for m in runs if m["server"] == f"k{k}" and m["mode"] == mode]
                 for k in ks}
        per_k = {str(k): _groups(pairs[k], seeds) for k in ks}
        out[mode] = {
            "vanilla": {"overall": _vanilla_group(vrecs),
                        "per_category": {c: _vanilla_group([r for r in vrecs if r["category"] == c]) for c in cats},
                        "per_seed": {str(s): _vanilla_group([r for r in vrecs if r["seed"] == s]) for s in seeds}},
            "k": per_k,
            **_chosen(pairs, split),
        }
    return out


def _chosen(pairs: dict, split: dict | None) -> dict:
    """best_k chosen on the selection prompts, reported from the others (or on all, said so, with one prompt)."""
    if not split or not split["selection"] or not split["report"]:
        best = best_k({str(k): {"overall": mtp_group(p)} for k, p in pairs.items()})
        return {"best_k": best, "best_k_chosen_on": "all prompts (too few to split): chosen after the fact on the "
                                                    "data it reports", "best": None}
    sel, rep = set(split["selection"]), set(split["report"])
    on_sel = {str(k): {"overall": mtp_group([pr for pr in p if pr[1]["prompt"] in sel])} for k, p in pairs.items()}
    best = best_k(on_sel)
    report = mtp_group([pr for pr in pairs[best] if pr[1]["prompt"] in rep]) if best is not None else None
    return {"best_k": best, "best_k_chosen_on": "selection prompts", "best": report}
def best_k(per_k: dict) -> int | None:
    """The k with the highest overall speedup (the smaller k on a tie)."""
    scored = [(g["overall"]["speedup"]["value"], -int(k)) for k, g in per_k.items()
              if g["overall"]["speedup"]["value"] is not None]
    return -max(scored)[1] if scored else None
