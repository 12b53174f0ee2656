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
                 min_speedup=v.min_speedup if v.min_speedup is not None else g.min_speedup)


def gate_report(result: dict, gates: Gates) -> dict:
    """Each gate against the headline figure (chat, best k): gate, value, CI, passed."""
    h = result.get("headline") or {}
    checks = {}
    for name, field in (("min_acceptance", "acceptance"), ("min_speedup", "speedup")):
        gate = getattr(gates, name)
        if gate is None:
            continue
        fig = h.get(field) or {"value": None, "ci95": None}
        value = fig.get("value")
        checks[name] = {"gate": gate, "figure": field, "value": value, "ci95": fig.get("ci95"),
                        "passed": value is not None and value >= gate}
    return {"mode": h.get("mode", "chat"), "k": h.get("k"), "checks": checks,
            "passed": all(c["passed"] for c in checks.values())}


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
    ci = f"95% CI {c['ci95'][0]:.3f}-{c['ci95'][1]:.3f}{unit}" if c["ci95"] else "no CI"
    return (f"variant {tag}: {what} {c['value']:.3f}{unit} ({ci}; {where}) is below the gate "
            f"{name} {c['gate']:g}{unit}")
