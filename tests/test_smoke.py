"""Smoke run: statistics on known arrays, the prompt suite, real llama-server runs on synthetic models, gates, CLI."""

from __future__ import annotations

import json
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
from mtpquant.measure.smoke import context, stats, suite
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


def test_bootstrap_ratio_of_sums_resamples_units_jointly():
    accepted = np.array([3, 6, 9, 12])
    drafted = np.array([4, 8, 12, 16])  # every unit accepts 3/4, so every resample does too
    assert stats.figure(stats.ratio_of_sums, (accepted, drafted)) == {"value": 0.75, "ci95": [0.75, 0.75]}


def test_ratio_of_sums_without_drafts_is_undefined():
    zeros = np.zeros(5)
    assert stats.bootstrap_ci(stats.ratio_of_sums, [zeros, zeros]) is None
    assert stats.figure(stats.ratio_of_sums, (zeros, zeros)) == {"value": None, "ci95": None}


def test_geometric_mean_speedup():
    assert stats.figure(stats.geomean_ratio, (np.array([2.0, 8.0]), np.array([1.0, 1.0])))["value"] == 4.0
    lo, hi = stats.bootstrap_ci(stats.geomean_ratio, [np.array([2.0, 8.0]), np.ones(2)])
    assert (lo, hi) == (pytest.approx(2.0), pytest.approx(8.0))  # both units drawn twice, either way


def test_percentile_interval_on_a_known_spread():
    x = np.arange(1000, dtype=float)
    lo, hi = stats.bootstrap_ci(stats.mean, [x], resamples=4000)
    se = x.std() / np.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - 1.96 * se, rel=0.01) and hi == pytest.approx(x.mean() + 1.96 * se, rel=0.01)


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

def fake_result(acc: float | None, speedup: float) -> dict:
    def fig(v):
        return {"value": v, "ci95": None if v is None else [round(v - 0.01, 4), round(v + 0.01, 4)]}

    return {"headline": {"mode": "chat", "k": 4, "acceptance": fig(acc), "speedup": fig(speedup)}}


def test_gates_pass_and_fail():
    sm.check_gates(fake_result(0.8, 1.5), Gates(min_acceptance=0.75, min_speedup=1.2), "Q4_K_M")
    with pytest.raises(GateError) as exc:
        sm.check_gates(fake_result(0.7, 1.1), Gates(min_acceptance=0.75, min_speedup=1.2), "Q4_K_M")
    assert exc.value.message == (
        "variant Q4_K_M: MTP acceptance 0.700 (95% CI 0.690-0.710; chat, k=4) is below the gate min_acceptance 0.75; "
        "variant Q4_K_M: decode speedup 1.100x (95% CI 1.090-1.110x; chat, k=4) is below the gate min_speedup 1.2x")
    assert exc.value.hint == "the figures are in receipts/smoke-Q4_K_M.json"
    with pytest.raises(GateError) as exc:
        sm.check_gates(fake_result(None, 1.0), Gates(min_acceptance=0.5), "IQ4_XS")
    assert exc.value.message == ("variant IQ4_XS: MTP acceptance could not be measured (chat, k=4); "
                                 "gate min_acceptance 0.5")


def test_variant_gates_override_global_ones_field_by_field():
    spec = SmokeSpec(gates=Gates(min_acceptance=0.5, min_speedup=1.1),
                     variant_gates={"IQ3_XXS": Gates(min_acceptance=0.3)})
    assert sm.gates_for(spec, "IQ3_XXS") == Gates(min_acceptance=0.3, min_speedup=1.1)
    assert sm.gates_for(spec, "Q4_K_M") == Gates(min_acceptance=0.5, min_speedup=1.1)


# ----------------------------------------------------------------------------------------------- real runs

