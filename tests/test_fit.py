"""mtpquant.fit: the offline memory estimate, its verdicts, and a cross-check against llama-server's own log."""

from __future__ import annotations

import json
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import quantize_receipt

from mtpquant.cli.app import Group
from mtpquant.cli.cmd_measure import fit as fit_cmd
from mtpquant.core.files import sha256_file
from mtpquant.core.rundir import RunDir
from mtpquant.measure import fit
from mtpquant.modelfile.model import read_model
from mtpquant.quant.plan import TensorPlan

MiB = 1 << 20
GiB = 1 << 30


# A header-only model shaped like Qwen3.6-35B-A3B (40 + 1 blocks, 256 experts of which 8 are used, every 4th layer
# full attention), at ~4.9 bits per weight: big enough for verdicts that differ across 12..32 GB.
ARCH = "qwen35moe"
BIG_KV = {
    f"{ARCH}.block_count": 41, f"{ARCH}.nextn_predict_layers": 1, f"{ARCH}.embedding_length": 2048,
    f"{ARCH}.attention.head_count": 16, f"{ARCH}.attention.head_count_kv": 2, f"{ARCH}.attention.key_length": 256,
    f"{ARCH}.attention.value_length": 256, f"{ARCH}.full_attention_interval": 4, f"{ARCH}.expert_count": 256,
    f"{ARCH}.expert_used_count": 8, f"{ARCH}.expert_feed_forward_length": 512,
    f"{ARCH}.ssm.conv_kernel": 4, f"{ARCH}.ssm.state_size": 128, f"{ARCH}.ssm.group_count": 16,
    f"{ARCH}.ssm.time_step_rank": 32, f"{ARCH}.ssm.inner_size": 4096,
}


def _big_tensors(bpw: float = 4.9) -> list[tuple[str, tuple[int, ...], str, int]]:
    def t(name, *shape):
        n = 1
        for s in shape:
            n *= s
        return (name, shape, "Q4_K", int(n * bpw / 8))

    out = [t("token_embd.weight", 2048, 248320), t("output.weight", 2048, 248320), t("output_norm.weight", 2048)]
    for b in range(41):
        out += [t(f"blk.{b}.ffn_gate_exps.weight", 2048, 512, 256), t(f"blk.{b}.ffn_up_exps.weight", 2048, 512, 256),
                t(f"blk.{b}.ffn_down_exps.weight", 512, 2048, 256), t(f"blk.{b}.ffn_gate_inp.weight", 2048, 256),
                t(f"blk.{b}.ffn_up_shexp.weight", 2048, 512), t(f"blk.{b}.ffn_gate_shexp.weight", 2048, 512),
                t(f"blk.{b}.ffn_down_shexp.weight", 512, 2048), t(f"blk.{b}.attn_norm.weight", 2048)]
        if b == 40 or (b + 1) % 4 == 0:
            out += [t(f"blk.{b}.attn_q.weight", 2048, 8192), t(f"blk.{b}.attn_k.weight", 2048, 512),
                    t(f"blk.{b}.attn_v.weight", 2048, 512), t(f"blk.{b}.attn_output.weight", 4096, 2048)]
        else:
            out += [t(f"blk.{b}.attn_qkv.weight", 2048, 8192), t(f"blk.{b}.attn_gate.weight", 2048, 4096),
                    t(f"blk.{b}.ssm_out.weight", 4096, 2048)]
    out += [t("blk.40.nextn.eh_proj.weight", 4096, 2048), t("blk.40.nextn.enorm.weight", 2048)]
    return out


RANK = {"fits": 0, "n-cpu-moe": 1, "no": 10_000}


def _rank(row: dict) -> int:
    return RANK[row["fit"]] + (row["n_cpu_moe"] or 0)


# ----------------------------------------------------------------------------------------------- table

