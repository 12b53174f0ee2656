"""`plan` and `build` end to end on the project's synthetic model with the real llama.cpp tools."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mtpquant import recipe as rcp
from mtpquant import synth
from mtpquant.core.errors import MtpquantError, UsageError, VerifyError
from mtpquant.core.files import sha256_file
from mtpquant.modelfile.model import read_model
from mtpquant.pipeline import build as pipeline
from mtpquant.pipeline import plan as plan_module

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "imatrix" / "codemath-chat-v1.txt"
EH = r"nextn\.eh_proj\.weight$"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "tiny-BF16.gguf"
    synth.write_gguf(path, synth.SynthSpec(seed=3))
    return path


def write_recipe(folder: Path, body: str) -> rcp.Recipe:
    p = folder / "r.yaml"
    p.write_text(body)
    return rcp.load(p)


def base_recipe(src: Path, variants: str = "[{type: Q4_K_M}, {type: IQ4_XS}]", extra: str = "") -> str:
    return (f"name: t\nsource: {{path: {src}}}\npolicy:\n  - {{block: nextn, match: '{EH}', type: Q8_0}}\n"
            f"variants: {variants}\n{extra}")


def logs_of(out: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in (out / "logs").glob(f"{prefix}*"))


def run_cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "mtpquant", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_build_two_variants_eh_proj_q8_and_resume(tmp_path, tiny, toolchain):
    r = write_recipe(tmp_path, base_recipe(tiny))
    out = tmp_path / "out"
    result = pipeline.build(r, out, toolchain)
    assert [v.tag for v in result.variants] == ["Q4_K_M", "IQ4_XS"]
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 2
    for line in sums:
        sha, name = line.split("  ")
        assert sha256_file(out / name) == sha
    for v in result.variants:
        info = read_model(v.path)
        assert info.nextn.complete and info.nextn.blocks == (2,)
        types = {t.name: t.type for t in info.tensors}
        assert types["blk.2.nextn.eh_proj.weight"] == "Q8_0"
        # everything else follows llama-quantize's own mixture for the base type
        plan = next(p for p in result.plan.variants if p.variant.tag == v.tag)
        for t in plan.tensors:
            if t.name != "blk.2.nextn.eh_proj.weight":
                assert types[t.name] == t.default_type
        receipt = json.loads((out / "receipts" / f"quantize-{v.tag}.json").read_text())
        assert receipt["sha256"] == v.sha256 and receipt["file"] == v.path.name
        assert receipt["overrides"] == [r"^blk\.2\.nextn\.eh_proj\.weight$=q8_0"]
        assert receipt["command"][0] == "llama-quantize"
    mtimes = {v.tag: v.path.stat().st_mtime_ns for v in result.variants}
    again = pipeline.build(r, out, toolchain)
    assert all(v.skipped for v in again.variants)
    assert {v.tag: v.path.stat().st_mtime_ns for v in again.variants} == mtimes
    # each quantize log holds exactly one llama-quantize run
    for tag in mtimes:
        assert (out / "logs" / f"quantize-{tag}.log").read_text().count("$ ") == 1


def test_changed_artifact_is_rebuilt(tmp_path, tiny, toolchain):
    r = write_recipe(tmp_path, base_recipe(tiny, "[{type: Q4_K_M}]"))
    out = tmp_path / "out"
    first = pipeline.build(r, out, toolchain).variants[0]
    with open(first.path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    second = pipeline.build(r, out, toolchain).variants[0]
    assert not second.skipped and second.sha256 == first.sha256  # deterministic build gives the same bytes


def test_rule_matching_nothing_fails_in_plan(tmp_path, tiny, toolchain):
    r = write_recipe(tmp_path, base_recipe(tiny, "[{type: Q4_K_M}]").replace(EH, r"nextn\.eh_projection"))
    with pytest.raises(MtpquantError) as ei:
        pipeline.build(r, tmp_path / "out", toolchain)
    assert ei.value.one_line() == (
        "variant Q4_K_M: policy[0] (block=nextn, match='nextn\\\\.eh_projection' -> Q8_0): matches no tensor of the "
        "source model (fix the rule's regex or block; `mtpquant inspect SOURCE` lists the tensor names)")
    assert not list((tmp_path / "out").glob("*.gguf"))
    assert logs_of(tmp_path / "out", "quantize") == []


def test_rule_on_norms_only_is_an_error(tmp_path, tiny, toolchain):
    r = write_recipe(tmp_path, base_recipe(tiny, "[{type: Q4_K_M}]").replace(EH, r"nextn\.enorm"))
    with pytest.raises(MtpquantError) as ei:
        pipeline.make_plan(r, tmp_path / "out", toolchain)
    assert "matches only tensors llama-quantize never quantizes" in ei.value.message


def test_iq3_without_nextn_statistics_fails_in_plan(tmp_path, tiny, toolchain):
    extra = f"imatrix:\n  compute: {{corpus: {CORPUS}, chunks: 4, ctx: 128, nextn: false}}\n"
    r = write_recipe(tmp_path, base_recipe(tiny, "[{type: IQ3_XXS}]", extra))
    with pytest.raises(MtpquantError) as ei:
        pipeline.build(r, tmp_path / "out", toolchain)
    assert ei.value.message == (
        "variant IQ3_XXS: 8 tensor(s) planned as IQ2_S/IQ3_XXS need importance data but the imatrix has no "
        "statistics for them: blk.2.attn_k.weight, blk.2.attn_q.weight, blk.2.ffn_down_exps.weight, "
        "blk.2.ffn_down_shexp.weight, blk.2.ffn_gate_exps.weight, blk.2.ffn_gate_shexp.weight, "
        "blk.2.ffn_up_exps.weight, blk.2.ffn_up_shexp.weight")
    # failed in plan: neither llama-imatrix nor llama-quantize ran
    assert logs_of(tmp_path / "out", "imatrix") == [] and logs_of(tmp_path / "out", "quantize") == []


def test_iq3_with_pins_and_with_nextn_statistics(tmp_path, tiny, toolchain):
    pin = f"imatrix:\n  uncovered: pin\n  compute: {{corpus: {CORPUS}, chunks: 4, ctx: 128, nextn: false}}\n"
    r = write_recipe(tmp_path, base_recipe(tiny, "[{type: IQ3_XXS}, {type: Q4_K_M}]", pin))
    res = pipeline.build(r, tmp_path / "pinned", toolchain)
    iq3 = res.variants[0]
    receipt = json.loads((tmp_path / "pinned" / "receipts" / "quantize-IQ3_XXS.json").read_text())
    assert receipt["draft_head"] == "pinned"
    types = {t.name: t.type for t in read_model(iq3.path).tensors}
    for name in receipt["pins"]:
        assert name.startswith("blk.2.") and types[name] == "Q8_0"
    assert len(receipt["pins"]) == 8
    # imatrix computed once for both variants
    assert (tmp_path / "pinned" / "logs" / "imatrix.log").read_text().count("$ ") == 1

    collect = pin.replace("nextn: false", "nextn: true").replace("  uncovered: pin\n", "")
    r2 = write_recipe(tmp_path, base_recipe(tiny, "[{type: IQ3_XXS}]", collect))
    res2 = pipeline.build(r2, tmp_path / "collected", toolchain)
    receipt2 = json.loads((tmp_path / "collected" / "receipts" / "quantize-IQ3_XXS.json").read_text())
    assert receipt2["draft_head"] == "collected" and receipt2["pins"] == []
    types2 = {t.name: t.type for t in read_model(res2.variants[0].path).tensors}
    assert types2["blk.2.ffn_up_exps.weight"] == "IQ3_XXS"
    again = pipeline.build(r2, tmp_path / "collected", toolchain)
    assert again.imatrix.reused and all(v.skipped for v in again.variants)


def test_existing_unvouched_output_is_not_overwritten(tmp_path, tiny, toolchain):
    r = write_recipe(tmp_path, base_recipe(tiny, "[{type: Q4_K_M}]"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "t-Q4_K_M.gguf").write_bytes(b"precious")
    with pytest.raises(UsageError) as ei:
        pipeline.build(r, out, toolchain)
    assert ei.value.one_line() == (f"{out / 't-Q4_K_M.gguf'} exists and no receipt of this run vouches for it "
                                   "(move it away, choose another --out, or rerun with --force)")
    assert (out / "t-Q4_K_M.gguf").read_bytes() == b"precious"


def test_stale_incomplete_files_are_removed(tmp_path, tiny, toolchain):
    r = write_recipe(tmp_path, base_recipe(tiny, "[{type: Q4_K_M}]"))
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".t-Q4_K_M.gguf.99999.incomplete"
    stale.write_bytes(b"half")
    pipeline.build(r, out, toolchain)
    assert not stale.exists()
    assert sorted(p.name for p in out.glob("*.gguf")) == ["t-Q4_K_M.gguf"]


def _wrapper(folder: Path, real: Path, body: str) -> Path:
    """A llama-quantize that behaves like the real one for dry runs and misbehaves otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    for tool in real.parent.iterdir():
        if tool.name != "llama-quantize":
            (folder / tool.name).symlink_to(tool)
    w = folder / "llama-quantize"
    w.write_text(f"#!/bin/sh\ncase \" $* \" in *' --dry-run '*|*' --help '*) exec {real} \"$@\";; esac\n{body}\n")
    w.chmod(w.stat().st_mode | stat.S_IXUSR)
    return folder


