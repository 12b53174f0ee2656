"""Regenerate the golden demo card (tests/golden/demo-card.md) that tests/test_card.py compares against.

    python tests/golden/regen.py          re-render demo-card.md from the stored receipts in demo-run/
                                          (after a deliberate change to mtpquant/report/card/ or the template)
    python tests/golden/regen.py --run    build recipes/demo-tiny.yaml from scratch (its smoke step included), add
                                          fit and eval, store the new receipts in demo-run/ and render the card

demo-run/ holds only what the card is rendered from: receipts/*.json, manifest.json and SHA256SUMS (no GGUFs).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUN = HERE / "demo-run"
CARD = HERE / "demo-card.md"
RECIPE = REPO / "recipes" / "demo-tiny.yaml"


def render() -> None:
    from mtpquant.core.rundir import RunDir
    from mtpquant.report.card import render_card

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "demo"
        shutil.copytree(RUN, copy)
        CARD.write_text(render_card(RunDir(copy)), encoding="utf-8")
    print(f"wrote {CARD.relative_to(REPO)}")


def run_demo(keep: Path | None) -> None:
    from mtpquant import recipe as rcp
    from mtpquant.cli.app import Bars
    from mtpquant.core.errors import GateError
    from mtpquant.core.rundir import RunDir
    from mtpquant.llamacpp.toolchain import locate
    from mtpquant.measure import fit, smoke
    from mtpquant.measure import kld as ev
    from mtpquant.pipeline import build as pipeline
    from mtpquant.report import card

    recipe = rcp.load(RECIPE)
    tc = locate()
    out = keep or Path(tempfile.mkdtemp(prefix="mtpquant-demo-"))
    bars = Bars(True)
    try:
        try:
            pipeline.build(recipe, out, tc, progress=bars)
        except GateError as exc:  # receipts, card and manifest are written; the card shows the gate
            print(f"note: {exc.one_line()}", file=sys.stderr)
        run = RunDir(out.resolve())
        if recipe.smoke.enabled and not list(run.receipts.glob("smoke-*.json")):
            try:
                smoke.smoke_run(tc, run, dataclasses.replace(recipe.smoke, enabled=True), bars,
                                spec_source=f"recipe {RECIPE.name}")
            except GateError as exc:  # the receipts are written; the card shows the gate
                print(f"note: {exc.one_line()}", file=sys.stderr)
        if not list(run.receipts.glob("fit-*.json")):
            fit.fit_run(run.root)
        if not list(run.receipts.glob("eval-*.json")):
            ev.eval_run(tc, run.root, progress=bars)
        card.write_card(run, recipe)
    finally:
        bars.close()
    if RUN.exists():
        shutil.rmtree(RUN)
    (RUN / "receipts").mkdir(parents=True)
    for p in sorted(run.receipts.glob("*.json")):
        shutil.copy2(p, RUN / "receipts" / p.name)
    for name in ("manifest.json", "SHA256SUMS"):
        shutil.copy2(run.root / name, RUN / name)
    shutil.copy2(run.root / "README.md", CARD)
    print(f"built {run.root}; stored its receipts in {RUN.relative_to(REPO)}")
    render()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="store_true", help="build the demo run again instead of re-rendering")
    ap.add_argument("--keep", type=Path, default=None, help="with --run: build into this folder and keep it")
    args = ap.parse_args()
    if args.run:
        run_demo(args.keep)
    else:
        render()


if __name__ == "__main__":
    main()