def test_table_has_a_row_per_gpu_ctx_and_kv_type(tiny_pair):
    table = fit.fit_table(read_model(tiny_pair["Q4_K_M"]), vram_gb=[12, 16, 24, 32], ctx=[4096, 32768, 131072],
                          kv_types=["f16", "q8_0"])
    assert len(table["rows"]) == 4 * 3 * 2
    assert {(r["vram_gb"], r["ctx"], r["kv_type"]) for r in table["rows"]} == {
        (g, c, k) for g in (12, 16, 24, 32) for c in (4096, 32768, 131072) for k in ("f16", "q8_0")}
    assert [(n["ctx"], n["kv_type"]) for n in table["needs"]] == [
        (c, k) for c in (4096, 32768, 131072) for k in ("f16", "q8_0")]
    assert all(r["fit"] == "fits" and r["text"] == "fits" for r in table["rows"])  # a 2 MiB model
    assert table["mtp"] is True and table["file"] == "tiny-Q4_K_M.gguf"
    json.dumps(table)


def test_kv_cache_counts_only_full_attention_layers(tiny_pair):
    info = read_model(tiny_pair["BF16"])
    assert info.kv["qwen35moe.attention.recurrent_layers"] == [True, False, False]
    table = fit.fit_table(info, vram_gb=[12], ctx=[4096], kv_types=["f16", "q8_0"])
    f16, q8 = table["needs"]
    # one trunk layer (blk.1) attends: 4096 cells x (K + V) x 1 KV head x 64; the NextN block has its own cache
    assert f16["kv_mib"] == 4096 * 2 * 64 * 2 / MiB == 1.0
    assert q8["kv_mib"] == round(4096 * 2 * 68 / MiB, 2)  # q8_0: 34 bytes per 32 values
    assert f16["mtp_kv_mib"] == 1.0
    # blk.0's gated delta net: 4 slots x (1 + 3 draft snapshots) rows of F32 (3 x 512 conv + 64 x 256 state)
    assert f16["recurrent_mib"] == round(16 * 4 * (3 * 512 + 64 * 256) / MiB, 2)
    assert table["model"]["attention_layers"] == 1 and table["model"]["recurrent_layers"] == 1


def test_without_mtp_the_nextn_block_and_draft_context_are_left_out(tiny_pair):
    info = read_model(tiny_pair["Q4_K_M"])
    on = fit.fit_table(info, vram_gb=[12], ctx=[4096], kv_types=["f16"], mtp=True)
    off = fit.fit_table(info, vram_gb=[12], ctx=[4096], kv_types=["f16"], mtp=False)
    nextn = sum(t.n_bytes for t in info.tensors if t.block == 2)
    assert on["weights"]["nextn_mib"] == round(nextn / MiB, 2)
    assert off["weights"]["nextn_mib"] == 0
    assert round(on["weights"]["total_mib"] - off["weights"]["total_mib"], 2) == pytest.approx(nextn / MiB, abs=0.02)
    assert off["needs"][0]["mtp_kv_mib"] == 0 and off["needs"][0]["mtp_compute_mib"] == 0
    assert off["needs"][0]["recurrent_mib"] == pytest.approx(on["needs"][0]["recurrent_mib"] / 4, abs=0.01)
    assert len(on["weights"]["experts_per_block_mib"]) == 3 and len(off["weights"]["experts_per_block_mib"]) == 2


def test_token_embeddings_stay_on_the_cpu(tiny_pair):
    info = read_model(tiny_pair["Q4_K_M"])
    table = fit.fit_table(info, vram_gb=[12], ctx=[4096], kv_types=["f16"])
    emb = info.tensor("token_embd.weight").n_bytes
    assert table["weights"]["host_fixed_mib"] == round(emb / MiB, 2)
    need = table["needs"][0]
    assert need["total_mib"] == pytest.approx(table["weights"]["total_mib"] - emb / MiB + need["kv_mib"]
                                              + need["recurrent_mib"] + need["mtp_kv_mib"] + need["compute_mib"]
                                              + need["mtp_compute_mib"], abs=0.05)


