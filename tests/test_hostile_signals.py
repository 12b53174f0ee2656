"""Signals, as a user's shell or a job scheduler sends them: SIGTERM, SIGINT and SIGHUP to `mtpquant build` (while
llama-quantize runs), `mtpquant smoke` (servers up) and `mtpquant eval` (while llama-perplexity runs) stop every
llama.cpp process and keep nothing half-written; a SIGKILL of mtpquant itself leaves no llama-server running or
listening (its children die with it, PR_SET_PDEATHSIG). The CLI runs as a real process here."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import build_small_run, gone_within

from mtpquant import synth
from mtpquant.core.rundir import RunDir

SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
INTERRUPTED = "interrupted; nothing half-written was kept"
TAG = f"MTPQUANT_TEST_SESSION={os.environ['MTPQUANT_TEST_SESSION']}".encode()  # set by conftest


def tagged(name: str) -> dict[int, list[str]]:
    """This test session's processes named `name` (the kernel keeps 15 characters of it), with their argv."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() == name[:15] and TAG in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
    return found


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def closed(port: int, grace: float = 10) -> bool:
    """The port stops accepting within `grace` seconds (a dying process closes its sockets last)."""
    return gone_within(lambda: listening(port), grace)


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mtpquant", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for(what: str, found, proc: subprocess.Popen, timeout: float = 240):
    """Poll `found()` until it gives something; fail if mtpquant ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := found():
            return got
        if proc.poll() is not None:
            pytest.fail(f"mtpquant ended (code {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {what} within {timeout:g} s")


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("mtpquant did not stop after the signal")
    return proc.returncode, err


def none_left(name: str, grace: float = 10) -> bool:
    return gone_within(lambda: tagged(name), grace)


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*incomplete*"))


def assert_interrupted(code: int, err: str) -> None:
    assert code == 130, err
    assert err.rstrip("\n").splitlines()[-1] == INTERRUPTED and "Traceback" not in err, err


@pytest.fixture(scope="module")
def env(llama_env) -> dict:
    return {**llama_env, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory) -> Path:
    """A synthetic model large enough (47 MB) that llama-quantize runs for a few seconds on a 2-core machine."""
    path = tmp_path_factory.mktemp("slow") / "slow-BF16.gguf"
    synth.write_gguf(path, synth.SynthSpec(arch="qwen35moe", seed=1, hidden_size=512, n_expert=8, expert_ff=512,
                                           shared_expert_ff=512))
    return path


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, toolchain) -> RunDir:
    return build_small_run(tmp_path_factory.mktemp("signals-run"), toolchain)


def _quantizing():
    return [p for p, argv in tagged("llama-quantize").items() if "--dry-run" not in argv and "--help" not in argv]


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_signal_during_quantize(slow_source, tmp_path, env, sig):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: slow\nsource: {{path: {slow_source}}}\nvariants: [{{type: Q4_K_M}}]\n")
    out = tmp_path / "out"
    proc = start(["build", str(recipe), "--out", str(out), "-q"], env)
    wait_for("llama-quantize", _quantizing, proc)
    proc.send_signal(sig)
    assert_interrupted(*finish(proc))
    assert none_left("llama-quantize")
    assert not (out / "slow-Q4_K_M.gguf").exists()  # no final-named partial file
    assert not (out / "receipts" / "quantize-Q4_K_M.json").exists()
    # a signal just after llama-quantize finished, before the receipt is written, leaves its output under the
    # temporary name (see core/steps.py); the next run removes it, and finishes the job
    assert all(name.endswith(".incomplete") for name in leftovers(out))
    if sig == signal.SIGTERM:
        code, err = finish(start(["build", str(recipe), "--out", str(out), "-q"], env), timeout=600)
        assert code == 0, err
        assert (out / "slow-Q4_K_M.gguf").is_file() and leftovers(out) == []


def _server_up():
    for argv in tagged("llama-server").values():
        if "--port" in argv and listening(int(argv[argv.index("--port") + 1])):
            return int(argv[argv.index("--port") + 1])
    return None


SMOKE = ["--k", "2", "--prompts", "1", "--max-tokens", "8", "-q"]


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_signal_while_smoke_servers_are_up(small_run, tmp_path, env, sig):
    run = tmp_path / "run"
    shutil.copytree(small_run.root, run)
    proc = start(["smoke", str(run), *SMOKE], env)
    port = wait_for("a listening llama-server", _server_up, proc)
    proc.send_signal(sig)
    assert_interrupted(*finish(proc))
    assert none_left("llama-server") and closed(port)
    assert not list((run / "receipts").glob("smoke-*.json")) and leftovers(run) == []


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_signal_during_eval(small_run, tmp_path, env, sig):
    run = tmp_path / "run"
    shutil.copytree(small_run.root, run)
    proc = start(["eval", str(run), "-q"], env)
    wait_for("llama-perplexity", lambda: tagged("llama-perplexity"), proc)
    proc.send_signal(sig)
    assert_interrupted(*finish(proc))
    assert none_left("llama-perplexity")
    assert not list((run / "receipts").glob("eval-*.json")) and leftovers(run) == []
    assert not list(run.rglob("*.kld"))  # the base logits are kept only once written whole


def test_sigkill_of_mtpquant_leaves_no_server_listening(small_run, tmp_path, env):
    run = tmp_path / "run"
    shutil.copytree(small_run.root, run)
    proc = start(["smoke", str(run), *SMOKE], env)
    port = wait_for("a listening llama-server", _server_up, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert none_left("llama-server"), "a llama-server outlived the mtpquant that started it"
    assert closed(port)


FORK_RACE = """
import os, signal, sys, time
from mtpquant.core import procs

def interrupt(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, interrupt)
# the signal lands while the child is being forked: its handler would run inside this at-fork hook
os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(0.2))
try:
    child = procs.spawn(["sleep", "300"])
except KeyboardInterrupt:
    print("interrupted")
else:
    print("signal lost; child", child.pid)
"""


def test_a_signal_during_the_fork_is_not_lost(tmp_path, env):
    """A SIGTERM that arrives while a tool is being started stops the tool and then unwinds, like any other."""
    proc = subprocess.run([sys.executable, "-c", FORK_RACE], capture_output=True, text=True, timeout=60, env=env,
                          check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "interrupted\n", "")
    assert none_left("sleep")
