"""Shared fixtures: the real llama.cpp toolchain (built once by `mtpquant toolchain install`) and small models."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from mtpquant.core.errors import ToolchainError
from mtpquant.llamacpp.toolchain import locate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toolchain():
    """The real binaries; the README's test command installs them before pytest runs."""
    try:
        tc = locate()
        tc.tool("llama-quantize")
    except ToolchainError as exc:
        pytest.fail(f"no llama.cpp toolchain: {exc.one_line()}")
    return tc


@pytest.fixture(scope="session")
def llama_env(toolchain):
    """Environment that points mtpquant subprocesses at the same binaries."""
    env = dict(os.environ)
    env["MTPQUANT_LLAMA_CPP"] = str(toolchain.bin_dir)
    return env


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, toolchain) -> dict[str, Path]:
    """The default synthetic qwen35moe (2 layers + 1 NextN block), BF16 and Q4_K_M by the real llama-quantize."""
    from mtpquant import synth
    from mtpquant.core.procs import run_tool

    d = tmp_path_factory.mktemp("tiny-pair")
    src = d / "tiny-BF16.gguf"
    synth.write_gguf(src, synth.SynthSpec(arch="qwen35moe", seed=0))
    q = d / "tiny-Q4_K_M.gguf"
    run_tool([toolchain.tool("llama-quantize"), src, q, "Q4_K_M"], log_path=d / "quantize.log")
    return {"dir": d, "BF16": src, "Q4_K_M": q}


@pytest.fixture(autouse=True)
def _no_stray_servers():
    """No llama-server may outlive a test."""
    before = _servers()
    yield
    leaked = _servers() - before
    assert not leaked, f"llama-server processes left running: {sorted(leaked)}"


# Every process this test session starts inherits this tag, so the check sees our servers and not others'.
SESSION_TAG = f"MTPQUANT_TEST_SESSION={uuid.uuid4().hex}"
os.environ["MTPQUANT_TEST_SESSION"] = SESSION_TAG.split("=", 1)[1]


def _servers() -> set[int]:
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "llama-server":
                continue
            if SESSION_TAG.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.add(int(proc.name))
        except OSError:
            continue
    return found
