"""Executors: the demo on a real local Ray cluster (a head node and a worker node on this machine, each with its own
resources) against a local build of the same recipe, a worker killed mid-quantize, the imatrix as a map-reduce,
GPU steps placed one GPU each (fake GPUs: Ray's resource accounting), what each node checks before anything is
placed, and the local executor overlapping CPU and GPU steps. The recipe copies drop the demo's smoke and eval
where a test is about the variants' bytes, to keep it short."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import gguf
import numpy as np
import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from mtpquant import __version__
from mtpquant import recipe as rcp
from mtpquant.core.errors import GateError, UsageError
from mtpquant.core.files import sha256_file, write_text_atomic
from mtpquant.pipeline import build as pipeline
from mtpquant.pipeline.executors import local, measure_tasks
from mtpquant.pipeline.executors import ray as ray_executor
from mtpquant.pipeline.executors.base import NodeNeeds, cpu_set

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo-tiny.yaml"
TAGS = ["Q4_K_M", "IQ4_XS", "IQ3_XXS"]
RAY_PROCESSES = (b"raylet", b"gcs_server", b"default_worker", b"ray::", b"dashboard", b"log_monitor",
                 b"monitor.py", b"runtime_env")


def demo_copy(folder: Path, name: str = "demo.yaml", **changes) -> Path:
    """The shipped demo recipe with its corpus path made absolute, smoke and eval off, and `changes` applied
    (None drops a field)."""
    data = yaml.safe_load(DEMO.read_text())
    data["imatrix"]["compute"]["corpus"] = str((DEMO.parent / data["imatrix"]["compute"]["corpus"]).resolve())
    data["smoke"] = {**data.get("smoke", {}), "enabled": False}
    data["eval"] = {**data.get("eval", {}), "enabled": False}
    data.update(changes)
    data = {k: v for k, v in data.items() if v is not None}  # a change of None drops the field
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(yaml.safe_dump(data, sort_keys=False))
    return folder / name


def small_smoke(**extra) -> dict:
    return {"seeds": [42], "draft_n_max": [3], "prompts": 2, "max_tokens": 16, "raw": True, "ctx": 1024,
            "threads": 1, **extra}


def sums(out: Path) -> dict[str, str]:
    return {name: sha for sha, name in (line.split("  ", 1) for line in (out / "SHA256SUMS").read_text().splitlines())}


def manifest_tasks(out: Path) -> dict[str, dict]:
    return {t["task"]: t for t in json.loads((out / "manifest.json").read_text())["executor"]["tasks"]}


def run_cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "mtpquant", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def _ray_processes() -> set[int]:
    """Ray's processes started by this test session (they inherit the tag conftest sets)."""
    tag = f"MTPQUANT_TEST_SESSION={os.environ['MTPQUANT_TEST_SESSION']}".encode()
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            if any(n in cmd for n in RAY_PROCESSES) and tag in (proc / "environ").read_bytes().split(b"\0"):
                found.add(int(proc.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def cluster():
    """A head node (1 CPU) and a worker node (2 CPUs, 2 fake GPUs: a multi-GPU host to Ray's accounting)."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    try:
        c.add_node(num_cpus=2, num_gpus=2)
        c.wait_for_nodes()
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        deadline = time.monotonic() + 30
        while _ray_processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ray_processes(), f"Ray processes left running: {sorted(_ray_processes())}"


@pytest.fixture(scope="module")
def local_demo(tmp_path_factory, toolchain) -> dict:
    """The demo recipe (smoke and eval off) built by the local executor: what every cluster build must equal."""
    folder = tmp_path_factory.mktemp("local-demo")
    recipe = demo_copy(folder)
    out = folder / "out"
    pipeline.build(rcp.load(recipe), out, toolchain)
    return {"recipe": recipe, "out": out, "sums": sums(out)}


def test_demo_on_two_nodes_equals_a_local_build(cluster, local_demo, tmp_path, llama_env):
    out = tmp_path / "ray"
    run = run_cli("build", local_demo["recipe"], "--out", out, "--executor", "ray", "--ray-address", cluster.address,
                  "--json", "-q", env=llama_env)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)  # stdout stays JSON with Ray connected
    assert [v["sha256"] for v in data["variants"]] == [local_demo["sums"][f"demo-tiny-mtp-{t}.gguf"] for t in TAGS]
    assert sums(out) == local_demo["sums"]
    tasks = manifest_tasks(out)
    assert sorted(tasks) == sorted(["imatrix"] + [f"quantize:{t}" for t in TAGS])
    assert len({tasks[f"quantize:{t}"]["node"] for t in TAGS}) == 2, "the variants ran on both nodes"
    assert json.loads((out / "manifest.json").read_text())["executor"]["executor"] == "ray"
    verify = run_cli("verify", out, env=llama_env)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _quantize_under(out: Path) -> tuple[int, int] | None:
    """(llama-quantize pid, its parent's pid) of a quantize running in `out`, once its output file exists."""
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or (proc / "comm").read_text().strip() != "llama-quantize":
                continue
            if Path(os.readlink(proc / "cwd")) != out.resolve():
                continue
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if list(out.glob(".*.gguf.*.incomplete")):
            return int(proc.name), ppid
    return None


def test_a_worker_killed_mid_quantize_is_retried(cluster, local_demo, tmp_path, llama_env):
    """A copy of the local run without its IQ3_XXS: the build on the cluster keeps the rest and quantizes IQ3_XXS,
    and the Ray worker running that quantize is killed with SIGKILL while the file is being written."""
    out = tmp_path / "killed"
    shutil.copytree(local_demo["out"], out)
    (out / "demo-tiny-mtp-IQ3_XXS.gguf").unlink()
    (out / "receipts" / "quantize-IQ3_XXS.json").unlink()
    recipe = local_demo["recipe"]
    proc = subprocess.Popen([sys.executable, "-m", "mtpquant", "build", str(recipe), "--out", str(out), "--executor",
                             "ray", "--ray-address", cluster.address, "-q"], env=llama_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline, found = time.monotonic() + 300, None
        while found is None and proc.poll() is None and time.monotonic() < deadline:
            found = _quantize_under(out)
            time.sleep(0.05)
        assert found is not None, "no quantize to kill"
        worker = found[1]
        assert b"ray" in Path(f"/proc/{worker}/cmdline").read_bytes(), "the quantize's parent is a Ray worker"
        os.kill(worker, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    tasks = manifest_tasks(out)
    assert tasks["quantize:IQ3_XXS"]["attempts"] == 2
    assert json.loads((out / "manifest.json").read_text())["steps"]["quantize:Q4_K_M"]["skipped"]
    assert sums(out) == local_demo["sums"]
    assert not list(out.rglob("*.incomplete*")), "the killed attempt's partial file is gone"
    verify = run_cli("verify", out, env=llama_env)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _imatrix_tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data, dtype=np.float64) for t in gguf.GGUFReader(path).tensors}


def test_imatrix_map_reduce_over_two_workers(cluster, local_demo, tmp_path, toolchain):
    out = tmp_path / "parts"
    recipe = rcp.load(demo_copy(tmp_path, variants=[{"type": "Q4_K_M"}]))
    ex = ray_executor.Executor(cluster.address)
    try:
        pipeline.build(recipe, out, toolchain, executor=ex, imatrix_parts=2)
    finally:
        ex.close()
    r = json.loads((out / "receipts" / "imatrix.json").read_text())
    assert [p["chunks"] for p in r["parts"]] == [[0, 12], [12, 24]]
    assert len({p["worker"] for p in r["parts"]}) == 2, "the two ranges ran on both nodes"
    assert r["parts"][1]["command"][:8] == ["llama-imatrix", "-m", "demo-tiny-mtp-BF16.gguf", "-f",
                                            "codemath-chat-v1.txt", "-o",
                                            "imatrix-parts/demo-tiny-mtp.chunks-12-24.imatrix.gguf", "--chunk"]
    assert r["command"] == r["merge"]["command"] == [
        "llama-imatrix", "-m", "demo-tiny-mtp-BF16.gguf",
        "--in-file", "imatrix-parts/demo-tiny-mtp.chunks-0-12.imatrix.gguf",
        "--in-file", "imatrix-parts/demo-tiny-mtp.chunks-12-24.imatrix.gguf", "-o", "demo-tiny-mtp.imatrix.gguf"]
    assert r["chunk_count"] == 24 and r["nextn_entries"], "coverage of the draft block, read from the merged file"
    merged = _imatrix_tensors(out / "demo-tiny-mtp.imatrix.gguf")
    single = _imatrix_tensors(local_demo["out"] / "demo-tiny-mtp.imatrix.gguf")
    assert sorted(merged) == sorted(single)
    counts = [n for n in single if n.endswith(".counts")]
    sums2 = [n for n in single if n.endswith(".in_sum2")]
    assert all(np.array_equal(merged[n], single[n]) for n in counts), "the counts add up exactly"
    worst = max(float(np.max(np.abs(merged[n] - single[n]) / np.maximum(np.abs(single[n]), 1e-30))) for n in sums2)
    assert worst < 1e-3, f"squared-activation sums differ by {worst:.2e} (relative)"
    assert sha256_file(out / "demo-tiny-mtp.imatrix.gguf") != sha256_file(
        local_demo["out"] / "demo-tiny-mtp.imatrix.gguf"), "float sums re-associated: not bit-identical"


def test_smokes_of_two_variants_take_a_gpu_each_side_by_side(cluster, tmp_path, toolchain):
    """smoke.gpu_layers asks for a GPU per smoke: on the worker's two (fake) GPUs the two smokes overlap in time."""
    recipe = rcp.load(demo_copy(tmp_path, variants=[{"type": "Q4_K_M"}, {"type": "Q8_0"}], imatrix=None,
                                smoke=small_smoke(gpu_layers=99, prompts=6, max_tokens=48, seeds=[42, 1337])))
    out = tmp_path / "gpu"
    ex = ray_executor.Executor(cluster.address)
    try:
        pipeline.build(recipe, out, toolchain, executor=ex)
    finally:
        ex.close()
    tasks = manifest_tasks(out)
    a, b = tasks["smoke:Q4_K_M"], tasks["smoke:Q8_0"]
    assert a["node"] == b["node"] and sorted(a["gpus"] + b["gpus"]) == ["0", "1"], "one GPU each, on the GPU host"
    overlap = min(a["ended"], b["ended"]) - max(a["started"], b["started"])
    assert overlap > 0, f"the smokes ran one after the other ({overlap:.2f} s)"
    receipt = json.loads((out / "receipts" / "smoke-Q4_K_M.json").read_text())
    assert [d["task"] for d in receipt["concurrent"]["during"]] == ["smoke:Q8_0"]
    assert receipt["concurrent"]["ran"]["gpus"] == a["gpus"]


def _needs(run_root: Path, source: Path, sha: str, toolchain, token: str = "t0k3n") -> NodeNeeds:
    write_text_atomic(run_root / "work" / ".nodes-probe", "t0k3n")
    return NodeNeeds(run_root, "work/.nodes-probe", token, {source: sha}, {}, toolchain.describe(), __version__)


@pytest.mark.parametrize("case", ["wrong source", "another run directory"])
def test_a_node_that_cannot_run_the_build_is_named(cluster, tmp_path, toolchain, case):
    source = tmp_path / "model-BF16.gguf"
    source.write_bytes(b"not the planned bytes")
    seen = sha256_file(source)
    needs = (_needs(tmp_path, source, "ab" * 32, toolchain) if case == "wrong source"
             else _needs(tmp_path, source, seen, toolchain, token="another"))
    ex = ray_executor.Executor(cluster.address)
    try:
        first = next(n for n in ray.nodes() if n["Alive"] and (n["Resources"].get("CPU") or n["Resources"].get("GPU")))
        node = f"{first['NodeManagerAddress']}/{first['NodeID'][:8]}"
        with pytest.raises(UsageError) as ei:
            ex.check_nodes(needs, lambda *a: None)
    finally:
        ex.close()
    problem = (f"sees {source} with sha256 {seen[:12]}..., the plan has {'ab' * 6}... (a different copy of the "
               f"source: put one copy on shared storage)" if case == "wrong source" else
               f"sees another {tmp_path} than the driver's (a local folder of the same name?): put the run "
               f"directory on storage every node mounts at the same path")
    assert ei.value.one_line() == f"node {node}: {problem} (fix that node, or stop it, and run the build again)"


def test_gpu_steps_without_a_gpu_node_are_refused_before_anything_runs(cluster, tmp_path, toolchain):
    source = tmp_path / "model-BF16.gguf"
    source.write_bytes(b"bytes")
    needs = dataclasses.replace(_needs(tmp_path, source, sha256_file(source), toolchain), gpus=3)
    ex = ray_executor.Executor(cluster.address)
    try:
        with pytest.raises(UsageError) as ei:
            ex.check_nodes(needs, lambda *a: None)
    finally:
        ex.close()
    assert ei.value.one_line() == (f"the recipe's smoke.gpu_layers asks for 3 GPU(s) per smoke and eval, and no node "
                                   f"of the cluster at {cluster.address} has as many (add GPU nodes, or drop "
                                   f"smoke.gpu_layers)")


@pytest.mark.parametrize("args, message", [
    (["--executor", "ray"], ("error: --executor ray needs a Ray cluster (give --ray-address HOST:PORT or set "
                             "RAY_ADDRESS; `ray start --head` starts one)")),
    (["--executor", "ray", "--overlap"], ("error: --overlap is for --executor local (ray places tasks by their "
                                          "declared resources) (drop --overlap)")),
    (["--ray-address", "127.0.0.1:1"], ("error: --ray-address is for --executor ray (add --executor ray, or drop "
                                        "--ray-address)")),
    (["--executor", "ray", "--ray-address", "127.0.0.1:1"], ("error: cannot reach the Ray cluster at 127.0.0.1:1 "
     "(Connection refused) (check --ray-address / RAY_ADDRESS and that the cluster is up (ray status))")),
    (["--imatrix-parts", "13"], ("error: --imatrix-parts 13: the imatrix has 24 chunks and llama-imatrix needs at "
                                 "least 2 per part (give 1 to 12)")),
])
def test_executor_options_refused_in_one_line(tmp_path, llama_env, args, message):
    env = {k: v for k, v in llama_env.items() if k != "RAY_ADDRESS"}
    out = tmp_path / "out"
    run = run_cli("build", demo_copy(tmp_path), "--out", out, *args, env=env, timeout=120)
    assert run.returncode == 2 and run.stderr.strip() == message, run.stderr
    assert not out.exists()


@pytest.mark.skipif(len(cpu_set()) < 2, reason="overlap needs two CPUs to split")
def test_local_overlap_quantizes_while_smoking_on_disjoint_cpus(tmp_path, toolchain):
    """The gate is out of reach: the build fails as a sequential one does, once every receipt and the card are
    written."""
    recipe = rcp.load(demo_copy(tmp_path, variants=[{"type": "Q4_K_M"}, {"type": "Q8_0"}], imatrix=None,
                                smoke=small_smoke(gate={"min_acceptance": 0.99})))
    out = tmp_path / "overlap"
    with pytest.raises(GateError):
        pipeline.build(recipe, out, toolchain, executor=local.Executor(overlap=True, reserve=1))
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["gates"]) == ["Q4_K_M", "Q8_0"] and (out / "README.md").is_file()
    assert not any(g["passed"] for g in manifest["gates"].values())
    tasks = manifest_tasks(out)
    smoke, quantize = tasks["smoke:Q4_K_M"], tasks["quantize:Q8_0"]
    assert min(smoke["ended"], quantize["ended"]) > max(smoke["started"], quantize["started"]), "they overlapped"
    assert smoke["cpus"] == [cpu_set()[0]] and not set(smoke["cpus"]) & set(quantize["cpus"])
    receipt = json.loads((out / "receipts" / "smoke-Q4_K_M.json").read_text())
    during = {d["task"]: d for d in receipt["concurrent"]["during"]}
    assert during["quantize:Q8_0"]["cpus"] == quantize["cpus"] and receipt["concurrent"]["mode"] == "overlap"


def test_gpu_steps_come_variant_by_variant(tmp_path):
    """Each variant's eval, then its smoke, before the next variant's: the overlapping GPU lane takes them in this
    order, so the first smoke runs while the next variant is quantized (with every eval first, each smoke waited
    for the last quantize: on the H200 ladder, 4 smokes ran after the 4th quantize)."""
    recipe = rcp.load(demo_copy(tmp_path, variants=[{"type": "Q4_K_M"}, {"type": "Q8_0"}, {"type": "Q6_K"}],
                                imatrix=None, smoke=small_smoke(), eval={"enabled": True, "ctx": 128, "chunks": 4}))
    plan = types.SimpleNamespace(recipe=recipe, variants=[types.SimpleNamespace(variant=v) for v in recipe.variants])
    tasks = measure_tasks.post_tasks(plan, force=False)
    assert [(t.name, t.after) for t in tasks] == [
        ("eval:Q4_K_M", ("quantize:Q4_K_M",)), ("smoke:Q4_K_M", ("quantize:Q4_K_M",)),
        ("eval:Q8_0", ("quantize:Q8_0", "eval:Q4_K_M")), ("smoke:Q8_0", ("quantize:Q8_0",)),
        ("eval:Q6_K", ("quantize:Q6_K", "eval:Q4_K_M")), ("smoke:Q6_K", ("quantize:Q6_K",))]
