"""llama-server lifecycle: real binary on real synthetic GGUFs; a fake binary only for hangs and crashes."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
from pathlib import Path

import gguf
import pytest

from mtpquant import synth
from mtpquant.core.errors import ServerError
from mtpquant.llamacpp import server as srv_mod
from mtpquant.llamacpp.server import LlamaServer
from mtpquant.llamacpp.toolchain import Toolchain


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    mtp = synth.write_gguf(d / "tiny-BF16.gguf", synth.SynthSpec())[0]
    nomtp = strip_nextn(mtp, d / "tiny-nomtp-BF16.gguf")
    bad = d / "notes.gguf"
    bad.write_text("hello, this is not a model\n")
    return {"mtp": mtp, "nomtp": nomtp, "bad": bad}


def strip_nextn(src: Path, dst: Path) -> Path:
    """A copy of a GGUF without its NextN/MTP block(s): tensors, block_count and nextn_predict_layers adjusted."""
    r = gguf.GGUFReader(src)
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()
    n_block = r.fields[gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)].contents()
    nextn_key = gguf.Keys.LLM.NEXTN_PREDICT_LAYERS.format(arch=arch)
    keep = n_block - r.fields[nextn_key].contents()
    w = gguf.GGUFWriter(dst, arch)
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # copied below with the other fields
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == nextn_key:
            continue
        value = f.contents()
        if name == gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch):
            value = keep
        elif name == f"{arch}.attention.recurrent_layers":
            value = value[:keep]
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, value, f.types[0], sub_type=sub)
    dropped = tuple(f"blk.{b}." for b in range(keep, n_block))
    tensors = [t for t in r.tensors if not t.name.startswith(dropped)]
    for t in tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.n_bytes, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in tensors:
        w.write_tensor_data(t.data)
    w.close()
    return dst


def first_line(exc: pytest.ExceptionInfo) -> str:
    return exc.value.message.splitlines()[0]


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


# ----------------------------------------------------------------------------------------------- real server

def test_lifecycle_with_mtp(toolchain, models, tmp_path):
    log = tmp_path / "mtp.log"
    with LlamaServer(toolchain, models["mtp"], log, spec_type="draft-mtp", draft_n_max=2, ctx=512, threads=1) as s:
        pid = s.proc.pid
        assert s.alive
        assert s.get("/health") == {"status": "ok"}
        assert s.slots_info and all(slot["speculative"] is True for slot in s.slots_info)
        # /props never shows MTP (only sampling settings are copied), which is why /slots is the check
        assert s.get("/props")["default_generation_settings"]["params"]["speculative.types"] == "none"
        assert s.record_argv() == ["llama-server", "-m", "tiny-BF16.gguf", "--host", "127.0.0.1", "--port",
                                   str(s.port), "-c", "512", "-np", "1", "--metrics", "--no-webui", "-lv", "4", "-t",
                                   "1", "-fit", "off", "--spec-type", "draft-mtp", "--spec-draft-n-max", "2"]
        assert "spec_decode_num_drafts_total" in s.metrics()
    assert s.proc is None and gone(pid)
    text = log.read_text()
    assert text.startswith("$ ") and "creating MTP draft context" in text and "# stopped:" in text


def test_vanilla_is_not_speculative(toolchain, models, tmp_path):
    with LlamaServer(toolchain, models["mtp"], tmp_path / "v.log", ctx=512, threads=1) as s:
        assert [slot["speculative"] for slot in s.slots_info] == [False]
        assert "--spec-type" not in s.record_argv()


def test_keyboard_interrupt_stops_the_server(toolchain, models, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with LlamaServer(toolchain, models["mtp"], tmp_path / "k.log", ctx=512, threads=1) as s:
            pid = s.proc.pid
            raise KeyboardInterrupt
    assert gone(pid)


def test_not_a_gguf(toolchain, models, tmp_path):
    log = tmp_path / "bad.log"
    with pytest.raises(ServerError) as exc:
        LlamaServer(toolchain, models["bad"], log, ctx=512).start()
    assert first_line(exc) == ("llama-server did not start: notes.gguf is not a GGUF file (invalid magic characters: "
                               f"'hell', expected 'GGUF'); it exited with code 1; log: {log}")
    assert exc.value.tail and "exiting due to model loading error" in exc.value.tail[-1]
    assert all(line.startswith("  | ") for line in exc.value.message.splitlines()[1:])


def test_draft_mtp_on_a_model_without_mtp_block(toolchain, models, tmp_path):
    assert "blk.2.nextn.eh_proj.weight" not in {t.name for t in gguf.GGUFReader(models["nomtp"]).tensors}
    log = tmp_path / "nomtp.log"
    with pytest.raises(ServerError) as exc:
        LlamaServer(toolchain, models["nomtp"], log, spec_type="draft-mtp", draft_n_max=3, ctx=512).start()
    assert first_line(exc) == (
        "llama-server did not start: context type MTP requested but model doesn't contain MTP layers "
        "(--spec-type draft-mtp needs a GGUF that kept its NextN/MTP block); it exited with code 1; "
        f"log: {log}")


def test_port_taken(toolchain, models, tmp_path):
    log = tmp_path / "port.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerError) as exc:
            LlamaServer(toolchain, models["mtp"], log, port=port, ctx=512).start()
    assert first_line(exc) == (f"llama-server did not start: port {port} on 127.0.0.1 is already in use; "
                               f"it exited with code 1; log: {log}")


def test_a_port_taken_after_probing_is_retried(toolchain, models, tmp_path, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        real = srv_mod.free_port
        monkeypatch.setattr(srv_mod, "free_port", lambda host: ports.pop() if ports else real(host))
        with LlamaServer(toolchain, models["mtp"], tmp_path / "retry.log", ctx=512, threads=1) as s:
            assert s.port != taken.getsockname()[1]
            assert s.get("/health") == {"status": "ok"}
    assert "was taken; retrying on another port" in (tmp_path / "retry.log").read_text()


def test_unknown_spec_type(toolchain, models, tmp_path):
    with pytest.raises(ServerError) as exc:
        LlamaServer(toolchain, models["mtp"], tmp_path / "t.log", spec_type="mtp").start()
    assert first_line(exc) == ('llama-server did not start: error while handling argument "--spec-type": unknown '
                               f'speculative type: mtp; it exited with code 1; log: {tmp_path / "t.log"}')


# ----------------------------------------------------------------------------------------------- fake binary

FAKE = r'''
import http.server, json, os, signal, sys, time
mode = os.environ["FAKE_LLAMA_MODE"]
args = sys.argv[1:]
port, model = int(args[args.index("--port") + 1]), args[args.index("-m") + 1]
print("fake llama-server", mode, flush=True)
if mode == "hang":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
    while True:
        time.sleep(1)

class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def answer(self, data):
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/slots":
            self.answer([{"id": 0, "speculative": False}])
        elif self.path == "/props":
            self.answer({"model_path": model})
        else:
            self.answer({"status": "ok"})
    def do_POST(self):
        if mode == "crash":
            print("E fake: segmentation fault while decoding", flush=True)
            os._exit(3)
        time.sleep(60)

http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    exe = bin_dir / "llama-server"
    exe.write_text(f"#!{sys.executable}\n" + textwrap.dedent(FAKE))
    exe.chmod(0o755)

    def make(mode: str, **kw) -> LlamaServer:
        monkeypatch.setenv("FAKE_LLAMA_MODE", mode)
        return LlamaServer(Toolchain(bin_dir, "test"), tmp_path / "m.gguf", tmp_path / f"{mode}.log", **kw)

    return make


def test_hung_server_is_killed(fake, tmp_path):
    s = fake("hang", start_timeout=1.0, stop_timeout=0.5)
    with pytest.raises(ServerError) as exc:
        s.start()
    assert first_line(exc) == ("llama-server did not start: not ready after 1 s (still loading or hung); it was "
                               f"stopped; log: {tmp_path / 'hang.log'}")
    assert "# stopped: was killed by signal SIGKILL" in (tmp_path / "hang.log").read_text()


def test_crash_during_a_request(fake, tmp_path):
    with pytest.raises(ServerError) as exc:
        with fake("crash") as s:
            pid = s.proc.pid
            s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert first_line(exc) == ("llama-server exited with code 3 during POST /v1/chat/completions; "
                               f"log: {tmp_path / 'crash.log'}")
    assert "segmentation fault" in exc.value.message
    assert gone(pid)


def test_request_timeout(fake, tmp_path):
    with pytest.raises(ServerError) as exc:
        with fake("slow", request_timeout=0.5) as s:
            pid = s.proc.pid
            s.post("/completion", {"prompt": "hi"})
    assert exc.value.message == f"POST /completion timed out after 0.5 s; log: {tmp_path / 'slow.log'}"
    assert gone(pid)


def test_mtp_asked_but_slots_say_not_speculative(fake, tmp_path):
    with pytest.raises(ServerError) as exc:
        fake("slow", spec_type="draft-mtp", draft_n_max=3).start()
    assert first_line(exc) == ("llama-server did not start: speculative decoding is not active (/slots says "
                               "speculative=[False]) although --spec-type draft-mtp was given; it was stopped; "
                               f"log: {tmp_path / 'slow.log'}")


def test_missing_binary(tmp_path):
    from mtpquant.core.errors import ToolchainError

    with pytest.raises(ToolchainError):
        LlamaServer(Toolchain(tmp_path, "test"), tmp_path / "m.gguf", tmp_path / "x.log")
    assert os.listdir(tmp_path) == []
