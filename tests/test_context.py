"""Where MTP pays: the context sweep on real llama-servers (to 32k tokens), its long-prompt sources, the checks
before it starts, and the break-even and recommendation computed from hand-made receipts whose answer is known."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mtpquant import recipe as rcp
from mtpquant import synth
from mtpquant.cli import main
from mtpquant.cli.cmd_smoke import sweep_lines
from mtpquant.core.errors import RecipeError, UsageError
from mtpquant.llamacpp.server import LlamaServer
from mtpquant.measure import smoke as sm
from mtpquant.measure.smoke import context, longtext, suite
from mtpquant.pipeline import build as pipeline
from mtpquant.recipe import SmokeSpec
from mtpquant.report.card import pays
from mtpquant.report.card.nodes import Node

K = 3
MAX_TOKENS = 16
DESIGNED = synth.SynthSpec(name="designed", designed=synth.Designed(alpha=0.75, k=K))
MiB = 1 << 20
ONE_PROMPT = [suite.Prompt("code-0", "code", (("user", "Tell me about code."),), "Sequence code:a")]


@pytest.fixture(scope="module")
def designed(tmp_path_factory) -> Path:
    return synth.write_gguf(tmp_path_factory.mktemp("context") / "designed-BF16.gguf", DESIGNED)[0]


def sweep_spec(**kw) -> SmokeSpec:
    return SmokeSpec(enabled=True, seeds=(42,), draft_n_max=(K,), max_tokens=MAX_TOKENS, ctx=512, threads=2, **kw)


def by(cs: dict, ctx: int, arm: str) -> list[dict]:
    return [r for r in cs["requests"] if r["ctx"] == ctx and r["arm"] == arm]


# ----------------------------------------------------------------------------------------------- real servers

def test_sweep_to_32k_on_the_designed_model(toolchain, designed, tmp_path):
    r = sm.smoke_model(toolchain, designed, sweep_spec(context_sweep=(32768, 1024), context_documents=1),
                       tmp_path / "logs", suite=ONE_PROMPT)
    cs = r["context_sweep"]
    assert (cs["method"], cs["k"], cs["lengths"], cs["documents_per_length"]) == (2, K, [1024, 32768], 1)
    assert cs["trained_context"] == {"key": "qwen35moe.context_length", "tokens": 262144}
    assert [a["label"] for a in cs["arms"]] == ["vanilla", f"k{K}"]
    drafts = synth.designed_draft_counts(DESIGNED, K, MAX_TOKENS)
    for L in (1024, 32768):
        (v,), (m,) = by(cs, L, "vanilla"), by(cs, L, f"k{K}")
        for rec in (v, m):  # the prompt fills the context less the output and the reserve
            n = rec["timings"]["prompt_n"]
            assert L - MAX_TOKENS - context.RESERVE <= n <= L - MAX_TOKENS and rec["finish_reason"] == "length"
        assert (m["draft_n"], m["draft_n_accepted"]) == drafts  # the designed head agrees at 32k as at 1k
        assert m["text"] == v["text"] and (v["draft_n"], v["draft_n_accepted"]) == (0, 0)
        row = next(x for x in cs["rows"] if x["ctx"] == L)
        f, fv = row["arms"][f"k{K}"], row["arms"]["vanilla"]
        assert f["acceptance"]["value"] == pytest.approx(drafts[1] / drafts[0], abs=1e-4)
        assert f["acceptance"]["ci95"] is None and f["acceptance"]["note"] == "n too small for an interval: 1 documents"
        t, tv = m["timings"], v["timings"]
        assert fv["decode_tok_s"]["value"] == pytest.approx(tv["predicted_per_second"], abs=0.01)
        assert f["prefill_tok_s"]["value"] == pytest.approx(t["prompt_per_second"], abs=0.1)
        assert f["ttft_ms"]["value"] == pytest.approx(t["prompt_ms"], abs=0.1)
        assert f["e2e_ms"]["value"] == pytest.approx(t["prompt_ms"] + t["predicted_ms"], abs=0.1)
        e2e = (tv["prompt_ms"] + tv["predicted_ms"]) / (t["prompt_ms"] + t["predicted_ms"])
        assert f["e2e_speedup"]["value"] == pytest.approx(e2e, abs=1e-4)
        assert f["decode_speedup"]["value"] == pytest.approx(t["predicted_per_second"] / tv["predicted_per_second"],
                                                             abs=1e-4)
        # the card's model of e2e time reproduces the measured request at its own output length
        assert pays.speedup_at(cs, L, f"k{K}", MAX_TOKENS)["value"] == pytest.approx(e2e, rel=1e-3)
        # memory from the load logs: one attention layer's f16 K and V (1 KV head of 64) per cell, and the MTP
        # server's draft context holds its own
        mem = {s["arm"]: s["memory"] for s in cs["servers"] if s["ctx"] == L}
        kv = L * 2 * 64 * 2 / MiB
        assert [c["KV:CPU"] for c in mem["vanilla"]["contexts"]] == [pytest.approx(kv, abs=0.01)]
        assert [c["KV:CPU"] for c in mem[f"k{K}"]["contexts"]] == [pytest.approx(kv, abs=0.01)] * 2
        assert mem[f"k{K}"]["total_mib"] > mem["vanilla"]["total_mib"] > kv
    # exactly what was sent: the files in order with their sha256, token counts, the sha256 of each prompt
    stdlib = longtext.stdlib_source()
    (p1, p32) = sorted(cs["prompts"], key=lambda p: p["ctx"])
    assert p1["files"][0] == p32["files"][0] == stdlib.files[0] and len(p32["files"]) > len(p1["files"])
    assert p32["files"] == list(stdlib.files[:len(p32["files"])])
    for path in p32["files"]:
        assert cs["file_sha256"][path] == hashlib.sha256((stdlib.root / path).read_bytes()).hexdigest()
    (v32,) = by(cs, 32768, "vanilla")
    assert 0 < v32["timings"]["prompt_n"] - p32["content_tokens"] < context.RESERVE  # the chat template's tokens
    assert len({p["content_sha256"] for p in cs["prompts"]}) == 2
    assert cs["order"]["warmup_prompt"]["ctx"] == 1024 and cs["source"]["kind"] == "stdlib"
    json.dumps(r)
    text = "\n".join(sweep_lines(cs))
    assert "32768" in text and f"k={K}: " in text


def test_documents_differ_and_the_arms_rotate(toolchain, designed, tmp_path):
    r = sm.smoke_model(toolchain, designed, sweep_spec(context_sweep=(640, 384), context_documents=3,
                                                       context_k1=True), tmp_path / "logs", suite=ONE_PROMPT)
    cs = r["context_sweep"]
    names = ["vanilla", f"k{K}", "k1"]
    assert [a["label"] for a in cs["arms"]] == names
    stdlib = longtext.stdlib_source()
    n = len(stdlib.files)
    for L in (384, 640):
        prompts = [p for p in cs["prompts"] if p["ctx"] == L]
        assert [p["files"][0] for p in prompts] == [stdlib.files[i * n // 3] for i in range(3)]
        assert len({p["content_sha256"] for p in prompts}) == 3
        for j in range(3):  # every document on every arm back to back, the first arm rotating
            recs = sorted((x for x in cs["requests"] if x["ctx"] == L and x["document"] == j),
                          key=lambda x: x["arm_position"])
            assert [x["arm"] for x in recs] == names[j:] + names[:j]
        row = next(x for x in cs["rows"] if x["ctx"] == L)
        assert row["documents"] == 3
        for arm in names[1:]:
            f = row["arms"][arm]
            assert f["acceptance"]["note"] == "n too small for an interval: 3 documents"
            assert f["e2e_speedup"]["ci95"] is None
            k = int(arm[1:])
            d, a = synth.designed_draft_counts(DESIGNED, k, MAX_TOKENS)
            assert (f["draft_n"], f["draft_n_accepted"]) == (3 * d, 3 * a)
    short = {p["document"]: p for p in cs["prompts"] if p["ctx"] == 384}
    for p in (p for p in cs["prompts"] if p["ctx"] == 640):  # each length cuts the same documents
        assert p["files"][0] == short[p["document"]]["files"][0]
        assert p["body_tokens"] > short[p["document"]]["body_tokens"]
    assert {s["label"] for s in cs["servers"]} == {f"long{L}-{a}" for L in (384, 640) for a in names}
    assert {p.name for p in (tmp_path / "logs").iterdir()} >= {f"smoke-designed-BF16-long{L}-{a}.log"
                                                               for L in (384, 640) for a in names}


def test_own_documents(toolchain, designed, tmp_path):
    long_doc = longtext.stdlib_source().root / "textwrap.py"
    short_doc = tmp_path / "note.txt"
    short_doc.write_text("A short note about the context sweep.\n" * 30)
    spec = sweep_spec(context_sweep=(384, 2048), long_documents=(long_doc, short_doc))
    cs = sm.smoke_model(toolchain, designed, spec, tmp_path / "logs", suite=ONE_PROMPT)["context_sweep"]
    assert cs["source"] == {"kind": "documents", "files": ["textwrap.py", "note.txt"],
                            "question": longtext.DOCUMENT_QUESTION.strip()}
    assert cs["file_sha256"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (long_doc, short_doc)}
    (short_row, long_row) = cs["rows"]
    assert short_row["documents"] == 2 and short_row["skipped_documents"] == []
    assert long_row["documents"] == 1
    (skip,) = long_row["skipped_documents"]
    held = len(model_tokens(toolchain, designed, tmp_path, short_doc.read_text()))
    assert skip["document"] == 1 and skip["reason"].startswith(f"it holds {held} tokens, ")
    assert [p["files"] for p in cs["prompts"]] == [["textwrap.py"], ["note.txt"], ["textwrap.py"]]
    assert all(p["last_file_truncated"] for p in cs["prompts"])  # each cut inside its document


def model_tokens(toolchain, model: Path, tmp_path: Path, text: str) -> list[int]:
    """The model's tokens of a text, through a real llama-server's /tokenize."""
    with LlamaServer(toolchain, model, tmp_path / "tokenize.log", ctx=256, threads=1) as srv:
        return srv.tokenize(text)


# ----------------------------------------------------------------------------------------------- checked first

def test_a_length_beyond_the_trained_context_is_refused_before_any_server(toolchain, tmp_path):
    short = synth.write_gguf(tmp_path / "short-BF16.gguf", synth.SynthSpec(context_length=4096))[0]
    with pytest.raises(UsageError) as ei:
        sm.smoke_model(toolchain, short, sweep_spec(context_sweep=(2048, 8192)), tmp_path / "logs", suite=ONE_PROMPT)
    assert ei.value.one_line() == ("short-BF16.gguf: context sweep length 8192 is longer than the 4096 tokens the "
                                   "model was trained for (qwen35moe.context_length) (use lengths up to 4096)")
    with pytest.raises(UsageError) as ei:
        sm.smoke_model(toolchain, short, sweep_spec(context_sweep=(90,)), tmp_path / "logs", suite=ONE_PROMPT)
    assert ei.value.one_line() == ("context sweep length 90 leaves no room for a prompt after 16 output tokens and "
                                   "64 for the chat template (use lengths of at least 96)")
    res = CliRunner().invoke(main, ["smoke", str(short), "--context", "4096,16384", "-q", "--llama-cpp",
                                    str(toolchain.bin_dir)])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1].endswith(
        "short-BF16.gguf: context sweep length 16384 is longer than the 4096 tokens the model was trained for "
        "(qwen35moe.context_length) (use lengths up to 4096)")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    res = CliRunner().invoke(main, ["smoke", str(short), "--context", "1024", "--long-doc", str(tmp_path / "latin1.txt"),
                                    "-q", "--llama-cpp", str(toolchain.bin_dir)])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1].endswith(
        f"{tmp_path / 'latin1.txt'}: long document is not UTF-8 text (byte 3) (give plain UTF-8 text files in "
        "smoke.long_documents)")
    assert not (tmp_path / "logs").exists()


def test_a_build_refuses_the_sweep_at_plan_time(toolchain, tmp_path):
    (tmp_path / "r.yaml").write_text("name: bad\nsource: {synthetic: {context_length: 4096}}\nvariants: [{type: Q8_0}]\n"
                                     "smoke: {context_sweep: [2048, 8192], max_tokens: 16}\n")
    with pytest.raises(UsageError) as ei:
        pipeline.make_plan(rcp.load(tmp_path / "r.yaml"), tmp_path / "out", toolchain)
    assert ei.value.one_line() == ("bad-BF16.gguf: context sweep length 8192 is longer than the 4096 tokens the model "
                                   "was trained for (qwen35moe.context_length) (use lengths up to 4096)")
    assert not list((tmp_path / "out").glob("bad-*.gguf"))


def test_the_synthetic_default_allows_a_sweep_to_128k():
    assert synth.SynthSpec().context_length == synth.PRESETS["qwen3.6-35b-a3b"]["context_length"] == 262144


BASE = "name: t\nsource: {synthetic: {}}\nvariants: [{type: Q4_K_M}]\n"


def load(tmp_path: Path, text: str) -> rcp.Recipe:
    (tmp_path / "r.yaml").write_text(BASE + text)
    return rcp.load(tmp_path / "r.yaml")


@pytest.mark.parametrize("text, problem", [
    ("smoke: {long_documents: [nope.txt]}",
     "smoke.long_documents[0]: file not found: {d}/nope.txt (paths are relative to the recipe's folder)"),
    ("smoke: {long_documents: doc.txt}",
     ("smoke.long_documents: expected a non-empty list of file paths, got a string (e.g. long_documents: "
     "[docs/manual.txt])")),
    ("smoke: {long_documents: [doc.txt, ./doc.txt]}",
     "smoke.long_documents: names a file twice (each document is measured once per length)"),
    ("smoke: {context_documents: 0}", "smoke.context_documents: 0 is out of range (use a value from 1 to 1000)"),
    ("smoke: {context_k1: yes please}", "smoke.context_k1: expected true or false, got a string 'yes please'"),
])
def test_recipe_sweep_fields_refused(tmp_path, text, problem):
    (tmp_path / "doc.txt").write_text("A document.\n")
    with pytest.raises(RecipeError) as ei:
        load(tmp_path, text)
    assert ei.value.problems == [f"{tmp_path / 'r.yaml'}: " + problem.format(d=tmp_path)]


def test_recipe_sweep_fields_and_the_fit_at_the_same_lengths(tmp_path):
    (tmp_path / "doc.txt").write_text("A document.\n")
    r = load(tmp_path, "smoke: {context_sweep: [65536, 4096], context_documents: 12, context_k1: true, "
                       "long_documents: [doc.txt]}")
    s = r.smoke
    assert (s.context_sweep, s.context_documents, s.context_k1, s.long_documents) == (
        (65536, 4096), 12, True, (tmp_path / "doc.txt",))
    assert r.fit.ctx == (4096, 65536)
    assert load(tmp_path, "smoke: {context_sweep: [4096]}\nfit: {ctx: [2048, 8192]}").fit.ctx == (2048, 4096, 8192)
    assert load(tmp_path, "").fit.ctx == rcp.FitSpec.ctx and load(tmp_path, "").smoke.context_documents == 10


# ----------------------------------------------------------------------------------------------- hand-made receipts

def made_sweep(per_length: dict[int, tuple], docs: int = 3, jitter: float = 0.0, k: int = K) -> dict:
    """A context sweep whose every document at length L measured (vanilla prompt ms, vanilla tok/s, MTP prompt
    ms, MTP tok/s) = per_length[L], the MTP side's times multiplied by (1 + jitter) on even documents and divided
    by it on odd ones (so that the geometric mean over an even number of documents is the one of no jitter)."""
    requests, rows = [], []
    for L, (pv, dv, pm, dm) in per_length.items():
        for d in range(docs):
            f = (1 + jitter) ** (1 if d % 2 == 0 else -1)
            for arm, p, rate in (("vanilla", pv, dv), (f"k{k}", pm * f, dm / f)):
                requests.append({"arm": arm, "ctx": L, "document": d, "finish_reason": "length", "text": "x",
                                 "timings": {"prompt_n": L - 100, "prompt_ms": p, "prompt_per_second": 1000 * L / p,
                                             "predicted_n": 256, "predicted_per_second": rate,
                                             "predicted_ms": 256 * 1000 / rate}})
        rows.append({"ctx": L})
    return {"method": pays.METHOD, "k": k, "lengths": list(per_length), "documents_per_length": docs,
            "arms": [{"label": "vanilla", "draft_n_max": None}, {"label": f"k{k}", "draft_n_max": k}],
            "requests": requests, "rows": rows}


def advice(per_length: dict[int, tuple], **kw) -> tuple[list[dict], str]:
    (arm,) = pays.analyse(made_sweep(per_length, **kw))["arms"]
    return arm["lengths"], pays.recommendation(arm)


FLAG = "`--spec-type draft-mtp` (`--spec-draft-n-max 3`)"
FEW = " From 3 document(s) per length: n too small for an interval, so this rests on point estimates."


def test_mtp_pays_everywhere():
    lengths, text = advice({4096: (400.0, 50.0, 380.0, 80.0), 32768: (4000.0, 40.0, 3900.0, 60.0)})
    assert [e["verdict"] for e in lengths] == [{"kind": "always", "tokens": None}] * 2
    assert text == (f"Enable {FLAG} for prompts up to 32,668 tokens: at every length measured (3,996 to 32,668 "
                    "prompt tokens) it saved end-to-end time for every output length." + FEW)


def test_mtp_never_pays():
    lengths, text = advice({4096: (400.0, 50.0, 500.0, 45.0), 131072: (20000.0, 30.0, 26000.0, 29.0)})
    assert [e["verdict"]["kind"] for e in lengths] == ["never", "never"]
    assert text == (f"Leave {FLAG} off: at every length measured (3,996 to 130,972 prompt tokens) it cost more "
                    "end-to-end time than it saved, for every output length." + FEW)


def test_break_even_output_length_is_where_decode_pays_back_prefill():
    # vanilla: 1000 ms to the first token, then 20 ms for each further token; MTP: 1505 ms, then 10 ms: equal
    # after 50.5 further tokens, so an output of 52 tokens is the first that MTP finishes sooner
    (e,), _ = advice({32768: (1000.0, 50.0, 1505.0, 100.0)})
    assert e["verdict"] == {"kind": "over", "tokens": 52}
    cells = e["cells"]
    assert cells[64]["value"] == pytest.approx((1000 + 63 * 20) / (1505 + 63 * 10), abs=1e-4)
    assert cells[4096]["value"] == pytest.approx((1000 + 4095 * 20) / (1505 + 4095 * 10), abs=1e-4)
    assert e["first_token"] == pytest.approx(1000 / 1505) and e["decode_only"] == pytest.approx(2.0)
    # a tie (51 tokens take 2000 ms on both) is not a gain
    assert pays.break_even(*[np.array([x]) for x in (1000.0, 20.0, 1500.0, 10.0)]) == {"kind": "over", "tokens": 52}


def test_break_even_between_lengths():
    lengths, text = advice({4096: (400.0, 50.0, 390.0, 80.0),        # pays everywhere
                            32768: (4000.0, 40.0, 4505.0, 80.0),     # 505 ms slower first token, 12.5 ms/token won
                            131072: (20000.0, 30.0, 23005.0, 40.0)})  # 3005 ms slower, 8.33 ms/token won
    assert [e["verdict"] for e in lengths] == [{"kind": "always", "tokens": None}, {"kind": "over", "tokens": 42},
                                              {"kind": "over", "tokens": 362}]
    assert 1 + math.ceil(505 / 12.5) == 42 and 1 + math.ceil(3005 / (1000 / 30 - 1000 / 40)) == 362
    assert text == (f"Enable {FLAG} for prompts up to 3,996 tokens; above, it costs more than it saves for outputs "
                    "under 362 tokens (at 32,668 prompt tokens it costs more than it saves for outputs under 42 "
                    "tokens; at 130,972 prompt tokens it costs more than it saves for outputs under 362 tokens)." + FEW)


def test_pays_at_short_prompts_and_never_at_the_longest():
    _, text = advice({4096: (400.0, 50.0, 390.0, 80.0), 131072: (20000.0, 30.0, 26000.0, 29.0)})
    assert text == (f"Enable {FLAG} for prompts up to 3,996 tokens; above (measured at 130,972 tokens), it costs "
                    "more than it saves for every output length." + FEW)


def test_only_long_outputs_pay_even_at_the_shortest_prompt():
    lengths, text = advice({4096: (400.0, 50.0, 451.0, 100.0), 32768: (4000.0, 40.0, 4601.0, 50.0)})
    assert [e["verdict"] for e in lengths] == [{"kind": "over", "tokens": 7}, {"kind": "over", "tokens": 122}]
    assert text == (f"Whether {FLAG} pays depends on prompt and output length: at 3,996 prompt tokens it costs more "
                    "than it saves for outputs under 7 tokens; at 32,668 prompt tokens it costs more than it saves "
                    "for outputs under 122 tokens." + FEW)


def test_intervals_need_ten_documents():
    per = {32768: (1000.0, 50.0, 1505.0, 100.0)}
    (few,), _ = advice(per, docs=4, jitter=0.05)
    assert few["cells"][1024]["ci95"] is None
    assert few["cells"][1024]["note"] == "n too small for an interval: 4 documents"
    (many,), _ = advice(per, docs=12, jitter=0.05)
    lo, hi = many["cells"][1024]["ci95"]
    assert lo < many["cells"][1024]["value"] < hi and many["cells"][1024]["n"] == 12
    (same,), _ = advice(per, docs=12)
    assert same["cells"][1024]["note"] == "identical on all 12 documents"


def test_card_section_from_a_hand_made_receipt():
    sweep = made_sweep({4096: (400.0, 50.0, 390.0, 80.0), 32768: (4000.0, 40.0, 4505.0, 80.0)}, docs=12, jitter=0.02)
    for row in sweep["rows"]:  # the measured table's figures, as the sweep writes them
        L = row["ctx"]
        row.update(prompt_tokens={"value": L - 100.0, "ci95": None}, arms={
            "vanilla": {f: {"value": 1.0, "ci95": None} for f in ("decode_tok_s", "prefill_tok_s", "ttft_ms", "e2e_ms")},
            f"k{K}": {**{f: {"value": 1.0, "ci95": None} for f in ("decode_tok_s", "prefill_tok_s", "ttft_ms", "e2e_ms",
                                                                   "decode_speedup", "prefill_speedup", "e2e_speedup")},
                      "acceptance": {"value": 0.75, "ci95": None}}})
    sweep.update(max_tokens=256, reserve_tokens=64, seed=42, servers=[],
                 source={"kind": "stdlib", "python": "3.11.7"})
    view = pays.pays_view(Node({"context_sweep": sweep, "settings": {"spec": {}}}, "receipts/smoke-Q4_K_M.json"))
    assert "12 document(s) per length" in view["intro"] and "intervals are 95% BCa bootstrap CIs" in view["intro"]
    grid = view["tables"][1]["table"].splitlines()
    assert grid[0] == ("| Context | Prompt tokens | Documents | 64 out | 256 out | 1024 out | 4096 out | "
                       "First token only | Decode only | MTP pays for |")
    assert grid[2].startswith("| 4096 | 3,996 | 12 | ") and grid[2].endswith(" | every output length |")
    assert grid[3].endswith(" | outputs of 42 tokens or more |")
    assert view["recommendations"] == [
        (f"**k=3:** Enable {FLAG} for prompts up to 3,996 tokens; above, it costs more than it saves for outputs under "
        "42 tokens (at 32,668 prompt tokens it costs more than it saves for outputs under 42 tokens).")]
