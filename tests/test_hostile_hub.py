"""A hub endpoint that takes the connection and never answers: resolving an `hf:` source and publishing give up
after $MTPQUANT_HUB_TIMEOUT seconds with one line, having written and uploaded nothing."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import build_small_run
from huggingface_hub.utils import _http as hf_http

from mtpquant.cli import main
from mtpquant.core.rundir import RunDir

HF_RECIPE = "name: t\nsource: {hf: {repo: someone/model, revision: main, files: model-BF16.gguf}}\n" \
            "variants: [{type: Q4_K_M}]\n"
TOKEN = "hf_SilentHubLoopbackSecret0123456789"


class SilentHub:
    """A loopback socket that accepts every connection, keeps what the client sends, and never answers."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.received: list[bytearray] = []
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            buf = bytearray()
            self.received.append(buf)
            threading.Thread(target=self._read, args=(conn, buf), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket, buf: bytearray) -> None:
        try:
            while chunk := conn.recv(65536):
                buf.extend(chunk)
        except OSError:
            pass

    def request_lines(self) -> list[str]:
        return [bytes(b).split(b"\r\n", 1)[0].decode() for b in self.received if b]

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def silent(tmp_path, monkeypatch):
    hub = SilentHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("MTPQUANT_HUB_TIMEOUT", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield hub
    hub.close()
    hf_http.set_client_factory(hf_http.default_client_factory)  # no 1 s client for the tests that come after


def timed(args: list[str], env: dict | None = None):
    started = time.monotonic()
    res = CliRunner().invoke(main, args, env=env)
    return res, time.monotonic() - started


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_hf_source_on_a_hub_that_never_answers(silent, tmp_path, llama_env):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(HF_RECIPE)
    env = {"MTPQUANT_LLAMA_CPP": llama_env["MTPQUANT_LLAMA_CPP"]}
    line = (f"error: {silent.url} did not answer within 1 s while resolving someone/model@main (check the network "
            "and HF_ENDPOINT; MTPQUANT_HUB_TIMEOUT sets how long to wait)\n")
    res, seconds = timed(["plan", str(recipe)], env)
    assert (res.exit_code, res.stderr) == (1, line)
    assert seconds < 30
    assert files_under(tmp_path) == ["r.yaml"]  # the plan's scratch folder is gone, the cache untouched
    res, seconds = timed(["build", str(recipe), "--out", str(tmp_path / "out")], env)
    assert (res.exit_code, res.stderr) == (1, line)
    assert files_under(tmp_path / "out") == [".lock"]  # no receipt, no source, no log
    assert silent.request_lines() and all(r.startswith("GET /api/models/someone/model/revision/main")
                                          for r in silent.request_lines())


def test_timeout_setting_that_is_not_a_number(silent, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(HF_RECIPE)
    res, _ = timed(["plan", str(recipe)], {"MTPQUANT_HUB_TIMEOUT": "soon"})
    assert (res.exit_code, res.stderr) == (2, "error: MTPQUANT_HUB_TIMEOUT='soon' is not a number of seconds (unset "
                                              "it, or give e.g. MTPQUANT_HUB_TIMEOUT=60)\n")
    assert silent.received == []


@pytest.fixture(scope="module")
def built(tmp_path_factory, toolchain) -> RunDir:
    return build_small_run(tmp_path_factory.mktemp("silent-publish"), toolchain)


@pytest.mark.parametrize("dry_run", [False, True])
def test_publish_to_a_hub_that_never_answers(silent, built, tmp_path, llama_env, dry_run):
    run = tmp_path / "run"
    shutil.copytree(built.root, run)
    before = {p: (run / p).read_bytes() for p in files_under(run)}
    args = ["publish", str(run), "--repo", "someone/small-GGUF"] + (["--dry-run"] if dry_run else [])
    res, seconds = timed(args, {"HF_TOKEN": TOKEN, "MTPQUANT_LLAMA_CPP": llama_env["MTPQUANT_LLAMA_CPP"]})
    assert (res.exit_code, res.stderr) == (1, f"error: cannot reach {silent.url} to check the token (timed out); "
                                              "nothing was uploaded (check the network and HF_ENDPOINT, then run "
                                              "again)\n")
    assert seconds < 30
    assert {p: (run / p).read_bytes() for p in files_under(run)} == before
    assert silent.request_lines() == ["GET /api/whoami-v2 HTTP/1.1"]  # asked who we are, sent no file