def test_designed_acceptance(toolchain, models, tmp_path):
    spec = SmokeSpec(enabled=True, seeds=(42, 7), draft_n_max=(K,), max_tokens=MAX_TOKENS, raw=True, ctx=1024,
                     threads=1, context_sweep=(300,))
    seen = []
    r = sm.smoke_model(toolchain, models["designed"], spec, tmp_path / "logs", suite=small_suite(),
                       progress=lambda label, done, total: seen.append((done, total)))
    assert seen[-1] == (seen[-1][1], seen[-1][1]) and len(seen) > 2 * 12

    designed = synth.designed_expected_acceptance(DESIGNED, K, MAX_TOKENS)  # this run length: 0.778
    expect = synth.designed_draft_counts(DESIGNED, K, MAX_TOKENS)
    chat = [x for x in r["runs"] if x["server"] == f"k{K}" and x["mode"] == "chat"]
    assert [(x["draft_n"], x["draft_n_accepted"]) for x in chat] == [expect] * 12
    h = r["headline"]
    assert (h["k"], h["units"]) == (K, 12)
    assert h["acceptance"]["value"] == pytest.approx(designed, abs=1e-4)
    lo, hi = h["acceptance"]["ci95"]
    assert lo - 1e-4 <= designed <= hi + 1e-4
    assert abs(h["acceptance"]["value"] - ALPHA) <= TOLERANCE
    assert h["differs_from_vanilla"] == {"count": 0, "of": 12, "share": 0.0}  # greedy MTP is lossless

    # raw prompts enter the cycle at different tokens: a spread of acceptance, and a CI that covers the replay
    raw = [x for x in r["runs"] if x["server"] == f"k{K}" and x["mode"] == "raw"]
    cycle = synth.designed_cycle(DESIGNED)
    by_id = {p.id: p for p in small_suite()}
    counts = []
    for x in raw:
        last = by_id[x["prompt"]].prompt[-1]
        first = cycle[(cycle.index(synth.token_id(last)) + 1) % len(cycle)]
        counts.append(synth.designed_draft_counts(DESIGNED, K, MAX_TOKENS, start=first))
        assert (x["draft_n"], x["draft_n_accepted"]) == counts[-1]
    pooled = sum(a for _, a in counts) / sum(d for d, _ in counts)
    fig = r["results"]["raw"]["k"][str(K)]["overall"]["acceptance"]
    assert fig["value"] == pytest.approx(pooled, abs=1e-4)
    assert fig["ci95"][0] < fig["ci95"][1] and fig["ci95"][0] - 1e-4 <= pooled <= fig["ci95"][1] + 1e-4
    assert abs(fig["value"] - ALPHA) <= 0.1

    # per category, per seed, per position, mean accepted length
    g = r["results"]["chat"]["k"][str(K)]
    assert set(g["per_category"]) == set(suite.CATEGORIES) and set(g["per_seed"]) == {"42", "7"}
    assert g["per_seed"]["7"]["acceptance"]["value"] == pytest.approx(designed, abs=1e-4)
    assert g["overall"]["draft_steps"] == sum(x["draft_steps"] for x in chat)
    assert g["overall"]["mean_accepted_length"]["value"] == pytest.approx(
        g["overall"]["draft_n_accepted"] / g["overall"]["draft_steps"], abs=1e-4)
    assert len(g["overall"]["acceptance_per_position"]) == K

    # the receipt body: exact commands, exact requests, no per-request speculative fields
    assert [s["argv"][0] for s in r["servers"]] == ["llama-server"] * 4
    assert r["servers"][1]["argv"][-4:] == ["--spec-type", "draft-mtp", "--spec-draft-n-max", str(K)]
    assert r["servers"][1]["slots_speculative"] == [True] and r["servers"][0]["slots_speculative"] == [False]
    assert all(str(tmp_path) not in a for s in r["servers"] for a in s["argv"])
    assert len(r["requests"]) == 24
    assert r["requests"][0] == {"id": "chat/code-0/42", "endpoint": "/v1/chat/completions", "body": {
        "messages": [{"role": "user", "content": "Tell me about code topic 0."}], "max_tokens": MAX_TOKENS,
        "temperature": 0.0, "top_k": 1, "seed": 42, "cache_prompt": False, "stream": False}}
    assert not any("speculative" in json.dumps(q["body"]) for q in r["requests"])
    assert r["settings"]["bootstrap"]["resamples"] == stats.BOOTSTRAP_RESAMPLES
    json.dumps(r)  # a receipt must serialise

    # long context at the best k: the designed head still agrees
    row = r["context_sweep"]["rows"][0]
    assert row["prompt_tokens"] >= 300 - context.LONG_RESERVE and row["acceptance"] == pytest.approx(designed, abs=1e-4)

    # a gate above the designed fraction fails with the figure and its CI
    with pytest.raises(GateError) as exc:
        sm.check_gates(r, Gates(min_acceptance=0.9), "designed")
    assert exc.value.message == (f"variant designed: MTP acceptance {designed:.3f} (95% CI {designed:.3f}-"
                                 f"{designed:.3f}; chat, k={K}) is below the gate min_acceptance 0.9")
    sm.check_gates(r, Gates(min_acceptance=0.7), "designed")
    assert "designed" in table("designed", r)


def test_synthetic_rates_on_a_random_model(toolchain, models, tmp_path):
    """Random weights accept nothing; --spec-synth-rates 1,1,0 forces 2 of every 3 drafts (benchmark mode)."""
    spec = SmokeSpec(enabled=True, seeds=(42,), draft_n_max=(3,), max_tokens=16, prompts=3, ctx=512, threads=1)
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
    res = CliRunner().invoke(smoke_cmd, [str(run.root), "--k", "3", "--prompts", "3", "--json", "-q",
                                         "--llama-cpp", str(toolchain.bin_dir)])
    # the recipe's settings apply, --k overrides its draft_n_max; Q4_K_M has its own, higher gate
    designed = synth.designed_expected_acceptance(DESIGNED, 3, 16)
    assert isinstance(res.exception, GateError)
    assert res.exception.message == (f"variant Q4_K_M: MTP acceptance {designed:.3f} (95% CI {designed:.3f}-"
                                     f"{designed:.3f}; chat, k=3) is below the gate min_acceptance 0.9")
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
    res = runner.invoke(smoke_cmd, [str(tmp_path), "--k", "0"])
    assert res.exit_code == 2 and "expected distinct positive integers, got '0'" in res.output
    res = runner.invoke(smoke_cmd, [str(tmp_path)])
    assert isinstance(res.exception, UsageError)
    assert res.exception.message == (f"{tmp_path}: no SHA256SUMS (is this a run directory made by "
                                     "`mtpquant build`?)")


def test_bootstrap_resamples_prompts_not_replicated_seeds():
    # 4 prompts x 3 seeds; at temperature 0 a prompt's seeds repeat the same counts
    accepted = np.repeat([10.0, 20.0, 30.0, 40.0], 3)
    drafted = np.full(12, 50.0)
    prompts = np.repeat(["p1", "p2", "p3", "p4"], 3).tolist()
    clustered = stats.figure(stats.ratio_of_sums, (accepted, drafted), clusters=prompts)
    per_prompt = stats.figure(stats.ratio_of_sums, ([10.0, 20.0, 30.0, 40.0], [50.0] * 4))
    naive = stats.figure(stats.ratio_of_sums, (accepted, drafted))
    assert clustered == per_prompt  # seeds folded into their prompt: the same figure as one unit per prompt
    assert clustered["value"] == naive["value"] == 0.5
    width = lambda f: f["ci95"][1] - f["ci95"][0]  # noqa: E731
    assert width(clustered) > width(naive)  # replicates treated as independent would understate the uncertainty
