"""Smoke run: statistics on known arrays, the prompt suite, real llama-server runs on synthetic models, gates, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import receipt_json

from mtpquant import synth
from mtpquant.cli.cmd_smoke import smoke as smoke_cmd
from mtpquant.cli.cmd_smoke import table
from mtpquant.core.errors import GateError, UsageError
from mtpquant.core.rundir import RunDir
from mtpquant.measure import smoke as sm
from mtpquant.measure.smoke import stats, suite
from mtpquant.recipe import Gates, SmokeSpec

# Designed acceptance: every chat request enters the designed cycle at the same token, so the server's counters
# equal synth's replay exactly; over a finite run (32 tokens) that value sits within TOLERANCE of the designed
# long-run fraction alpha (the first token is never drafted and the last drafts are cut by the token budget).
ALPHA = 0.75
K = 3
MAX_TOKENS = 32
TOLERANCE = 0.03

DESIGNED = synth.SynthSpec(name="designed", designed=synth.Designed(alpha=ALPHA, k=K))


def small_suite(n: int = 2) -> list[suite.Prompt]:
    """Prompts whose raw text ends right on a designed-cycle character, so raw requests enter the cycle at
    different positions (chat requests always enter at the same one: the template ends in a newline)."""
    out = []
    chars = iter(synth.CYCLE_CHARS[1:])
    for cat in suite.CATEGORIES:
        for i in range(n):
            ch = next(chars) if cat != "general" else synth.CYCLE_CHARS[26 + i]  # some upper-case starts too
            out.append(suite.Prompt(f"{cat}-{i}", cat, (("user", f"Tell me about {cat} topic {i}."),),
                                 f"Sequence {cat} {i}:{ch}"))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("smoke-models")
    return {"designed": synth.write_gguf(d / "designed-BF16.gguf", DESIGNED)[0],
            "random": synth.write_gguf(d / "random-BF16.gguf", synth.SynthSpec())[0]}


# ----------------------------------------------------------------------------------------------- statistics

def test_bootstrap_constant_array_has_a_zero_width_ci():
    assert stats.bootstrap_ci(stats.mean, [np.full(30, 2.5)]) == (2.5, 2.5)


def test_bootstrap_mean_of_a_fair_coin():
    x = np.array([0.0, 1.0] * 50)  # mean 0.5, standard error 0.05: 95% CI about 0.40-0.60
    lo, hi = stats.bootstrap_ci(stats.mean, [x])
    assert lo == pytest.approx(0.40, abs=0.02) and hi == pytest.approx(0.60, abs=0.02)
    assert stats.bootstrap_ci(stats.mean, [x]) == (lo, hi)  # fixed RNG seed: same answer every time
    y = np.linspace(0, 1, 37) ** 2
    assert stats.bootstrap_ci(stats.mean, [y], seed=1) != stats.bootstrap_ci(stats.mean, [y])


def test_identical_units_say_so_instead_of_a_zero_width_interval():
    accepted = np.arange(3, 3 * 13, 3)
    drafted = accepted * 4 // 3  # every unit accepts 3/4
    assert stats.figure(stats.ratio_of_sums, (accepted, drafted)) == {
        "value": 0.75, "ci95": None, "n": 12,
        "note": "identical on all 12 prompts"}


def test_fewer_than_ten_prompts_print_no_interval():
    f = stats.figure(stats.mean, (np.array([1.0, 2.0, 4.0, 3.0, 5.0]),))
    assert f == {"value": 3.0, "ci95": None, "n": 5, "note": "n too small for an interval: 5 prompts"}
    assert stats.figure(stats.mean, (np.arange(10.0),))["ci95"] is not None


def test_ratio_of_sums_without_drafts_is_undefined():
    zeros = np.zeros(12)
    assert stats.bootstrap_ci(stats.ratio_of_sums, [zeros, zeros]) is None
    assert stats.figure(stats.ratio_of_sums, (zeros, zeros)) == {"value": None, "ci95": None, "n": 12,
                                                                 "note": "not defined"}


def test_geometric_mean_speedup():
    assert stats.figure(stats.geomean_ratio, (np.array([2.0, 8.0]), np.array([1.0, 1.0])))["value"] == 4.0
    lo, hi = stats.bootstrap_ci(stats.geomean_ratio, [np.array([2.0, 8.0] * 6), np.ones(12)])
    assert 2.0 <= lo < 4.0 < hi <= 8.0


def test_bca_interval_on_a_known_spread():
    x = np.arange(1000, dtype=float)
    lo, hi = stats.bootstrap_ci(stats.mean, [x], resamples=4000)
    se = x.std() / np.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - 1.96 * se, rel=0.01) and hi == pytest.approx(x.mean() + 1.96 * se, rel=0.01)


def test_bca_moves_the_interval_toward_a_skewed_tail():
    """On a right-skewed sample the BCa interval lies higher than the symmetric normal one (its upper arm is longer)."""
    x = np.random.default_rng(3).exponential(1.0, 60)
    lo, hi = stats.bootstrap_ci(stats.mean, [x])
    m = x.mean()
    assert hi - m > m - lo


# ----------------------------------------------------------------------------------------------- prompt suite

def test_shipped_suite():
    shipped = suite.load_suite()
    assert len(shipped) >= 50
    assert {p.category for p in shipped} == set(suite.CATEGORIES)
    assert len({p.id for p in shipped}) == len(shipped)


def test_selection_interleaves_categories():
    picked = suite.select_prompts(small_suite(3), 4)
    assert [p.id for p in picked] == ["code-0", "math-0", "general-0", "code-1"]
    assert suite.select_prompts(small_suite(1), None) == small_suite(1)


@pytest.mark.parametrize("line, problem", [
    ('{"id": "a", "category": "poetry", "messages": [{"role": "user", "content": "x"}], "prompt": "x"}',
     "category must be one of code, math, general, got 'poetry'"),
    ('{"id": "a", "category": "code", "messages": [], "prompt": "x"}',
     "messages must be a non-empty list of {role: system|user|assistant, content}"),
    ('{"id": "a", "category": "code", "messages": [{"role": "user", "content": "x"}]}',
     "prompt must be a non-empty string"),
    ('{"id": "a", "category": "code", "messages": [{"role": "user", "content": "x"}], "prompt": "x", "n": 1}',
     "unknown field(s) n"),
    ("{not json", "not JSON (Expecting property name enclosed in double quotes)"),
])
def test_bad_suite_lines(tmp_path, line, problem):
    f = tmp_path / "suite.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(UsageError) as exc:
        suite.load_suite(f)
    assert exc.value.message == f"{f}:1: {problem}"


def test_duplicate_ids(tmp_path):
    f = tmp_path / "suite.jsonl"
    line = json.dumps({"id": "a", "category": "code", "messages": [{"role": "user", "content": "x"}], "prompt": "x"})
    f.write_text(line + "\n" + line + "\n")
    with pytest.raises(UsageError) as exc:
        suite.load_suite(f)
    assert exc.value.message == f"{f}:2: duplicate id 'a'"


# ----------------------------------------------------------------------------------------------- gates (no server)

def fake_result(acc: float | None, speedup: float, ci: bool = True) -> dict:
    def fig(v):
        if v is None:
            return {"value": None, "ci95": None, "n": 0, "note": "no units"}
        if not ci:
            return {"value": v, "ci95": None, "n": 6, "note": "n too small for an interval: 6 prompts"}
        return {"value": v, "ci95": [round(v - 0.01, 4), round(v + 0.01, 4)], "n": 12, "note": None}

    return {"settings": {"draft_n_max": [4, 2]},
            "results": {"chat": {"k": {"4": {"overall": {"acceptance": fig(acc), "speedup": fig(speedup)}}}}}}


def test_gates_compare_the_lower_bound_at_a_fixed_k():
    sm.check_gates(fake_result(0.8, 1.5), Gates(min_acceptance=0.75, min_speedup=1.2), "Q4_K_M")
    with pytest.raises(GateError) as exc:
        sm.check_gates(fake_result(0.755, 1.205), Gates(min_acceptance=0.75, min_speedup=1.2), "Q4_K_M")
    assert exc.value.message == (
        "variant Q4_K_M: MTP acceptance 0.755 (95% CI 0.745-0.765; chat, k=4) is below the gate min_acceptance 0.75; "
        "variant Q4_K_M: decode speedup 1.205x (95% CI 1.195-1.215x; chat, k=4) is below the gate min_speedup 1.2x")
    assert exc.value.hint == "the figures are in receipts/smoke-Q4_K_M.json"
    with pytest.raises(GateError) as exc:
        sm.check_gates(fake_result(None, 1.0), Gates(min_acceptance=0.5), "IQ4_XS")
    assert exc.value.message == ("variant IQ4_XS: MTP acceptance could not be measured (chat, k=4); "
                                 "gate min_acceptance 0.5")
    with pytest.raises(GateError) as exc:
        sm.check_gates(fake_result(0.9, 2.0, ci=False), Gates(min_acceptance=0.5), "Q8_0")
    assert exc.value.message == ("variant Q8_0: MTP acceptance 0.900 (chat, k=4) has no confidence interval (n too "
                                 "small for an interval: 6 prompts), so it cannot clear the gate min_acceptance 0.5")
    report = sm.gate_report(fake_result(0.8, 1.5), Gates(min_speedup=1.2, k=2))
    assert report["k"] == 2 and report["checks"]["min_speedup"]["value"] is None and not report["passed"]


def test_variant_gates_override_global_ones_field_by_field():
    spec = SmokeSpec(gates=Gates(min_acceptance=0.5, min_speedup=1.1),
                     variant_gates={"IQ3_XXS": Gates(min_acceptance=0.3)})
    assert sm.gates_for(spec, "IQ3_XXS") == Gates(min_acceptance=0.3, min_speedup=1.1)
    at_k = SmokeSpec(gates=Gates(min_acceptance=0.5, k=3), variant_gates={"Q8_0": Gates(k=4)})
    assert sm.gates_for(at_k, "Q8_0") == Gates(min_acceptance=0.5, k=4)
    assert sm.gates_for(spec, "Q4_K_M") == Gates(min_acceptance=0.5, min_speedup=1.1)


# ----------------------------------------------------------------------------------------------- real runs

def test_designed_acceptance(toolchain, models, tmp_path):
    spec = SmokeSpec(enabled=True, seeds=(42, 7), draft_n_max=(K,), max_tokens=MAX_TOKENS, raw=True, ctx=1024,
                     threads=1)
    seen = []
    prompts = small_suite(4)  # 12 prompts: enough for intervals
    r = sm.smoke_model(toolchain, models["designed"], spec, tmp_path / "logs", suite=prompts,
                       progress=lambda label, done, total: seen.append((done, total)))
    assert seen[-1] == (seen[-1][1], seen[-1][1]) and len(seen) > 2 * 48

    designed = synth.designed_expected_acceptance(DESIGNED, K, MAX_TOKENS)  # this run length: 0.778
    expect = synth.designed_draft_counts(DESIGNED, K, MAX_TOKENS)
    chat = [x for x in r["runs"] if x["server"] == f"k{K}" and x["mode"] == "chat"]
    assert [(x["draft_n"], x["draft_n_accepted"]) for x in chat] == [expect] * 24
    g = r["results"]["chat"]["k"][str(K)]["overall"]
    assert g["acceptance"] == {"value": pytest.approx(designed, abs=1e-4), "ci95": None, "n": 12,
                               "note": "identical on all 12 prompts"}
    assert abs(g["acceptance"]["value"] - ALPHA) <= TOLERANCE
    assert g["differs_from_vanilla"] == {"count": 0, "of": 24, "share": 0.0}  # greedy MTP is lossless

    # the best k is chosen on half the prompts and reported on the other half
    assert r["split"]["selection"] == [p.id for p in prompts][0::2] and len(r["split"]["report"]) == 6
    h = r["headline"]
    assert (h["k"], h["units"], h["prompts"], h["chosen_on"]) == (K, 12, 6, "selection prompts")
    assert h["acceptance"]["value"] == pytest.approx(designed, abs=1e-4) and h["acceptance"]["ci95"] is None

    # per position: the conditional acceptance the replay of the design gives; tokens per step count the bonus token
    steps = g["draft_steps"]
    assert g["tokens_per_step"]["value"] == pytest.approx((g["draft_n_accepted"] + steps) / steps, abs=1e-4)
    assert len(g["acceptance_per_position"]) == K and g["conditional_acceptance_per_position"][0] == pytest.approx(
        g["acceptance_per_position"][0], abs=1e-4)
    cond = g["conditional_acceptance_per_position"]
    assert all(c is None or 0.0 <= c <= 1.0 for c in cond)

    # raw prompts enter the cycle at different tokens: a spread of acceptance, and a CI that covers the replay
    raw = [x for x in r["runs"] if x["server"] == f"k{K}" and x["mode"] == "raw"]
    cycle = synth.designed_cycle(DESIGNED)
    by_id = {p.id: p for p in prompts}
    counts = []
    for x in raw:
        last = by_id[x["prompt"]].prompt[-1]
        first = cycle[(cycle.index(synth.token_id(last)) + 1) % len(cycle)]
        counts.append(synth.designed_draft_counts(DESIGNED, K, MAX_TOKENS, start=first))
        assert (x["draft_n"], x["draft_n_accepted"]) == counts[-1]
    pooled = sum(a for _, a in counts) / sum(d for d, _ in counts)
    fig = r["results"]["raw"]["k"][str(K)]["overall"]["acceptance"]
    assert fig["value"] == pytest.approx(pooled, abs=1e-4) and fig["n"] == 12
    assert fig["ci95"][0] < fig["ci95"][1] and fig["ci95"][0] - 1e-4 <= pooled <= fig["ci95"][1] + 1e-4

    # speed: decode, prefill and end to end for both arms, from requests that ran to max_tokens
    assert g["timed_units"] == 24 and g["excluded"]["stopped_early"] == 0
    for name in ("tok_s", "vanilla_tok_s", "speedup", "prompt_tok_s", "vanilla_prompt_tok_s", "e2e_speedup"):
        assert g[name]["value"] > 0 and g[name]["n"] == 12
    assert all(x["finish_reason"] == "length" for x in chat)

    # the same machine state for both arms: explicit placement, the load logs agree, the machine recorded
    for srv in r["servers"]:
        assert srv["argv"][srv["argv"].index("-fit") + 1] == "off"
        assert srv["loaded"]["model_mib"] and srv["loaded"]["kv_mib"]
    assert r["placement"] == {"same": True, "offloaded": None, "devices": ["CPU_Mapped"]}
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"]
    # order: both arms resident, their order rotated per request; two full-length warm-ups per server
    positions = {(x["request"], x["server"]): x["arm_position"] for x in r["runs"]}
    assert positions[("chat/code-0/42", "vanilla")] == 0 and positions[("chat/code-0/7", "vanilla")] == 1
    assert [x["sequence"] for x in r["runs"]] == list(range(len(r["runs"])))
    assert len(r["settings"]["warmup"]["bodies"]) == 2
    assert all(b["max_tokens"] == MAX_TOKENS for b in r["settings"]["warmup"]["bodies"])
    assert set(r["drift"]) == {"vanilla", f"k{K}"} and r["drift"]["vanilla"]["ratio"] > 0

    # the receipt body: exact commands, exact requests, no per-request speculative fields
    assert [s["argv"][0] for s in r["servers"]] == ["llama-server"] * 2
    assert r["servers"][1]["argv"][-4:] == ["--spec-type", "draft-mtp", "--spec-draft-n-max", str(K)]
    assert r["servers"][1]["slots_speculative"] == [True] and r["servers"][0]["slots_speculative"] == [False]
    assert all(str(tmp_path) not in a for s in r["servers"] for a in s["argv"])
    assert len(r["requests"]) == 48
    assert r["requests"][0] == {"id": "chat/code-0/42", "endpoint": "/v1/chat/completions", "body": {
        "messages": [{"role": "user", "content": "Tell me about code topic 0."}], "max_tokens": MAX_TOKENS,
        "temperature": 0.0, "top_k": 1, "seed": 42, "cache_prompt": False, "stream": False}}
    assert not any("speculative" in json.dumps(q["body"]) for q in r["requests"])
    assert r["settings"]["bootstrap"]["interval"] == "BCa" and r["settings"]["bootstrap"]["min_units"] == 10
    json.dumps(r)  # a receipt must serialise

    # a gate above the designed fraction fails with the figure; at 0.7 it passes (the same value on every prompt)
    with pytest.raises(GateError) as exc:
        sm.check_gates(r, Gates(min_acceptance=0.9), "designed")
    assert exc.value.message == (f"variant designed: MTP acceptance {designed:.3f} (the same on every prompt; "
                                 f"chat, k={K}) is below the gate min_acceptance 0.9")
    sm.check_gates(r, Gates(min_acceptance=0.7), "designed")
    assert "designed" in table("designed", r)


def test_synthetic_rates_on_a_random_model(toolchain, models, tmp_path):
    """Random weights accept nothing; --spec-synth-rates 1,1,0 forces 2 of every 3 drafts (benchmark mode)."""
    spec = SmokeSpec(enabled=True, seeds=(42,), draft_n_max=(3,), max_tokens=16, prompts=3, ctx=512, threads=1,
                     warmup=2)
    r = sm.smoke_model(toolchain, models["random"], spec, tmp_path / "logs", suite=small_suite(),
                       mtp_args=["--spec-synth-rates", "1,1,0"])
    vanilla = [x for x in r["runs"] if x["server"] == "vanilla"]
    assert all("draft_n" not in x["timings"] and x["draft_n"] == 0 for x in vanilla)  # absent = no drafts
    mtp = [x for x in r["runs"] if x["server"] == "k3"]
    for x in mtp:  # (a step cut short by end-of-generation may accept less)
        per_pos = x["accepted_per_position"]
        assert len(per_pos) == 3 and per_pos[2] == 0 and sum(per_pos) == x["draft_n_accepted"]
        assert x["draft_steps"] >= per_pos[0] >= per_pos[1] > 0
        assert x["draft_n"] == x["timings"]["draft_n"] > x["draft_n_accepted"] == x["timings"]["draft_n_accepted"]
    o = r["results"]["chat"]["k"]["3"]["overall"]
    assert o["draft_n"] == sum(x["draft_n"] for x in mtp)
    assert o["draft_n_accepted"] == sum(x["draft_n_accepted"] for x in mtp)
    assert o["acceptance"]["value"] == pytest.approx(o["draft_n_accepted"] / o["draft_n"], abs=1e-4)
    assert o["mean_accepted_length"]["value"] == pytest.approx(o["draft_n_accepted"] / o["draft_steps"], abs=1e-4)
    assert o["acceptance_per_position"][2] == 0.0 and o["acceptance_per_position"][0] >= 0.8
    assert "--spec-synth-rates" in r["servers"][1]["argv"] and "--spec-synth-rates" not in r["servers"][0]["argv"]


RECIPE = """\
name: demo
source: {synthetic: {arch: qwen35moe}}
variants: [{type: Q8_0}, {type: Q4_K_M}]
smoke:
  seeds: [42]
  draft_n_max: [2]
  max_tokens: 16
  threads: 1
  ctx: 512
  gate: {min_acceptance: 0.5}
  variant_gates: {Q4_K_M: {min_acceptance: 0.9}}
