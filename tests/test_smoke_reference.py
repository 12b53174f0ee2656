"""smoke.reference: what quantizing the draft head cost, as each variant's acceptance minus a reference head's on the
same prompts; a failed gate as part of the run's state (manifest, verify, publish --dry-run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mtpquant import recipe as rcp
from mtpquant import synth
from mtpquant.cli import main
from mtpquant.core.errors import GateError
from mtpquant.pipeline import build as pipeline
from mtpquant.report import audit

RECIPE = """\
name: ref
source: {{synthetic: {{arch: qwen35moe, seed: 7, designed: {{alpha: 0.75, k: 3, margin: 0.01}}}}}}
policy:
  - {{block: nextn, match: 'nextn\\.eh_proj\\.weight$', type: Q8_0}}
variants:
  - {{type: Q4_K_M, label: Q8HEAD}}
  - {{type: Q4_K_M, label: SAME}}
  - {{type: Q4_K_M, label: Q4HEAD, policy: [{{block: nextn, match: 'nextn\\.eh_proj\\.weight$', type: Q4_K}}]}}
smoke:
  seeds: [42]
  draft_n_max: [3]
  prompts: 10
  max_tokens: 32
  threads: 1
  ctx: 1024
  reference: Q8HEAD
  gate: {{min_acceptance: {gate}, k: 3}}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory, toolchain) -> Path:
    d = tmp_path_factory.mktemp("reference")
    (d / "r.yaml").write_text(RECIPE.format(gate=0.7))
    with pytest.raises(GateError) as ei:  # the Q4_K head drafts worse: below the gate
        pipeline.build(rcp.load(d / "r.yaml"), d / "out", toolchain)
    assert ei.value.message.startswith("variant Q4HEAD: MTP acceptance ")
    return d / "out"


def smoke(out: Path, tag: str) -> dict:
    return json.loads((out / "receipts" / f"smoke-{tag}.json").read_text())


def test_identical_files_differ_by_nothing_and_a_q4_head_clearly_loses(built):
    designed = synth.designed_expected_acceptance(
        synth.SynthSpec(designed=synth.Designed(alpha=0.75, k=3, margin=0.01)), 3, 32)
    assert smoke(built, "Q8HEAD")["reference"] is None  # the reference itself
    same = smoke(built, "SAME")["reference"]
    assert same["reference"] == "Q8HEAD" and same["k"] == 3 and same["prompts"] == 10
    assert same["difference_pp"] == {"value": 0.0, "ci95": None, "n": 10, "note": "identical on all 10 prompts"}
    low = smoke(built, "Q4HEAD")["reference"]["difference_pp"]
    assert low["value"] < -5.0 and (low["ci95"] is None or low["ci95"][1] < 0)
    assert smoke(built, "Q8HEAD")["results"]["chat"]["k"]["3"]["overall"]["acceptance"]["value"] == pytest.approx(
        designed, abs=1e-4)


def test_a_failed_gate_is_the_runs_state(built, tmp_path):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["gates"]["Q4HEAD"] == {"passed": False, "k": 3, "failed": ["min_acceptance"]}
    assert manifest["gates"]["Q8HEAD"]["passed"] is True
    card = (built / "README.md").read_text()
    assert "Gate FAILED: min_acceptance at k=3." in card and "`min_acceptance` 0.7: FAILED" in card
    with pytest.raises(GateError) as ei:
        audit.verify_run(built)
    assert ei.value.message.startswith("variant Q4HEAD: min_acceptance 0.7 FAILED (acceptance ")
    report = audit.verify_run(built, allow_failed_gates=True)
    assert any(n.startswith("smoke gates FAILED (allowed by --allow-failed-gates)") for n in report.notes)
    res = CliRunner().invoke(main, ["verify", str(built)])
    assert res.exit_code == 1 and res.stderr.startswith("error: variant Q4HEAD: min_acceptance 0.7 FAILED")
    assert CliRunner().invoke(main, ["verify", str(built), "--allow-failed-gates"]).exit_code == 0
    res = CliRunner().invoke(main, ["publish", str(built), "--repo", "someone/ref-GGUF", "--dry-run"],
                             env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"})
    assert res.exit_code == 1 and res.stderr.startswith("error: not published: variant Q4HEAD: min_acceptance 0.7")
