"""What a smoke costs: the device time method 3 needs for a ±1 pp acceptance CI and a ±2 % speedup CI at a k.

    python scripts/bench_smoke_cost.py RECEIPT.json [--k 4] [--acceptance-pp 1.0] [--speedup-pct 2.0]

From a measured smoke receipt: the half-widths of the acceptance and speedup CIs at k with the n prompts it had,
the time the two arms that a production smoke needs (vanilla and k) spent on their requests and warm-ups (each
request's wall time, as the receipt records it), and, scaling the half-widths as 1/sqrt(n), the prompts and the
device time the targets need. The scaled rows are computed from the measured ones, and say so.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def half_width(fig: dict, relative: bool) -> float | None:
    """Half the CI's width (relative to the value when asked); 0 when every prompt gave the same value."""
    if fig.get("ci95"):
        lo, hi = fig["ci95"]
        return (hi - lo) / 2 / (fig["value"] if relative else 1.0)
    return 0.0 if (fig.get("note") or "").startswith("identical") else None


def cost(receipt: dict, k: int, target_pp: float, target_pct: float) -> dict:
    g = receipt["results"]["chat"]["k"][str(k)]["overall"]
    n = g["acceptance"]["n"]
    arms = ("vanilla", f"k{k}")
    seconds = sum(r["wall_seconds"] for r in receipt["runs"] if r["server"] in arms and r["mode"] == "chat")
    warm = len(receipt["settings"]["warmup"]["bodies"])
    per_prompt = seconds / n
    acc_hw = half_width(g["acceptance"], False)
    sp_hw = half_width(g["speedup"], True)
    need = {}
    for name, hw, target in (("acceptance", None if acc_hw is None else 100 * acc_hw, target_pp),
                             ("speedup", None if sp_hw is None else 100 * sp_hw, target_pct)):
        if hw is None:
            need[name] = None
            continue
        prompts = n if hw <= target else math.ceil(n * (hw / target) ** 2)
        need[name] = {"half_width_measured": round(hw, 3), "prompts_needed": prompts,
                      "requests_seconds": round(prompts * per_prompt, 1)}
    return {"k": k, "prompts_measured": n, "seeds": len(receipt["settings"]["seeds"]),
            "two_arm_request_seconds": round(seconds, 1), "warmup_requests_per_server": warm,
            "seconds_per_prompt_two_arms": round(per_prompt, 3), "targets": {"acceptance_pp": target_pp,
                                                                             "speedup_pct": target_pct},
            "needed": need, "method": "half-widths scaled as 1/sqrt(n) from the measured n (computed, not run)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("receipt", type=Path)
    ap.add_argument("--k", type=int, default=None, help="default: the receipt's best k")
    ap.add_argument("--acceptance-pp", type=float, default=1.0)
    ap.add_argument("--speedup-pct", type=float, default=2.0)
    args = ap.parse_args()
    receipt = json.loads(args.receipt.read_text())
    out = cost(receipt, args.k or receipt["best_k"], args.acceptance_pp, args.speedup_pct)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