def test_quantize_failure_removes_partial_file(tmp_path, tiny, toolchain):
    from mtpquant.llamacpp.toolchain import locate

    fake = _wrapper(tmp_path / "bin", toolchain.tool("llama-quantize"),
                    'for a; do case "$a" in *.incomplete) head -c 100000 /dev/zero > "$a";; esac; done\n'
                    'echo "llama_model_quantize: failed to quantize: Missing importance matrix for tensor '
                    'blk.2.attn_k.weight in a very low-bit quantization" >&2; exit 1')
    r = write_recipe(tmp_path, base_recipe(tiny, "[{type: Q4_K_M}]"))
    out = tmp_path / "out"
    with pytest.raises(MtpquantError) as ei:
        pipeline.build(r, out, locate(fake))
    assert ei.value.one_line() == (
        "llama-quantize exited with code 1: failed to quantize: Missing importance matrix for tensor "
        f"blk.2.attn_k.weight in a very low-bit quantization; log: {out / 'logs' / 'quantize-Q4_K_M.log'} "
        "(nothing was kept; read the log for the full output)")
    assert [p.name for p in out.iterdir() if p.is_file() and p.name != ".lock"] == []
    assert not (out / "receipts" / "quantize-Q4_K_M.json").exists()


def test_verification_mismatch_keeps_nothing(tmp_path, tiny, toolchain):
    from mtpquant.llamacpp.toolchain import locate

    real = toolchain.tool("llama-quantize")
    # quantizes for real, but drops the tensor-type file outside dry runs: eh_proj comes out as the default type
    fake = _wrapper(tmp_path / "bin", real, "exit 1")
    (fake / "llama-quantize").write_text(
        f"#!{sys.executable}\nimport os, sys\nargs = sys.argv[1:]\n"
        f"if '--dry-run' not in args and '--tensor-type-file' in args:\n"
        f"    i = args.index('--tensor-type-file'); del args[i:i + 2]\n"
        f"os.execv({str(real)!r}, [{str(real)!r}] + args)\n")
    r = write_recipe(tmp_path, base_recipe(tiny, "[{type: Q4_K_M}]"))
    out = tmp_path / "out"
    with pytest.raises(VerifyError) as ei:
        pipeline.build(r, out, locate(fake))
    assert "blk.2.nextn.eh_proj.weight is Q4_K, planned Q8_0" in ei.value.message
    assert ei.value.hint == "the artifact was not kept"
    assert list(out.glob("*.gguf")) == [] and list(out.glob(".*incomplete")) == []


