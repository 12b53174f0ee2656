"""The draft-head study: its recipe field, the paired loss and the choice on hand-made numbers, and the study on the
project's designed models with the real llama-quantize and llama-server, through `build`, the card and `verify`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtpquant import recipe as rcp
from mtpquant import synth
from mtpquant.core.errors import PlanError, RecipeError, UsageError, VerifyError
from mtpquant.core.procs import run_tool
from mtpquant.measure import draft_head as dh
from mtpquant.measure.smoke import acceptance
from mtpquant.measure.smoke.suite import load_suite, select_prompts
from mtpquant.pipeline import build as pipeline
from mtpquant.recipe.schema import DraftHeadSpec
from mtpquant.report.audit.verify import verify_run

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo-draft-head.yaml"
EH = "blk.2.nextn.eh_proj.weight"
BASE = "name: t\nsource: {synthetic: {}}\n"


def per_prompt(counts: list[tuple[int, int]]) -> list[dict]:
    """Hand-made per-prompt records: (accepted, drafted) each."""
    return [{"prompt": f"p{i}", "draft_n": d, "draft_n_accepted": a} for i, (a, d) in enumerate(counts)]


def cand(typ: str, size: int, value: float, ci: list[float]) -> dict:
    return {"type": typ, "bytes": size, "loss_pp": {"value": value, "ci95": ci}}


# --- the paired loss and the choice, on hand-made numbers -------------------------------------------------------------

def test_identical_heads_lose_nothing():
    ref = per_prompt([(21, 27), (18, 27), (24, 30)])
    assert dh.paired_loss(ref, ref) == {"value": 0.0, "ci95": [0.0, 0.0], "prompts": 3}


def test_a_head_that_accepts_less_has_a_positive_loss():
    ref = per_prompt([(30, 40), (20, 40), (35, 40), (25, 40)])
    worse = per_prompt([(20, 40), (10, 40), (30, 40), (20, 40)])
    loss = dh.paired_loss(ref, worse)
    assert loss["value"] == 100 * (110 / 160 - 80 / 160)
    lo, hi = loss["ci95"]
    assert 0 < lo <= loss["value"] <= hi
    assert dh.paired_loss(worse, ref)["value"] == -loss["value"]
    assert dh.paired_loss(ref, worse) == loss  # a fixed bootstrap seed: the same interval every time


def test_the_loss_pairs_prompts():
    with pytest.raises(UsageError) as ei:
        dh.paired_loss(per_prompt([(1, 2), (1, 2)]), per_prompt([(1, 2)]))
    assert ei.value.one_line() == "paired loss needs the same prompts in the same order for both heads"


def test_the_smallest_candidate_within_tolerance_is_chosen():
    choice = dh.choose([cand("Q4_K", 100, 5.0, [3.0, 7.0]), cand("Q5_K", 120, 0.2, [-0.5, 0.9]),
                        cand("Q6_K", 140, 0.0, [0.0, 0.0])], 1.0, "Q8_0")
    assert (choice["outcome"], choice["type"], choice["qualifying"], choice["tied"]) == \
        ("chosen", "Q5_K", ["Q5_K", "Q6_K"], [])
    assert choice["why"] == ("Q5_K is the smallest candidate whose loss is within 1 pp at 95% confidence "
                             "(upper bound 0.9 pp); Q4_K did not qualify")


def test_an_upper_bound_over_tolerance_does_not_qualify_even_with_a_small_point_loss():
    choice = dh.choose([cand("Q4_K", 100, 0.4, [-0.8, 1.6]), cand("Q8_0", 200, 0.0, [0.0, 0.0])], 1.0, "Q8_0")
    assert choice["type"] == "Q8_0" and choice["qualifying"] == ["Q8_0"]


def test_none_qualifying_keeps_the_reference_type():
    choice = dh.choose([cand("Q3_K", 80, 40.0, [38.0, 42.0]), cand("Q4_K", 100, 30.0, [29.0, 31.0])], 1.0, "BF16")
    assert (choice["outcome"], choice["type"], choice["qualifying"]) == ("none", "BF16", [])
    assert choice["why"] == "No candidate's loss has a 95% upper bound at or below 1 pp (Q3_K, Q4_K measured)"


def test_equal_sizes_are_a_tie_won_by_the_lower_upper_bound():
    choice = dh.choose([cand("Q4_0", 100, 0.3, [0.0, 0.8]), cand("Q4_K", 100, 0.1, [0.0, 0.4]),
                        cand("Q8_0", 200, 0.0, [0.0, 0.0])], 1.0, "Q8_0")
    assert (choice["outcome"], choice["type"], choice["tied"]) == ("tie", "Q4_K", ["Q4_0", "Q4_K"])
    assert choice["why"].endswith("; Q4_0, Q4_K have the same size (100 bytes): Q4_K has the lowest upper bound "
                                  "(the first given, when equal)")


# --- the recipe field -------------------------------------------------------------------------------------------------

def load_text(tmp_path: Path, text: str) -> rcp.Recipe:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return rcp.load(p)


def test_draft_head_defaults_and_per_variant_settings(tmp_path):
    r = load_text(tmp_path, BASE + "draft_head: {tolerance_pp: 2}\nvariants: [{type: Q4_K_M}, "
                  "{type: IQ4_XS, draft_head: {scope: nextn_block}}, {type: Q5_K_M, draft_head: false}]\n")
    assert r.draft_head == DraftHeadSpec(tolerance_pp=2.0)
    assert [v.draft_head for v in r.variants] == [DraftHeadSpec(tolerance_pp=2.0),
                                                  DraftHeadSpec(tolerance_pp=2.0, scope="nextn_block"), None]
    assert DraftHeadSpec().candidates == ("Q4_K", "Q5_K", "Q6_K", "Q8_0")
    assert load_text(tmp_path, BASE + "variants: [{type: Q4_K_M}]\n").variants[0].draft_head is None
    only = load_text(tmp_path, BASE + "variants: [{type: Q4_K_M, draft_head: {reference: source}}]\n")
    assert only.draft_head is None and only.variants[0].draft_head == DraftHeadSpec(reference="source")


@pytest.mark.parametrize("snippet, expected", [
    ("draft_head: {candidates: [Q4_K, Q4K]}",
     ["draft_head.candidates[1]: unknown tensor type 'Q4K' (did you mean Q4_K? valid: " + ", ".join(rcp.TENSOR_TYPES)
      + ")"]),
    ("draft_head: {candidates: []}",
     ["draft_head.candidates: expected a non-empty list of tensor types, got a list (e.g. [Q4_K, Q5_K, Q6_K, Q8_0])"]),
    ("draft_head: {candidates: [Q4_K, q4_k]}", ["draft_head.candidates: has duplicates"]),
    ("draft_head: {scope: nextn}",
     ["draft_head.scope: unknown draft-head scope 'nextn' (did you mean nextn_block? valid: eh_proj, nextn_block)"]),
    ("draft_head: {reference: BF16}", ["draft_head.reference: unknown reference head 'BF16' (valid: Q8_0, source)"]),
    ("draft_head: {tolerance_pp: -1}",
     ["draft_head.tolerance_pp: -1 is out of range (use a value between 0.0 and 100.0)"]),
    ("draft_head: {toleranse_pp: 1}", ["draft_head.toleranse_pp: unknown field (did you mean 'tolerance_pp'?)"]),
    ("draft_head: {prompts: 1}", ["draft_head.prompts: 1 is out of range (use a value from 2 to 100000)"]),
    ("draft_head: {k: 8, max_tokens: 8}",
     ["draft_head.max_tokens: 8 tokens leave no room for drafts of k=8 (give more tokens than the draft length)"]),
    ("draft_head: {unweighted: 'yes'}", ["draft_head.unweighted: expected true or false, got a string 'yes'"]),
    ("draft_head: yes", ["draft_head: expected a mapping, got a boolean"]),
])
def test_bad_draft_head_fields(tmp_path, snippet, expected):
    with pytest.raises(RecipeError) as ei:
        load_text(tmp_path, BASE + snippet + "\nvariants: [{type: Q4_K_M}]\n")
    assert ei.value.problems == [f"{tmp_path / 'r.yaml'}: {e}" for e in expected]


def test_bad_per_variant_draft_head_names_the_variant(tmp_path):
    with pytest.raises(RecipeError) as ei:
        load_text(tmp_path, BASE + "variants: [{type: Q4_K_M}, {type: IQ4_XS, draft_head: {slots: 0}}]\n")
    want = "variants[1].draft_head.slots: 0 is out of range (use a value from 1 to 256)"
    assert ei.value.problems == [f"{tmp_path / 'r.yaml'}: {want}"]


# --- the measurement on a designed model ----------------------------------------------------------------------------

@pytest.mark.slow
def test_parallel_slots_count_what_one_slot_counts(tmp_path, toolchain):
    """Greedy counts do not depend on timing: four slots answering at once give each prompt the counts one slot
    gives it, and the Q8_0 head drafts exactly as the design predicts."""
    spec = synth.SynthSpec(seed=7, designed=synth.Designed(alpha=0.75, k=3, margin=0.01))
    src = synth.write_gguf(tmp_path / "m.gguf", spec)[0]
    heads = {}
    for typ in ("q4_k", "q8_0"):
        heads[typ] = tmp_path / f"head-{typ}.gguf"
        run_tool([toolchain.tool("llama-quantize"), "--tensor-type", rf"nextn\.eh_proj={typ}", src, heads[typ],
                  "Q4_K_M"], log_path=tmp_path / "quantize.log")
    prompts = select_prompts(load_suite(), 6)

    def counts(path: Path, slots: int) -> list[tuple[int, int]]:
        m = acceptance.measure_head(toolchain, path, prompts, acceptance.Settings(3, 32, slots, threads=1),
                            tmp_path / f"{path.stem}-{slots}.log")
        assert m["slots_speculative"] == [True] * slots
        return [(r["draft_n"], r["draft_n_accepted"]) for r in m["per_prompt"]]

    low = counts(heads["q4_k"], 4)
    assert low == counts(heads["q4_k"], 1)
    assert counts(heads["q8_0"], 4) == [synth.designed_draft_counts(spec, 3, 32)] * len(prompts)
    assert sum(a for _, a in low) < synth.designed_draft_counts(spec, 3, 32)[1] * len(prompts)


# --- the study through `build` ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory, toolchain):
    """recipes/demo-draft-head.yaml built once: small-margin designed head, imatrix with NextN statistics."""
    out = tmp_path_factory.mktemp("demo-draft-head") / "out"
    pipeline.build(rcp.load(DEMO), out, toolchain)
    return out


def study(out: Path, tag: str) -> dict:
    return json.loads((out / "receipts" / f"draft-head-{tag}.json").read_text())


@pytest.mark.slow
def test_small_margin_rejects_the_low_bit_heads(demo):
    out = demo
    r = study(out, "Q4_K_M")
    losses = {c["type"]: c["loss_pp"]["value"] for c in r["candidates"]}
    assert r["choice"]["outcome"] == "chosen" and r["choice"]["type"] == "Q5_K"
    assert losses["Q3_K"] > r["settings"]["tolerance_pp"] and losses["Q4_K"] > r["settings"]["tolerance_pp"]
    assert losses["Q5_K"] == losses["Q6_K"] == losses["Q8_0"] == 0.0
    assert r["imatrix"]["head_path"] == "collected"
    # what was measured is what ships: the variant's own quantize step made the chosen candidate's bytes
    q = json.loads((out / "receipts" / "quantize-Q4_K_M.json").read_text())
    assert q["nextn_types"][EH] == "Q5_K" and q["sha256"] == r["choice"]["sha256"]
    assert q["overrides"] == [r"^blk\.2\.nextn\.eh_proj\.weight$=q5_k"]
    # candidates are removed once measured; what stays is the imatrix without the head's statistics
    assert [p.name for p in (out / "work" / "draft-head").glob("*.gguf")] == ["demo-draft-head.imatrix.no-head.gguf"]
    # every candidate wrote the same text as the reference: only the head differs
    assert all(c["same_output_as_reference"] == len(r["measurement"]["prompts"]) for c in r["candidates"])
    # only low-bit candidates: none qualifies and the head keeps the reference type
    iq = study(out, "IQ4_XS")
    assert (iq["choice"]["outcome"], iq["choice"]["type"]) == ("none", "Q8_0")
    assert all(c["loss_pp"]["value"] > 0 for c in iq["candidates"])
    assert json.loads((out / "receipts" / "quantize-IQ4_XS.json").read_text())["nextn_types"][EH] == "Q8_0"


@pytest.mark.slow
def test_the_study_compares_a_calibrated_head_with_an_unweighted_one(demo):
    out = demo
    u = study(out, "Q4_K_M")["unweighted"]
    assert u["imatrix"]["without"] == [EH] and [a["type"] for a in u["arms"]] == ["Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                                                                   "Q8_0"]
    assert all(a["head_path"] == "unweighted" for a in u["arms"])
    # Q8_0 ignores importance data: with or without it, the same acceptance
    q8 = next(a for a in u["arms"] if a["type"] == "Q8_0")
    assert q8["vs_calibrated_pp"]["value"] == 0.0


@pytest.mark.slow
def test_the_card_renders_the_study_and_verify_re_derives_it(demo):
    out = demo
    text = (out / "README.md").read_text()
    assert "### Draft-head precision: Q4_K_M" in text and "### Draft-head precision: IQ4_XS" in text
    assert "Chosen: **Q5_K**." in text
    assert "No candidate qualified; the head keeps the reference type: **Q8_0**." in text
    assert "| Q8_0 (reference, not a candidate) |" in text
    report = verify_run(out)
    assert any(line.startswith("draft head Q4_K_M: Q5_K (chosen) re-derives from the per-prompt counts of 5 "
                               "candidate(s) on 6 prompt(s)") for line in report.checks)


@pytest.mark.slow
def test_verify_refuses_an_edited_study(demo, tmp_path):
    out = demo
    receipt = out / "receipts" / "draft-head-Q4_K_M.json"
    original = receipt.read_text()
    data = json.loads(original)
    data["candidates"][1]["qualifies"] = True
    try:
        receipt.write_text(json.dumps(data))
        with pytest.raises(VerifyError) as ei:
            verify_run(out)
    finally:
        receipt.write_text(original)
    assert ei.value.one_line() == ("receipts/draft-head-Q4_K_M.json: candidates[1].qualifies is true, its own counts "
                                   "give false (the receipt was edited or written by another version of mtpquant's "
                                   "draft-head study)")


@pytest.mark.slow
def test_an_unchanged_study_is_skipped(demo, toolchain):
    out = demo
    logs = {p.name: p.stat().st_mtime_ns for p in (out / "logs").glob("draft-head-*")}
    again = pipeline.build(rcp.load(DEMO), out, toolchain)
    assert again.extra["draft-head:Q4_K_M"]["skipped"] and again.extra["draft-head:IQ4_XS"]["skipped"]
    assert all(v.skipped for v in again.variants)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "logs").glob("draft-head-*")} == logs


@pytest.mark.slow
def test_large_margin_picks_the_smallest_head_against_the_source(tmp_path, toolchain):
    r = load_text(tmp_path, "name: big\nsource:\n  synthetic: {seed: 7, designed: {alpha: 0.75, k: 3, margin: 0.5}}\n"
                  "variants: [{type: Q4_K_M}]\ndraft_head: {candidates: [Q4_K, Q6_K], reference: source, prompts: 4, "
                  "max_tokens: 24, threads: 1}\n")
    pipeline.build(r, tmp_path / "out", toolchain)
    s = study(tmp_path / "out", "Q4_K_M")
    assert s["reference"]["type"] == "BF16" and s["reference"]["head_types"] == {EH: "BF16"}
    assert [c["loss_pp"]["value"] for c in s["candidates"]] == [0.0, 0.0]
    assert (s["choice"]["outcome"], s["choice"]["type"]) == ("chosen", "Q4_K")


@pytest.mark.slow
def test_a_candidate_llama_quantize_cannot_make_fails_before_any_is_made(tmp_path, toolchain):
    r = load_text(tmp_path, "name: bad\nsource: {synthetic: {seed: 7}}\nvariants: [{type: Q4_K_M}]\n"
                  "draft_head: {candidates: [Q4_K, IQ3_XXS]}\n")
    out = tmp_path / "out"
    with pytest.raises(PlanError) as ei:
        pipeline.build(r, out, toolchain)
    assert ei.value.one_line() == (
        "variant Q4_K_M.head-IQ3_XXS: 1 tensor(s) planned as IQ3_XXS need importance data but there is no imatrix: "
        f"{EH} (collect them (imatrix.compute.nextn: true, for the NextN block) or set imatrix.uncovered: pin (with "
        "imatrix.pin_type) to give them an imatrix-free type)")
    assert not list(out.glob("*.gguf")) and not list((out / "work" / "draft-head").glob("*.gguf"))
    assert not list((out / "receipts").glob("draft-head-*")) and not list((out / "logs").glob("draft-head-*"))
