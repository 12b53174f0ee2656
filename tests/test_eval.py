"""mtpquant.eval: KLD/PPL of a variant against its BF16 source, with the real llama-perplexity."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
import subprocess

import pytest
from click.testing import CliRunner
from helpers import gone_within, receipt_json, source_receipt

from mtpquant.cli.app import Group
from mtpquant.cli.cmd_measure import eval_ as eval_cmd
from mtpquant.core.errors import EvalError
from mtpquant.core.files import sha256_file
from mtpquant.core.procs import run_tool
from mtpquant.core.rundir import RunDir
from mtpquant.llamacpp import perplexity
from mtpquant.llamacpp.toolchain import Toolchain
from mtpquant.measure import kld as ev

CTX, CHUNKS = 128, 4


@pytest.fixture(scope="module")
def base(tiny_pair, toolchain) -> ev.BaseLogits:
    d = tiny_pair["dir"]
    return ev.kld_base_info(toolchain, tiny_pair["BF16"], ev.default_text(), CTX, CHUNKS, d / "base.kld", d / "base.log")


def test_shipped_text_is_there():
    assert ev.default_text().is_file()
    assert ev.default_text().stat().st_size > 10_000


def test_kld_and_ppl_of_a_q4_k_m_variant(tiny_pair, base, toolchain, tmp_path):
    r = ev.eval_variant(toolchain, tiny_pair["BF16"], tiny_pair["Q4_K_M"], base, ev.default_text(), CTX, CHUNKS,
                        tmp_path / "eval.log")
    assert r["file"] == "tiny-Q4_K_M.gguf" and r["source"] == "tiny-BF16.gguf"
    assert r["text"] == {"file": "wiki-style-v1.txt", "sha256": sha256_file(ev.default_text())}
    st = r["stats"]
    assert (r["ctx"], r["batch"], r["chunks"], st["chunks_evaluated"]) == (CTX, CTX, CHUNKS, CHUNKS)
    assert 0 < st["kld_mean"] < 1 and 0 < st["kld_mean_err"] < st["kld_mean"]
    assert st["kld_median"] <= st["kld_p99"] <= st["kld_max"]
    assert st["ppl_base"] > 1 and st["ppl_q"] > 1
    assert st["ppl_ratio"] == pytest.approx(st["ppl_q"] / st["ppl_base"], rel=1e-4)
    assert 0 < st["same_top_share"] <= 1 and st["same_top_share_err"] > 0
    assert r["commands"]["variant"] == ["llama-perplexity", "-m", str(tiny_pair["Q4_K_M"]), "-f", str(ev.default_text()),
                                        "-c", "128", "-b", "128", "--chunks", "4", "--kl-divergence-base",
                                        str(base.path), "--kl-divergence"]
    assert r["commands"]["base"][-2:] == ["--kl-divergence-base", str(base.path)]
    assert "-b" in r["commands"]["base"] and r["base_logits"]["key"] == base.key
    assert r["env"] == {"OMP_WAIT_POLICY": "passive", "log_drain": perplexity.log_drain_library().name}
    assert re.fullmatch(r"logdrain-[0-9a-f]{16}\.so", r["env"]["log_drain"])
    json.dumps(r)


def test_base_logits_are_reused_for_the_same_key_only(tiny_pair, base, toolchain):
    d = tiny_pair["dir"]
    again = ev.kld_base_info(toolchain, tiny_pair["BF16"], ev.default_text(), CTX, CHUNKS, d / "base.kld", d / "base.log")
    assert again.reused and again.key == base.key
    assert ev.base_key(toolchain, "0" * 64, ev.default_text(), CTX, CHUNKS + 1) != \
        ev.base_key(toolchain, "0" * 64, ev.default_text(), CTX, CHUNKS)
    sidecar = json.loads((d / "base.kld.json").read_text())
    assert sidecar["key"] == base.key and sidecar["bytes"] == (d / "base.kld").stat().st_size


def test_too_few_scored_tokens_is_an_error_although_the_exit_code_is_0(tiny_pair, toolchain, tmp_path):
    """One chunk of 128 scores 63 tokens; llama-perplexity prints statistics only from 100 on, and exits 0."""
    b = ev.kld_base_info(toolchain, tiny_pair["BF16"], ev.default_text(), 128, 1, tmp_path / "b.kld", tmp_path / "b.log")
    log = tmp_path / "q.log"
    with pytest.raises(EvalError) as e:
        ev.eval_variant(toolchain, tiny_pair["BF16"], tiny_pair["Q4_K_M"], b, ev.default_text(), 128, 1, log)
    assert e.value.one_line() == (
        f"llama-perplexity printed no '====== Perplexity statistics ======' section for tiny-Q4_K_M.gguf "
        f"(exit code 0, 1 run(s)); log: {log} (it prints statistics only for >= 100 scored tokens "
        f"and 1 chunk(s) of 128 score 63: raise chunks or ctx)")
    assert "# exited with code 0" in log.read_text()


FAKE = """#!/bin/sh
# prints the chunk table of a KLD run, then exits 0 without the statistics (as when its log is cut short)
echo "kl_divergence: computing over 4 chunks, n_ctx=128, batch_size=128, n_seq=1" >&2
echo ""
echo "chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p"
for i in 1 2 3 4; do
  echo "   $i     343.1061 ±   13.4450       0.01478 ±    0.00900       0.00271 ±    0.00034     0.023 ±  0.002 %    87.302 ±  4.229 %"