def test_plan_cli_json_is_clean(tmp_path, tiny, llama_env):
    (tmp_path / "r.yaml").write_text(base_recipe(tiny, "[{type: Q4_K_M}]"))
    r = run_cli("plan", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), "--json", env=llama_env)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    (v,) = data["variants"]
    eh = next(t for t in v["tensors"] if t["name"] == "blk.2.nextn.eh_proj.weight")
    assert eh["type"] == "Q8_0" and eh["rule"] == "policy[0]"
    assert v["bytes"] == sum(t["bytes"] for t in v["tensors"])


def test_build_cli_bad_recipe_exit_code(tmp_path, llama_env):
    (tmp_path / "r.yaml").write_text("name: t\nsource: {synthetic: {}}\nvariants: [{type: Q4_KM}]\n")
    r = run_cli("build", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), env=llama_env)
    assert r.returncode == 2
    assert r.stderr.startswith(f"{tmp_path / 'r.yaml'}: variants[0].type: unknown quantization type 'Q4_KM'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, variants", [("hifi-q4km.yaml", ["Q4_K_M"]),
                                            ("ladder-12-32gb.yaml", ["IQ3_XXS", "IQ4_XS", "Q4_K_M", "Q5_K_M"])])
def test_real_model_recipes_plan_against_a_stand_in(tmp_path, toolchain, name, variants):
    r = rcp.load(REPO / "recipes" / name)
    assert r.source.kind == "hf" and r.expect.shape == "qwen3.6-35b-a3b"
    plan = pipeline.make_plan(r, tmp_path / "out", toolchain, use_stand_in=True)
    assert plan.source.info.nextn.blocks == (40,) and plan.source.info.n_layer == 40
    assert [v.variant.tag for v in plan.variants] == variants
    for v in plan.variants:
        types = v.types()
        assert types["blk.40.nextn.eh_proj.weight"] == "Q8_0"
        assert len(v.tensors) == 753
        # every tensor that needs importance data is covered by the imatrix the recipe computes with --nextn
        assert v.pins == ()
    sizes = {v.variant.tag: v.total_bytes / (1 << 30) for v in plan.variants}
    assert list(sizes.values()) == sorted(sizes.values())  # the ladder grows with the type
    assert not list((tmp_path / "out").glob("*.gguf"))


