"""Smoke every model of a run directory: the recipe's settings, one receipt per variant, then the gates."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from mtpquant import recipe as rcp
from mtpquant.core.errors import GateError, UsageError
from mtpquant.core.files import sha256_json
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.receipts import SmokeReceipt, SourceReceipt
from mtpquant.core.rundir import Artifact, RunDir
from mtpquant.core.steps import Step, run_step
from mtpquant.llamacpp.toolchain import Toolchain
from mtpquant.measure.kld import run_source
from mtpquant.measure.smoke.gates import check_gates, gate_k, gate_report, gates_for
from mtpquant.measure.smoke.reference import SOURCE, counts_from_runs, difference, measure_source
from mtpquant.measure.smoke.run import smoke_model, spec_json
from mtpquant.measure.smoke.suite import Prompt, select_prompts, suite_info
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
    server = tc.recorded_sha256("llama-server")
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
    arts = _reference_first(list(artifacts if artifacts is not None else run.artifacts()), spec.reference)
    reference = _Reference(tc, run, spec, suite, results)
    for art in arts:
        gates = gates_for(spec, art.variant)
        key = smoke_key(art, spec, tc, {**extra, "reference": reference.key(art.variant)})

        def measure(art: Artifact = art, gates=gates, key: str = key) -> SmokeReceipt:
            result = smoke_model(tc, art.path, spec, run.logs, progress, suite, log_prefix=f"smoke-{art.variant}",
                                 model_sha256=art.sha256, **kwargs)
            result["gates"] = gate_report(result, gates)
            result["reference"] = reference.compare(art.variant, result, gate_k(result, gates))
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


def _reference_first(arts: list[Artifact], reference: str | None) -> list[Artifact]:
    """A variant named as the reference is measured before the others compare against it."""
    return arts if reference in (None, SOURCE) else sorted(arts, key=lambda a: a.variant != reference)


class _Reference:
    """The reference head's per-prompt counts, measured (the source) or read (a variant) once, when first needed."""

    def __init__(self, tc: Toolchain, run: RunDir, spec: SmokeSpec, suite, results: dict):
        self.tc, self.run, self.spec, self.suite, self.results = tc, run, spec, suite, results
        self._source: dict | None = None

    def key(self, variant: str) -> str | None:
        name = self.spec.reference
        if name is None or name == variant:
            return None
        if name == SOURCE:
            source = self.run.read(SourceReceipt)
            return f"source:{source.sha256 if source else None}"
        return f"variant:{self._variant(name).input_key}"

    def _variant(self, name: str) -> SmokeReceipt:
        """The reference variant's smoke receipt: measured in this call, or earlier in this run directory."""
        found = self.results.get(name) or self.run.read(SmokeReceipt, name, stale_ok=True)
        if found is None:
            raise UsageError(f"smoke.reference: {name!r} is neither 'source' nor a smoked variant of this run",
                             "name 'source' or a variant tag listed before the variants compared with it")
        return found

    def compare(self, variant: str, result: dict, k: int | None) -> dict | None:
        name = self.spec.reference
        if name is None or name == variant or k is None:
            return None
        counts = counts_from_runs(result["runs"], k)
        if name == SOURCE:
            ref = self._source_counts(k)
        else:
            ref = counts_from_runs(self._variant(name).runs, k)
        return difference(counts, ref, name, k)

    def _source_counts(self, k: int) -> dict:
        if self._source is None:
            path, _ = run_source(self.run)
            prompts = select_prompts(suite_info(self.suite)[1], self.spec.prompts)
            self._source = measure_source(self.tc, path, prompts, k, self.spec.max_tokens,
                                          self.run.logs / "smoke-reference-source.log", self.spec.threads,
                                          self.spec.gpu_layers)
        return self._source