# ----------------------------------------------------------------------------------------------- verdicts

@pytest.fixture(scope="module")
def big() -> dict:
    return fit.fit_from_tensors(ARCH, BIG_KV, _big_tensors(), vram_gb=[4, 8, 12, 16, 24, 32, 48],
                                ctx=[4096, 32768, 131072], kv_types=["f16", "q8_0", "q4_0"])


def test_more_vram_is_never_worse(big):
    for c in (4096, 32768, 131072):
        for k in ("f16", "q8_0", "q4_0"):
            rows = sorted((r for r in big["rows"] if r["ctx"] == c and r["kv_type"] == k), key=lambda r: r["vram_gb"])
            ranks = [_rank(r) for r in rows]
            assert ranks == sorted(ranks, reverse=True), (c, k, [r["text"] for r in rows])


def test_more_context_and_wider_kv_are_never_better(big):
    for g in (4, 8, 12, 16, 24, 32, 48):
        for k in ("f16", "q8_0", "q4_0"):
            ranks = [_rank(r) for c in (4096, 32768, 131072) for r in big["rows"]
                     if r["vram_gb"] == g and r["kv_type"] == k and r["ctx"] == c]
            assert ranks == sorted(ranks), (g, k)
        for c in (4096, 32768, 131072):
            ranks = [_rank(r) for k in ("q4_0", "q8_0", "f16") for r in big["rows"]
                     if r["vram_gb"] == g and r["kv_type"] == k and r["ctx"] == c]
            assert ranks == sorted(ranks), (g, c)


def test_a_35b_moe_spans_every_verdict(big):
    by = {(r["vram_gb"], r["ctx"], r["kv_type"]): r for r in big["rows"]}
    assert by[(32, 4096, "f16")]["text"] == "fits"
    assert by[(16, 32768, "q8_0")]["fit"] == "n-cpu-moe"
    assert by[(16, 32768, "q8_0")]["text"] == f"fits with --n-cpu-moe {by[(16, 32768, 'q8_0')]['n_cpu_moe']}"
    assert by[(24, 131072, "f16")]["text"] == "fits with --n-cpu-moe 3"
    assert by[(4, 131072, "f16")]["text"] == "does not fit"
    # 41 blocks of experts can go to the CPU: the NextN block's too
    assert len(big["weights"]["experts_per_block_mib"]) == 41


