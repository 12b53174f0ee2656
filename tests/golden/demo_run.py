"""Run directories for the card and verify tests, and for the golden card: made by mtpquant's own pipeline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mtpquant import recipe as rcp
from mtpquant.core.rundir import RunDir
from mtpquant.pipeline import build as pipeline
from mtpquant.recipe import SmokeSpec
from mtpquant.report import card

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "imatrix" / "codemath-chat-v1.txt"

# demo-tiny's shape at test size: a designed draft head (so acceptance is real), an imatrix with NextN statistics,
# eh_proj kept at Q8_0, two variants. Smoke is not in the recipe: the tests run a small one on one variant.
TEST_RECIPE = f"""\
name: card-test
source:
  synthetic: {{arch: qwen35moe, seed: 11, designed: {{alpha: 0.75, k: 3}}}}
expect: {{arch: qwen35moe, main_layers: 2, nextn_layers: 1}}
mtp: {{require: true}}
imatrix:
  compute: {{corpus: {CORPUS}, chunks: 4, ctx: 128, nextn: true}}
policy:
  - {{block: nextn, match: 'nextn\\.eh_proj\\.weight$', type: Q8_0}}
variants:
  - {{type: Q4_K_M}}
  - {{type: Q8_0}}
card:
  license: apache-2.0
  quantized_by: mtpquant-tests
"""
TEST_SMOKE = SmokeSpec(enabled=True, seeds=(42,), draft_n_max=(2, 3), max_tokens=16, prompts=3, raw=True)


def build_run(folder: Path, toolchain, recipe_text: str = TEST_RECIPE) -> tuple[rcp.Recipe, RunDir]:
    """Build the recipe into folder/out and write its card, keeping no measurement receipts (build writes the fit
    estimate; it is removed so the card of a run without measurements is tested too)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(recipe_text)
    recipe = rcp.load(path)
    out = folder / "out"
    pipeline.build(recipe, out, toolchain)
    run = RunDir(out.resolve())
    for step in ("fit", "eval", "smoke"):
        for p in run.receipts.glob(f"{step}-*.json"):
            p.unlink()
    card.write_card(run, recipe)
    return recipe, run


def measure(run: RunDir, recipe: rcp.Recipe, toolchain, smoke_variants: tuple[str, ...] | None = ("Q4_K_M",),
            smoke: SmokeSpec = TEST_SMOKE) -> None:
    """Fit and eval every variant, smoke the given ones (None: all), then write the card again."""
    from mtpquant.measure import fit
    from mtpquant.measure import kld as ev
    from mtpquant.measure import smoke as sm

    fit.fit_run(run.root)
    ev.eval_run(toolchain, run.root)
    artifacts = [a for a in run.artifacts() if smoke_variants is None or a.variant in smoke_variants]
    sm.smoke_run(toolchain, run, dataclasses.replace(smoke, enabled=True), artifacts=artifacts,
                 spec_source="tests")
    card.write_card(run, recipe)
