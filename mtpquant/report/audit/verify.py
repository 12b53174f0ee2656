"""`mtpquant verify`: every check in order, the first failure raised as one VerifyError."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mtpquant.core.errors import UsageError, VerifyError
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.rundir import RunDir
from mtpquant.report.audit.artifacts import check_headers, check_quantize_receipts, check_sums
from mtpquant.report.audit.card_check import check_card
from mtpquant.report.audit.gates_check import check_gates
from mtpquant.report.audit.head_check import check_head_studies
from mtpquant.report.audit.manifest_check import check_manifest
from mtpquant.report.audit.measurements import check_measurements
from mtpquant.report.audit.rebuild import RebuildResult, rebuild_run
from mtpquant.report.audit.state import Audit, load_receipts


@dataclass(frozen=True)
class VerifyReport:
    root: Path
    artifacts: dict[str, str]  # file -> sha256, every file SHA256SUMS lists
    checks: tuple[str, ...]  # one line per check that held
    notes: tuple[str, ...] = ()  # what could not be checked here, and why
    rebuilt: tuple[RebuildResult, ...] = field(default=())

    def to_json(self) -> dict:
        """The report as JSON (what `verify --json` prints)."""
        return {"run_dir": str(self.root), "ok": True, "artifacts": self.artifacts, "checks": list(self.checks),
                "notes": list(self.notes), "rebuild": [r.to_json() for r in self.rebuilt]}


def verify_run(run_dir: Path, rebuild: bool = False, toolchain=None, source: Path | None = None,
               progress: ProgressFn | None = None, allow_failed_gates: bool = False) -> VerifyReport:
    """Check a run directory; return what held, or raise VerifyError naming the first file and value that differ."""
    progress = progress or no_progress
    root = Path(run_dir).resolve()
    if not (root / "receipts").is_dir():
        raise UsageError(f"{root}: not a run directory (no receipts/)", "give the folder `mtpquant build` wrote")
    run = RunDir(root)
    audit = Audit(run, progress)
    sums = check_sums(audit)
    receipts = load_receipts(run)
    src = receipts.get("source.json")
    if src is None:
        raise VerifyError("receipts/source.json is missing", "the run is incomplete; rerun `mtpquant build`")
    quantize = {n[len("quantize-"):-len(".json")]: r for n, r in receipts.items() if n.startswith("quantize-")}
    check_quantize_receipts(audit, sums, receipts, quantize)
    check_manifest(audit, receipts, quantize)
    check_headers(audit, src, quantize)
    check_measurements(audit, receipts, quantize)
    check_head_studies(audit, receipts, quantize)
    check_gates(audit, receipts, allow_failed_gates)
    check_card(audit, receipts, src, quantize)
    rebuilt: tuple[RebuildResult, ...] = ()
    if rebuild:
        if toolchain is None:
            raise UsageError("--rebuild needs the llama.cpp toolchain", "pass --llama-cpp DIR or install it")
        rebuilt = tuple(rebuild_run(run, toolchain, source=source, progress=progress, receipts=receipts))
        audit.checks += [f"rebuild {r.variant}: {r.line()}" for r in rebuilt]
    return VerifyReport(root, sums, tuple(audit.checks), tuple(audit.notes), rebuilt)
