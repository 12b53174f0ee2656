"""Smoke every model of a run directory: the recipe's settings, one receipt per variant, then the gates."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from mtpquant import recipe as rcp
from mtpquant.core.errors import GateError
from mtpquant.core.files import sha256_json
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.receipts import SmokeReceipt
from mtpquant.core.rundir import Artifact, RunDir
from mtpquant.core.steps import Step, run_step
from mtpquant.llamacpp.toolchain import Toolchain
from mtpquant.measure.smoke.gates import check_gates, gate_report, gates_for
from mtpquant.measure.smoke.run import smoke_model, spec_json
from mtpquant.measure.smoke.suite import Prompt
from mtpquant.recipe import SmokeSpec


def run_spec(run: RunDir) -> tuple[SmokeSpec, str]:
    """The smoke settings of the recipe that built the run (with its gates), or the defaults."""
    recipe_path = run.read_manifest().get("recipe")
    if not recipe_path:
        return SmokeSpec(enabled=True), "defaults"
    if not Path(recipe_path).is_file():
        return SmokeSpec(enabled=True), f"defaults (the run's recipe {recipe_path} is gone: no gates)"

    # A recipe that no longer validates is an error, not a reason to drop its gates silently.
    return dataclasses.replace(rcp.load(Path(recipe_path)).smoke, enabled=True), f"recipe {recipe_path}"


def smoke_key(art: Artifact, spec: SmokeSpec, tc: Toolchain, extra: dict) -> str:
    """What decides a smoke receipt: the model's bytes, the settings, the method version and the llama-server."""
    server = (tc.describe().get("binaries") or {}).get("llama-server", {}).get("sha256")
    return sha256_json({"model": art.sha256, "spec": spec_json(spec), "version": SmokeReceipt.VERSION,
                        "llama_server": server, "extra": extra})


def smoke_run(tc: Toolchain, run: RunDir, spec: SmokeSpec, progress: ProgressFn = no_progress,
              suite: Sequence[Prompt] | None = None, artifacts: Sequence[Artifact] | None = None,
              force: bool = False, **kwargs) -> dict[str, SmokeReceipt]:
    """Smoke every model of a run directory into receipts/smoke-<variant>.json (unchanged ones skipped), then
    enforce the gates: every receipt is written before a GateError names all variants below a gate."""
    run.ensure()
    results: dict[str, SmokeReceipt] = {}
    failures: list[GateError] = []
    extra = {k: [str(a) for a in v] for k, v in kwargs.items() if k in ("server_args", "mtp_args")}
    for art in artifacts if artifacts is not None else run.artifacts():
        gates = gates_for(spec, art.variant)
        key = smoke_key(art, spec, tc, extra)

        def measure(art: Artifact = art, gates=gates, key: str = key) -> SmokeReceipt:
            result = smoke_model(tc, art.path, spec, run.logs, progress, suite, log_prefix=f"smoke-{art.variant}",
                                 model_sha256=art.sha256, **kwargs)
            result["gates"] = gate_report(result, gates)
            return SmokeReceipt(input_key=key, **result)

        receipt = run_step(run, Step(f"smoke:{art.variant}", SmokeReceipt, art.variant, key, measure), force).receipt
        results[art.variant] = receipt
        try:
            check_gates(receipt.body(), gates, art.variant)
        except GateError as exc:
            failures.append(exc)
    if failures:
        raise GateError("; ".join(f.message for f in failures), failures[0].hint if len(failures) == 1
                        else "the figures are in receipts/smoke-<variant>.json")
    return results