done
exit 0
"""


def test_missing_statistics_with_exit_code_0_is_retried_then_an_error(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "llama-perplexity"
    fake.write_text(FAKE)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    tc = Toolchain(bin_dir, "test")
    for name in ("src.gguf", "q.gguf", "base.kld", "text.txt"):
        (tmp_path / name).write_bytes(b"x")
    log = tmp_path / "q.log"
    with pytest.raises(EvalError) as e:
        ev.eval_variant(tc, tmp_path / "src.gguf", tmp_path / "q.gguf", tmp_path / "base.kld", tmp_path / "text.txt",
                        128, 4, log)
    assert e.value.one_line() == (
        f"llama-perplexity printed no '====== Perplexity statistics ======' section for q.gguf "
        f"(exit code 0, 5 run(s)); log: {log} (its output was cut short (llama.cpp does not flush "
        f"its log at exit); run the step again)")
    assert log.read_text().count("$ ") == 5


def test_the_statistics_outlive_a_log_thread_still_busy_at_exit(tiny_pair, base, toolchain):
    """llama.cpp's log thread writes the statistics, and exit used to kill it with them still queued. Here it is held
    up by a pipe nobody reads yet (smaller than the run's output): without the preloaded drain the run exits at once
    and what was queued is gone; with it the run waits at exit until everything was read."""
    assert perplexity.log_drain_library() is not None
    argv = perplexity.perplexity_argv(toolchain, tiny_pair["Q4_K_M"], ev.default_text(), CTX, CHUNKS, base.path, True)
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)  # -lv 4 makes the output 4 times as long
    with open(r, "rb") as out:
        proc = subprocess.Popen([str(a) for a in [*argv, "-lv", "4"]], stdin=subprocess.DEVNULL, stdout=w, stderr=w,
                                env=perplexity.perplexity_env())
        os.close(w)
        exited_unread = gone_within(lambda: proc.poll() is None, grace=1.5)
        text = out.read().decode(errors="replace")
    assert proc.wait(timeout=60) == 0 and not exited_unread
    assert perplexity.parse_kld_output(text)["chunks_evaluated"] == CHUNKS
    assert "llama_perf_context_print:" in text  # logged after the statistics


def test_statistics_cut_off_midway_are_an_error(tiny_pair, base, toolchain, tmp_path):
    argv = perplexity.perplexity_argv(toolchain, tiny_pair["Q4_K_M"], ev.default_text(), CTX, CHUNKS, base.path, True)
    r = run_tool(argv, log_path=tmp_path / "full.log", env=perplexity.perplexity_env())  # one run: nothing is lost
    full = perplexity.parse_kld_output(r.stdout)
    assert full["chunks_evaluated"] == CHUNKS
    cut = r.stdout[:r.stdout.index("Mean    KLD:")]
    with pytest.raises(EvalError) as e:
        perplexity.parse_kld_output(cut + "====== KL divergence statistics ======\n", tmp_path / "x.log")
    assert e.value.one_line() == (f"llama-perplexity statistics lack kld_mean, same_top_pct; log: {tmp_path / 'x.log'}"
                                  " (its output was cut short; run the step again)")


def test_eval_run_writes_receipts_and_skips_unchanged_variants(tiny_pair, toolchain, tmp_path):
    run = RunDir(tmp_path / "run")
    run.ensure()
    (run.root / "source").mkdir()
    shutil.copy(tiny_pair["BF16"], run.root / "source" / "demo-BF16.gguf")
    shutil.copy(tiny_pair["Q4_K_M"], run.root / "demo-Q4_K_M.gguf")
    run.write(source_receipt("demo-BF16.gguf", sha256_file(tiny_pair["BF16"]),
                             str(run.root / "source" / "demo-BF16.gguf")))
    run.write_manifest({"name": "demo"})
    run.write_sha256sums({"demo-Q4_K_M.gguf": sha256_file(tiny_pair["Q4_K_M"])})
    first = ev.eval_run(toolchain, run.root, ctx=CTX, chunks=CHUNKS)
    receipt = receipt_json(run, "eval", "Q4_K_M")
    assert list(first) == ["Q4_K_M"] and receipt["stats"]["kld_mean"] == first["Q4_K_M"].stats["kld_mean"]
    assert receipt["source_sha256"] == sha256_file(tiny_pair["BF16"]) and receipt["variant_sha256"]
    assert (run.logs / "eval-base.log").is_file() and (run.logs / "eval-Q4_K_M.log").is_file()
    assert len(list((run.work / "eval").glob("base-*.kld"))) == 1
    again = ev.eval_run(toolchain, run.root, ctx=CTX, chunks=CHUNKS)
    assert again["Q4_K_M"] == first["Q4_K_M"] and receipt_json(run, "eval", "Q4_K_M") == receipt


def _cli():
    group = Group("mtpquant")
    group.add_command(eval_cmd)
    return group


def test_cli_eval_of_a_single_gguf_needs_the_source(tiny_pair, llama_env):
    r = CliRunner().invoke(_cli(), ["eval", str(tiny_pair["Q4_K_M"])], env=llama_env)
    assert r.exit_code == 2
    assert r.output.strip() == ("error: evaluating a single GGUF needs --source BF16.gguf "
                                "(give the file it was quantized from)")


def test_cli_eval_of_a_single_gguf(tiny_pair, llama_env, tmp_path):
    env = {**llama_env, "MTPQUANT_CACHE": str(tmp_path / "cache")}
    r = CliRunner().invoke(_cli(), ["eval", str(tiny_pair["Q4_K_M"]), "--source", str(tiny_pair["BF16"]), "--ctx", "128",
                                    "--chunks", "4", "--json"], env=env)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["stats"]["chunks_evaluated"] == 4 and data["stats"]["kld_mean"] > 0
    assert os.path.isfile(tmp_path / "cache" / "eval" / "tiny-Q4_K_M.log")
    # this random model's text tokens are within the KLD pass's floor: its PPL(base) is the source's own
    r = CliRunner().invoke(_cli(), ["eval", str(tiny_pair["Q4_K_M"]), "--source", str(tiny_pair["BF16"]), "--ctx", "128",
                                    "--chunks", "4"], env=env)
    assert r.exit_code == 0, r.output
    st = data["stats"]
    assert st["ppl_base"] == pytest.approx(data["base_logits"]["ppl"], rel=1e-3)
    row = next(line for line in r.output.splitlines() if line.startswith("tiny-Q4_K_M "))
    assert f"{st['ppl_ratio']:.5f} ± {st['ppl_ratio_err']:.5f}" in row and "source's own pass" not in r.output


def test_text_output_divides_by_the_sources_own_ppl_where_the_kld_pass_floored_it():
    result = {"stats": {"kld_mean": 0.0, "kld_mean_err": 0.0, "ppl_q": 9.0e7, "ppl_base": 5.6e6, "ppl_ratio": 16.07,
                        "ppl_ratio_err": 0.57, "same_top_share": 1.0, "same_top_share_err": 0.0,
                        "chunks_evaluated": 8},
              "base_logits": {"ppl": 1.0e8}, "text": {"file": "t.txt", "sha256": "ab" * 32}, "ctx": 256}
    assert ev.format_results({"Q4_K_M": result}).splitlines()[1:] == [
        "Q4_K_M         0.000000 ± 0.000000       9e+07      0.90000 (no ±)  100.00 ± 0.00 %",
        "text t.txt (sha256 abababababab), ctx 256, 8 chunk(s); PPL(base) 1e+08",
        "PPL(base) is the source's own pass: the text has tokens more than 16 nats below the source's top logit, "
        "where the KLD pass floors the stored base (its ratio would be wrong)"]