@pytest.mark.parametrize("name, variants", [("hifi-q4km-27b.yaml", ["Q4_K_M"]),
                                            ("ladder-27b-12-32gb.yaml", ["IQ3_XXS", "IQ4_XS", "Q4_K_M", "Q5_K_M"])])
def test_dense_27b_recipes_plan_against_a_stand_in(tmp_path, toolchain, name, variants):
    r = rcp.load(REPO / "recipes" / name)
    assert r.source.kind == "hf" and r.expect.shape == "qwen3.6-27b"
    plan = pipeline.make_plan(r, tmp_path / "out", toolchain, use_stand_in=True)
    info = plan.source.info
    assert (info.arch, info.n_layer, info.nextn.blocks) == ("qwen35", 64, (64,))
    assert [v.variant.tag for v in plan.variants] == variants
    # every 4th layer attends (11 tensors: norms, q/k/v/output, q/k norms, dense FFN), the other 48 are linear
    # attention (14: norms, qkv, gate, 7 ssm tensors, dense FFN); the NextN block is a full-attention layer plus its
    # 4 nextn tensors; token_embd, output_norm, output
    attends = {b for b in range(64) if (b + 1) % 4 == 0}
    for v in plan.variants:
        types = v.types()
        assert types["blk.64.nextn.eh_proj.weight"] == "Q8_0" and v.pins == ()
        assert len(v.tensors) == 16 * 11 + 48 * 14 + (11 + 4) + 3
        assert {int(t.name.split(".")[1]) for t in v.tensors if t.name.endswith(".attn_q.weight")} == attends | {64}
        assert not any("_exps" in t.name for t in v.tensors)  # dense: no experts
    sizes = [v.total_bytes for v in plan.variants]
    assert sizes == sorted(sizes) and not list((tmp_path / "out").glob("*.gguf"))


def test_stand_in_needs_a_shape(tmp_path, tiny, toolchain):
    r = write_recipe(tmp_path, base_recipe(tiny, "[{type: Q4_K_M}]"))
    with pytest.raises(UsageError) as ei:
        pipeline.make_plan(r, tmp_path / "out", toolchain, use_stand_in=True)
    assert ei.value.one_line() == (f"{tmp_path / 'r.yaml'}: expect.shape is not set, so there is no stand-in for the "
                                   "source (name the real model's shape, one of: qwen3.6-35b-a3b, qwen3.6-27b)")


def test_not_enough_disk_is_refused_before_any_step(tmp_path, tiny, toolchain, monkeypatch):
    # a full disk cannot be produced for real here; the free-space probe is the one thing replaced
    monkeypatch.setattr(plan_module, "free_bytes", lambda folder: 1 << 20)
    r = write_recipe(tmp_path, base_recipe(tiny, "[{type: Q4_K_M}]"))
    out = tmp_path / "out"
    with pytest.raises(MtpquantError) as ei:
        pipeline.build(r, out, toolchain)
    assert ei.value.one_line() == (f"not enough free disk in {out}: the planned outputs need 0.06 GiB, 0.00 GiB is "
                                   "free (free some space or choose another --out)")
    assert logs_of(out, "quantize") == [] and not list(out.glob("*.gguf"))


def test_kill_9_mid_quantize_leaves_nothing_taken_for_complete(tmp_path, tiny, toolchain, llama_env):
    import signal
    import time

    # a llama-quantize that writes part of its output and then hangs, so the kill lands mid-file
    fake = _wrapper(tmp_path / "bin", toolchain.tool("llama-quantize"),
                    'for a; do case "$a" in *.incomplete) head -c 300000 /dev/zero > "$a";; esac; done\nsleep 60')
    (tmp_path / "r.yaml").write_text(base_recipe(tiny, "[{type: Q4_K_M}]"))
    out = tmp_path / "out"
    env = dict(llama_env, MTPQUANT_LLAMA_CPP=str(fake))
    proc = subprocess.Popen([sys.executable, "-m", "mtpquant", "build", str(tmp_path / "r.yaml"), "--out", str(out),
                             "-q"], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob(".*.incomplete")) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(out.glob(".*.incomplete")), "the kill did not land mid-quantize"
    assert not list(out.glob("*.gguf")) and not (out / "SHA256SUMS").exists()
    assert not (out / "receipts" / "quantize-Q4_K_M.json").exists()
    again = pipeline.build(rcp.load(tmp_path / "r.yaml"), out, toolchain)
    assert not list(out.glob(".*.incomplete"))
    assert read_model(again.variants[0].path).nextn.complete
