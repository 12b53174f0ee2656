"""The recipe's gates on the smoke headline: which apply to a variant, the report stored in its receipt, the error."""

from __future__ import annotations

from mtpquant.core.errors import GateError
from mtpquant.recipe import Gates, SmokeSpec


def gates_for(spec: SmokeSpec, tag: str) -> Gates:
    """The recipe's global gates, overridden field by field by the variant's own."""
    g = spec.gates
    v = spec.variant_gates.get(tag)
    if v is None:
        return g
    return Gates(min_acceptance=v.min_acceptance if v.min_acceptance is not None else g.min_acceptance,
                 min_speedup=v.min_speedup if v.min_speedup is not None else g.min_speedup,
                 k=v.k if v.k is not None else g.k)


def gate_k(result: dict, gates: Gates) -> int | None:
    """The k a gate is judged at: fixed in the recipe (else the first k swept), never the one that won."""
    ks = result.get("settings", {}).get("draft_n_max") or []
    return gates.k if gates.k is not None else (ks[0] if ks else None)


def lower_bound(fig: dict) -> float | None:
    """What a gate compares: the CI's lower end; the value itself only when every prompt gave exactly it."""
    if fig.get("ci95"):
        return fig["ci95"][0]
    note = fig.get("note") or ""
    return fig.get("value") if note.startswith("identical on all") else None


def gate_report(result: dict, gates: Gates) -> dict:
    """Each gate against its figure at the gate's k (chat, every prompt): gate, value, CI, lower bound, passed."""
    k = gate_k(result, gates)
    group = ((result.get("results") or {}).get("chat", {}).get("k", {}).get(str(k)) or {}).get("overall") or {}
    checks = {}
    for name, fname in (("min_acceptance", "acceptance"), ("min_speedup", "speedup")):
        gate = getattr(gates, name)
        if gate is None:
            continue
        fig = group.get(fname) or {"value": None, "ci95": None}
        low = lower_bound(fig)
        checks[name] = {"gate": gate, "figure": fname, "value": fig.get("value"), "ci95": fig.get("ci95"),
                        "n": fig.get("n"), "note": fig.get("note"), "lower_bound": low,
                        "passed": low is not None and low >= gate}
    return {"mode": "chat", "k": k, "checks": checks, "passed": all(c["passed"] for c in checks.values()),
            "rule": "a gate passes when the lower end of its figure's 95% CI (over prompts) clears it, at a k fixed "
                    "in advance"}


def check_gates(result: dict, gates: Gates, tag: str) -> None:
    """Raise GateError naming the variant, the figure, its CI and the gate for every gate not met."""
    report = gate_report(result, gates)
    failures = [_failure(tag, name, c, report["k"]) for name, c in report["checks"].items() if not c["passed"]]
    if failures:
        raise GateError("; ".join(failures), f"the figures are in receipts/smoke-{tag}.json")


def _failure(tag: str, name: str, c: dict, k: int | None) -> str:
    unit = "x" if c["figure"] == "speedup" else ""
    what = "MTP acceptance" if c["figure"] == "acceptance" else "decode speedup"
    where = f"chat, k={k}" if k is not None else "no draft-mtp measurement"
    if c["value"] is None:
        return f"variant {tag}: {what} could not be measured ({where}); gate {name} {c['gate']:g}{unit}"
    if c["lower_bound"] is None:
        return (f"variant {tag}: {what} {c['value']:.3f}{unit} ({where}) has no confidence interval "
                f"({c['note']}), so it cannot clear the gate {name} {c['gate']:g}{unit}")
    ci = f"95% CI {c['ci95'][0]:.3f}-{c['ci95'][1]:.3f}{unit}" if c["ci95"] else "the same on every prompt"
    return (f"variant {tag}: {what} {c['value']:.3f}{unit} ({ci}; {where}) is below the gate "
            f"{name} {c['gate']:g}{unit}")