"""


def test_cli_on_a_run_directory(toolchain, models, tmp_path):
    run = RunDir(tmp_path / "out")
    run.ensure()
    for tag in ("Q8_0", "Q4_K_M"):
        (run.root / f"demo-{tag}.gguf").write_bytes(models["designed"].read_bytes())
    (run.root / "demo.imatrix.gguf").write_bytes(b"not smoked")
    run.write_sha256sums({"demo-Q8_0.gguf": "a" * 64, "demo-Q4_K_M.gguf": "c" * 64, "demo.imatrix.gguf": "b" * 64})
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    run.write_manifest({"name": "demo", "recipe": str(tmp_path / "recipe.yaml")})
    res = CliRunner().invoke(smoke_cmd, [str(run.root), "--k", "3", "--prompts", "10", "--json", "-q",
                                         "--llama-cpp", str(toolchain.bin_dir)])
    # the recipe's settings apply, --k overrides its draft_n_max; Q4_K_M has its own, higher gate
    designed = synth.designed_expected_acceptance(DESIGNED, 3, 16)
    assert isinstance(res.exception, GateError)
    assert res.exception.message == (f"variant Q4_K_M: MTP acceptance {designed:.3f} (the same on every prompt; "
                                     "chat, k=3) is below the gate min_acceptance 0.9")
    out = json.loads(res.stdout)
    assert sorted(out) == ["Q4_K_M", "Q8_0"]
    for tag, sha, passed in (("Q8_0", "a" * 64, True), ("Q4_K_M", "c" * 64, False)):
        receipt = receipt_json(run, "smoke", tag)
        assert receipt["step"] == "smoke" and receipt["variant"] == tag
        assert receipt["model"] == {"file": f"demo-{tag}.gguf", "sha256": sha,
                                    "bytes": models["designed"].stat().st_size}
        assert receipt["settings"]["spec_source"] == f"recipe {tmp_path / 'recipe.yaml'}"
        assert receipt["settings"]["draft_n_max"] == [3] and receipt["settings"]["threads"] == 1
        assert receipt["headline"]["acceptance"]["value"] == pytest.approx(designed, abs=1e-4)
        assert receipt["gates"]["passed"] is passed
    assert {p.name for p in run.logs.iterdir()} == {f"smoke-{t}-{s}.log" for t in ("Q8_0", "Q4_K_M")
                                                    for s in ("vanilla", "k3")}


def test_cli_bad_inputs(tmp_path):
    runner = CliRunner()
    res = runner.invoke(smoke_cmd, [str(tmp_path / "nope.gguf")])
    assert isinstance(res.exception, UsageError)
    assert res.exception.message == f"{tmp_path / 'nope.gguf'}: no such GGUF file or run directory"
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)  # named, never opened: opening it would block
    proc = subprocess.run([sys.executable, "-m", "mtpquant", "smoke", str(fifo)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (f"error: {fifo} is a FIFO (named pipe), not a GGUF file or run directory "
                           "(give a GGUF file or a run directory)\n")
    fifo.unlink()
    res = runner.invoke(smoke_cmd, [str(tmp_path), "--k", "0"])
    assert res.exit_code == 2 and "expected distinct positive integers, got '0'" in res.output
    res = runner.invoke(smoke_cmd, [str(tmp_path)])
    assert isinstance(res.exception, UsageError)
    assert res.exception.message == (f"{tmp_path}: no SHA256SUMS (is this a run directory made by "
                                     "`mtpquant build`?)")


def test_bootstrap_resamples_prompts_not_replicated_seeds():
    # 12 prompts x 3 seeds; at temperature 0 a prompt's seeds repeat the same counts
    per = [10.0 + 2.5 * i for i in range(12)]
    accepted = np.repeat(per, 3)
    drafted = np.full(36, 50.0)
    prompts = np.repeat([f"p{i}" for i in range(12)], 3).tolist()
    clustered = stats.figure(stats.ratio_of_sums, (accepted, drafted), clusters=prompts)
    per_prompt = stats.figure(stats.ratio_of_sums, (per, [50.0] * 12))
    naive = stats.figure(stats.ratio_of_sums, (accepted, drafted))
    assert clustered == per_prompt  # seeds folded into their prompt: the same figure as one unit per prompt
    assert clustered["value"] == naive["value"] == 0.475 and clustered["n"] == 12 and naive["n"] == 36
    width = lambda f: f["ci95"][1] - f["ci95"][0]  # noqa: E731
    assert width(clustered) > width(naive)  # replicates treated as independent would understate the uncertainty