def test_n_cpu_moe_is_the_smallest_count_that_fits():
    need = fit.Need(ctx=4096, kv_type="f16", weights=2 * GiB, host_weights=GiB // 4, experts=(GiB,) * 6, kv=GiB // 2, recurrent=0,
                    mtp_kv=0, compute=GiB // 2, mtp_compute=0)  # 3 GiB fixed + 6 x 1 GiB experts
    s = fit.ServerSettings(reserve_mib=1024)
    cases = {10.0: (0, "fits"), 9.0: (1, "fits with --n-cpu-moe 1"), 6.5: (4, "fits with --n-cpu-moe 4"),
             4.0: (6, "fits with --n-cpu-moe 6"), 3.9: (None, "does not fit")}
    for gb, (n, text) in cases.items():
        row = fit.verdict(need, gb, s)
        assert (row["n_cpu_moe"], row["text"]) == (n, text), gb
    assert fit.verdict(need, 6.5, s)["gpu_mib"] == (3 + 2) * 1024
    assert fit.verdict(need, 6.5, s)["host_weights_mib"] == 4 * 1024 + 256


def test_a_dense_model_without_hybrid_keys_treats_every_layer_as_attention():
    kv = {"llama.block_count": 4, "llama.embedding_length": 512, "llama.attention.head_count": 8,
          "llama.attention.head_count_kv": 2, "llama.feed_forward_length": 1024}
    tensors = [("token_embd.weight", (512, 1000), "F16", 1_024_000), ("output.weight", (512, 1000), "F16", 1_024_000)]
    tensors += [(f"blk.{b}.attn_q.weight", (512, 512), "F16", 524_288) for b in range(4)]
    table = fit.fit_from_tensors("llama", kv, tensors, vram_gb=[1], ctx=[1024], kv_types=["f16"])
    assert table["model"]["attention_layers"] == 4 and table["model"]["recurrent_layers"] == 0
    assert table["needs"][0]["kv_mib"] == 4 * 1024 * 2 * (2 * 64) * 2 / MiB
    assert table["needs"][0]["recurrent_mib"] == 0 and table["mtp"] is False
    assert table["rows"][0]["fit"] == "no"  # 1 GiB less the 1 GiB reserve: nothing fits, and no experts to move


def test_fit_from_plan_equals_fit_of_the_written_file(tiny_pair):
    q = read_model(tiny_pair["Q4_K_M"])
    src = read_model(tiny_pair["BF16"])
    plans = [TensorPlan(t.name, "BF16", t.shape, t.type, t.type, None, False, t.n_bytes) for t in q.tensors]
    from_plan = fit.fit_from_plan(src, plans, vram_gb=[12, 16], ctx=[4096, 131072], kv_types=["f16"])
    from_file = fit.fit_table(q, vram_gb=[12, 16], ctx=[4096, 131072], kv_types=["f16"])
    assert from_plan["rows"] == from_file["rows"] and from_plan["needs"] == from_file["needs"]


# ----------------------------------------------------------------------------------------------- llama.cpp itself

BUFFER_RE = re.compile(r"(?P<what>\S+)\s+(?P<kind>model|KV|RS|compute) buffer size =\s*(?P<mib>[\d.]+) MiB")


def _server_buffers(toolchain, model: Path, ctx: int, log: Path) -> dict[str, list[float]]:
    """Start llama-server with MTP, collect its buffer-size lines until it listens, stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [str(toolchain.tool("llama-server")), "-m", str(model), "-c", str(ctx), "--spec-type", "draft-mtp",
            "--no-repack", "-lv", "4", "-t", "2", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    found: dict[str, list[float]] = {"model": [], "KV": [], "RS": [], "compute": []}
    text = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            text.append(line)
            if (m := BUFFER_RE.search(line)) and m.group("what") != "CPU_REPACK":
                found[m.group("kind")].append(float(m.group("mib")))
            if "listening on" in line:
                break
    finally:
        proc.terminate()  # it may ignore SIGTERM for a while right after start-up
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.write_text("".join(text))
    assert found["compute"], f"no buffer lines from llama-server; log: {log}"
    return found


@pytest.mark.parametrize("ctx", [4096, 32768])
def test_estimate_matches_server_log(tiny_pair, toolchain, tmp_path, ctx):
    """llama-server's load log (CPU build, MTP on, default 4 slots) against the offline estimate."""
    got = _server_buffers(toolchain, tiny_pair["Q4_K_M"], ctx, tmp_path / "server.log")
    table = fit.fit_table(read_model(tiny_pair["Q4_K_M"]), vram_gb=[12], ctx=[ctx], kv_types=["f16"])
    need, w = table["needs"][0], table["weights"]
    assert len(got["KV"]) == 2 and len(got["RS"]) == 1 and len(got["compute"]) >= 2  # target + MTP context
    assert sum(got["model"]) == pytest.approx(w["total_mib"], abs=0.01)
    assert got["KV"] == [need["kv_mib"], need["mtp_kv_mib"]]
    assert got["RS"][0] == pytest.approx(need["recurrent_mib"], abs=0.01)
    server_compute, server_draft = got["compute"][0], max(got["compute"][1:])
    assert need["compute_mib"] == pytest.approx(server_compute, rel=0.20)
    assert need["mtp_compute_mib"] == pytest.approx(server_draft, rel=0.20)
    server_total = sum(got["model"]) + sum(got["KV"]) + sum(got["RS"]) + server_compute + server_draft
    estimate = w["total_mib"] + need["kv_mib"] + need["mtp_kv_mib"] + need["recurrent_mib"] \
        + need["compute_mib"] + need["mtp_compute_mib"]
    assert estimate == pytest.approx(server_total, rel=0.10), (estimate, server_total)


# ----------------------------------------------------------------------------------------------- run dirs and CLI

def _run_dir(tmp_path: Path, tiny_pair) -> Path:
    run = RunDir(tmp_path / "run")
    run.ensure()
    shutil.copy(tiny_pair["Q4_K_M"], run.root / "demo-Q4_K_M.gguf")
    (run.root / "demo.imatrix.gguf").write_bytes(b"not a model")
    run.write_manifest({"name": "demo"})
    run.write_sha256sums({"demo-Q4_K_M.gguf": sha256_file(run.root / "demo-Q4_K_M.gguf"),
                          "demo.imatrix.gguf": "0" * 64})
    return run.root


def test_fit_run_writes_one_receipt_per_variant(tmp_path, tiny_pair):
    root = _run_dir(tmp_path, tiny_pair)
    tables = fit.fit_run(root, vram_gb=[12, 16], ctx=[4096], kv_types=["f16"])
    assert list(tables) == ["Q4_K_M"]
    receipt = json.loads((root / "receipts" / "fit-Q4_K_M.json").read_text())
    assert receipt["step"] == "fit" and receipt["variant"] == "Q4_K_M" and receipt["file"] == "demo-Q4_K_M.gguf"
    assert len(receipt["rows"]) == 2
    assert sorted(p.name for p in (root / "receipts").iterdir()) == ["fit-Q4_K_M.json"]


def test_run_dir_variant_names_come_from_quantize_receipts(tmp_path, tiny_pair):
    root = _run_dir(tmp_path, tiny_pair)
    RunDir(root).write(quantize_receipt("demo-Q4_K_M.gguf"), "q4-mixed")
    tables = fit.fit_run(root, vram_gb=[12], ctx=[4096], kv_types=["f16"])
    assert list(tables) == ["q4-mixed"] and tables["q4-mixed"].file == "demo-Q4_K_M.gguf"
    assert (root / "receipts" / "fit-q4-mixed.json").is_file()


def _cli():
    group = Group("mtpquant")
    group.add_command(fit_cmd)
    return group


def test_cli_fit_json_and_table(tiny_pair):
    r = CliRunner().invoke(_cli(), ["fit", str(tiny_pair["Q4_K_M"]), "--vram", "12,16", "--ctx", "4096", "--kv", "f16",
                                    "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output)["rows"]) == 2
    r = CliRunner().invoke(_cli(), ["fit", str(tiny_pair["Q4_K_M"])])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[1].split() == ["ctx", "KV", "need", "GiB", "12", "GB", "16", "GB", "24", "GB",
                                                "32", "GB"]
    assert len(r.output.splitlines()) == 2 + 6 + 1


@pytest.mark.parametrize("args, message", [
    (["--kv", "f16,q5_1"], "error: --kv: unknown KV cache type 'q5_1' (use f16, bf16, q8_0, q4_0, f32)"),
    (["--vram", "12,big"], "error: --vram: 'big' is not a number (give a comma-separated list, e.g. --vram 12,16,24)"),
    (["--ctx", "4096,10"], "error: --ctx: 10 is below the minimum of 64"),
])
def test_cli_fit_bad_options(tiny_pair, args, message):
    r = CliRunner().invoke(_cli(), ["fit", str(tiny_pair["Q4_K_M"]), *args])
    assert r.exit_code == 2
    assert r.output.strip() == message


def test_cli_fit_rejects_a_file_that_is_not_gguf(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(b"x")
    r = CliRunner().invoke(_cli(), ["fit", str(p)])
    assert r.exit_code == 2
    assert r.output.strip() == f"error: {p}: not a .gguf file or a run directory (give a model GGUF or a run directory)"
