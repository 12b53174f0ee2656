"""A failed smoke gate is part of the run's state: `verify` says so and fails, `publish` refuses the run."""

from __future__ import annotations

from mtpquant.core.errors import GateError
from mtpquant.report.audit.state import Audit

HINT = ("rebuild with a variant that clears it, or change the gate in the recipe; `verify --allow-failed-gates` "
        "checks the rest")


def failed_gates(receipts: dict) -> list[str]:
    """One phrase per gate a smoke receipt records as failed: variant, gate, figure and its lower bound, k."""
    out = []
    for name, r in sorted(receipts.items()):
        if not name.startswith("smoke-"):
            continue
        report = r.get("gates") or {}
        for gate, c in (report.get("checks") or {}).items():
            if not c.get("passed"):
                low = c.get("lower_bound")
                shown = f"lower bound {low:.3f}" if low is not None else (c.get("note") or "not measured")
                out.append(f"variant {name[len('smoke-'):-len('.json')]}: {gate} {c.get('gate'):g} FAILED "
                           f"({c.get('figure')} {shown}, k={report.get('k')})")
    return out


def check_gates(audit: Audit, receipts: dict, allow_failed: bool) -> None:
    """Every gate of every smoke receipt held, or the run is refused (unless told to report and go on)."""
    failed = failed_gates(receipts)
    if not failed:
        smoked = sum(1 for n in receipts if n.startswith("smoke-"))
        audit.ok(f"smoke gates: all held ({smoked} smoke receipt(s))" if smoked else "smoke gates: no smoke run")
        return
    if not allow_failed:
        raise GateError("; ".join(failed), HINT)
    audit.note("smoke gates FAILED (allowed by --allow-failed-gates): " + "; ".join(failed))
