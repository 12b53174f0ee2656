"""llama-server as a context manager: argv list, free loopback port, full log, health/slots checks, clean shutdown.

Facts from llama.cpp 515e855 this relies on: the HTTP socket is bound before the model loads (a taken port fails at
once with "couldn't bind HTTP server socket"); /health answers 503 "Loading model" until the model is ready; /props
always says speculative type "none", so /slots' per-slot "speculative" flag is what shows MTP is active; /metrics
(with --metrics) counts draft tokens, accepted tokens and verification steps, flushed when a request finishes.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import ServerError
from mtpquant.core.procs import describe_exit, spawn, stop
from mtpquant.llamacpp.toolchain import Toolchain

HOST = "127.0.0.1"
TAIL_LINES = 12
PORT_ATTEMPTS = 4
_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [A-Z] +(?:\S+ +)?")  # "0.00.008.090 E srv    load_model: "

# Known ways llama-server fails to start: (text in its log, cause shown to the user).
_CAUSES = (
    ("couldn't bind HTTP server socket", "port {port} on {host} is already in use"),
    ("context type MTP requested but model doesn't contain MTP layers",
     ("context type MTP requested but model doesn't contain MTP layers "
      "(--spec-type draft-mtp needs a GGUF that kept its NextN/MTP block)")),
    ("invalid magic characters", "{model} is not a GGUF file ({line})"),
    ("unknown speculative type", "{line}"),
    ("error while handling argument", "{line}"),
    ("invalid argument", "{line}"),
    ("failed to open GGUF file", "cannot open {model} ({line})"),
    ("error loading model", "llama.cpp cannot load {model} ({line})"),
    ("failed to create MTP context", "the MTP draft context could not be created ({line})"),
)


def free_port(host: str = HOST) -> int:
    """A loopback port nobody is listening on right now (the OS picks it; a race is handled by retrying)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: Path, n: int = TAIL_LINES, start: int = 0) -> list[str]:
    """The last n lines of a log file after byte offset `start` (empty if it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(start, size - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [ln.rstrip() for ln in text.splitlines() if ln.strip()][-n:]


def _clean(line: str) -> str:
    return _PREFIX.sub("", line).strip()


@dataclass(frozen=True)
class Placement:
    """Where weights and caches go, given explicitly and identically to every server of a comparison: llama.cpp's
    auto-fit (`-fit on`, its default) would otherwise place a larger MTP server differently from a vanilla one."""

    n_cpu_moe: int | None = None
    batch: int | None = None
    ubatch: int | None = None
    kv_type: str | None = None
    flash_attn: str | None = None

    def args(self) -> list[str]:
        a = ["-fit", "off"]
        for flag, value in (("-ncmoe", self.n_cpu_moe), ("-b", self.batch), ("-ub", self.ubatch),
                            ("-ctk", self.kv_type), ("-ctv", self.kv_type), ("-fa", self.flash_attn)):
            if value is not None:
                a += [flag, str(value)]
        return a


_BUFFER_RE = re.compile(r"(load_tensors|llama_kv_cache|llama_memory_recurrent|sched_reserve):\s+(\S+)\s+"
                        r"(model|KV|RS|compute) buffer size =\s+([\d.]+) MiB")
_OFFLOADED_RE = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


def loaded_placement(log_path: Path, start: int = 0) -> dict:
    """Where the server's load log says the weights and buffers went: {"offloaded": "n/m" or None, "model_mib":
    {device: MiB}, "kv_mib": [...], "rs_mib": [...], "compute_mib": [...]} (one entry per context and device)."""
    out: dict = {"offloaded": None, "model_mib": {}, "kv_mib": [], "rs_mib": [], "compute_mib": []}
    try:
        with open(log_path, "rb") as fh:
            fh.seek(start)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if m := _OFFLOADED_RE.search(line):
            out["offloaded"] = f"{m.group(1)}/{m.group(2)}"
        elif m := _BUFFER_RE.search(line):
            device, what, mib = m.group(2), m.group(3), float(m.group(4))
            if what == "model":
                out["model_mib"][device] = round(out["model_mib"].get(device, 0.0) + mib, 2)
            else:
                out[{"KV": "kv_mib", "RS": "rs_mib", "compute": "compute_mib"}[what]].append({device: mib})
    return out


class LlamaServer:
    """One llama-server process on a loopback port; use as `with LlamaServer(...) as srv:`.

    `spec_type` "draft-mtp" turns on MTP drafting with `draft_n_max` tokens per step; start-up then also checks
    through /slots that speculative decoding is really active. Per-request speculative settings do not exist in
    this llama.cpp (the server ignores them), so everything speculative is on this command line.
    """

    def __init__(self, tc: Toolchain, model: Path, log_path: Path, *, spec_type: str | None = None,
                 draft_n_max: int | None = None, ctx: int = 4096, threads: int | None = None,
                 gpu_layers: int | None = None, placement: Placement | None = None, parallel: int = 1,
                 extra_args: Sequence[str] = (), port: int | None = None,
                 host: str = HOST, start_timeout: float = 300.0, request_timeout: float = 600.0,
                 stop_timeout: float = 15.0):
        self.binary = tc.tool("llama-server")
        self.model = Path(model)
        self.log_path = Path(log_path)
        self.spec_type = spec_type
        self.draft_n_max = draft_n_max
        self.ctx = ctx
        self.threads = threads
        self.gpu_layers = gpu_layers
        self.placement = placement or Placement()
        self.parallel = parallel
        self.extra_args = [str(a) for a in extra_args]
        self.fixed_port = port
        self.host = host
        self.port: int | None = port
        self.start_timeout = start_timeout
        self.request_timeout = request_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None
        self.slots_info: list[dict] = []
        self.loaded: dict = {}
        self.startup_seconds: float | None = None
        self._log = None
        self._log_start = 0  # where the current attempt's output begins in the log

    # ------------------------------------------------------------------------------------------- command line

    @property
    def speculative(self) -> bool:
        return self.spec_type not in (None, "none")

    def args(self, port: int | None = None) -> list[str]:
        """Arguments after the binary, for a given port."""
        a = ["-m", str(self.model), "--host", self.host, "--port", str(port if port is not None else self.port),
             "-c", str(self.ctx), "-np", str(self.parallel), "--metrics", "--no-webui", "-lv", "4"]
        if self.threads is not None:
            a += ["-t", str(self.threads)]
        if self.gpu_layers is not None:
            a += ["-ngl", str(self.gpu_layers)]
        a += self.placement.args()
        if self.speculative:
            a += ["--spec-type", str(self.spec_type)]
            if self.draft_n_max is not None:
                a += ["--spec-draft-n-max", str(self.draft_n_max)]
        return a + self.extra_args

    @property
    def argv(self) -> list[str]:
        return [str(self.binary), *self.args()]

    def record_argv(self) -> list[str]:
        """The command for receipts: binary name and model file name, no machine-specific folders."""
        args = self.args()
        args[args.index("-m") + 1] = self.model.name
        return [self.binary.name, *args]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server and wait until it serves the model; on any failure nothing is left running."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self.fixed_port is not None else PORT_ATTEMPTS
        started = time.monotonic()
        for attempt in range(1, attempts + 1):
            self.port = self.fixed_port if self.fixed_port is not None else free_port(self.host)
            self._spawn()
            failure = self._wait_ready()
            if failure is None:
                break
            cause, how, port_taken = failure
            if port_taken and attempt < attempts:
                # Someone took the port between our probe and the server's bind: try another one.
                self._note(f"# port {self.port} was taken; retrying on another port")
                self._reap()
                continue
            self._reap()
            raise self._start_error(cause, how)
        self._check_identity()
        self.slots_info = self.slots()
        flags = [bool(s.get("speculative")) for s in self.slots_info]
        if self.speculative and not (flags and all(flags)):
            self.stop()
            raise self._start_error(f"speculative decoding is not active (/slots says speculative={flags}) "
                                    f"although --spec-type {self.spec_type} was given", "was stopped")
        self.startup_seconds = round(time.monotonic() - started, 3)
        self.loaded = loaded_placement(self.log_path, self._log_start)

    def _spawn(self) -> None:
        if self._log is None:
            self._log = open(self.log_path, "wb")  # a fresh log per server; retries append
        argv = self.argv
        self._log_start = self._log.tell()
        self._note("$ " + " ".join(argv))
        try:
            # idle OpenMP threads sleep instead of spinning: several servers resident at once (the smoke's arms)
            # must not take cores from the one answering
            env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "passive")}
            self.proc = spawn(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        except OSError as exc:
            raise self._start_error(f"cannot run {self.binary}: {exc.strerror or exc}", "could not be started") \
                from None

    def _note(self, text: str) -> None:
        if self._log is not None:
            self._log.write((text + "\n").encode())
            self._log.flush()

    def _wait_ready(self) -> tuple[str, str, bool] | None:
        """None when /health says ok; else (cause, how it ended, whether the port was taken)."""
        deadline = time.monotonic() + self.start_timeout
        delay = 0.05
        while True:
            code = self.proc.poll()
            if code is not None:
                cause, port_taken = self._diagnose()
                return cause, describe_exit(code), port_taken
            try:
                status, _ = self._request("GET", "/health", None, timeout=1.0)
                if status == 200:
                    return None
            except (OSError, http.client.HTTPException):
                pass  # not listening yet
            if time.monotonic() > deadline:
                return (f"not ready after {self.start_timeout:g} s (still loading or hung)",
                        "was stopped", False)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _diagnose(self) -> tuple[str, bool]:
        lines = log_tail(self.log_path, 200, self._log_start)
        values = {"port": self.port, "host": self.host, "model": self.model.name}
        for needle, template in _CAUSES:
            for line in lines:
                if needle in line:
                    return template.format(line=_clean(line), **values), needle.startswith("couldn't bind")
        errors = [_clean(ln) for ln in lines if re.match(r"^\d+\.\d+\.\d+\.\d+ E ", ln)]
        if errors:
            return errors[0], False
        return (_clean(lines[-1]) if lines else "no output"), False

    def _start_error(self, cause: str, how: str) -> ServerError:
        tail = log_tail(self.log_path, start=self._log_start)
        err = ServerError(f"llama-server did not start: {cause}; it {how}; log: {self.log_path}\n"
                          + "\n".join("  | " + ln for ln in tail))
        err.cause, err.log_path, err.tail = cause, self.log_path, tail
        return err

    def _check_identity(self) -> None:
        """Guard against a stranger on our port: the server that answered must be ours, serving our model."""
        props = self.get("/props")
        served = props.get("model_path")
        if self.proc.poll() is not None or (served and Path(served).name != self.model.name):
            self.stop()
            raise self._start_error(f"another server answered on port {self.port} (it serves {served})",
                                    "was stopped")

    def stop(self) -> None:
        """terminate -> wait -> kill; safe to call twice."""
        self._reap()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _reap(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            stop(proc, self.stop_timeout)
            self._note(f"# stopped: {describe_exit(proc.returncode)}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------------------------------- HTTP

    def _request(self, method: str, path: str, body: dict | None, timeout: float) -> tuple[int, object]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        ctype = resp.getheader("Content-Type", "")
        text = raw.decode("utf-8", errors="replace")
        if "json" in ctype or text[:1] in "{[":
            try:
                return resp.status, json.loads(text)
            except ValueError:
                pass
        return resp.status, text

    def call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        """One request; ServerError on a timeout, a dead server, or an HTTP error (with the server's message)."""
        if not self.alive:
            raise ServerError(f"llama-server is not running (request {method} {path}); log: {self.log_path}")
        t = timeout or self.request_timeout
        try:
            status, data = self._request(method, path, body, t)
        except TimeoutError:
            raise ServerError(f"{method} {path} timed out after {t:g} s; log: {self.log_path}") from None
        except (OSError, http.client.HTTPException) as exc:
            try:  # a dying server resets the connection a moment before it can be reaped
                code = self.proc.wait(timeout=2.0) if self.proc else None
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                tail = log_tail(self.log_path)
                raise ServerError(f"llama-server {describe_exit(code)} during {method} {path}; log: "
                                  f"{self.log_path}\n" + "\n".join("  | " + ln for ln in tail)) from None
            raise ServerError(f"{method} {path} failed: {exc}; log: {self.log_path}") from None
        if status != 200:
            msg = data.get("error", {}).get("message") if isinstance(data, dict) and isinstance(
                data.get("error"), dict) else str(data)[:300]
            raise ServerError(f"{method} {path} answered HTTP {status}: {msg}; log: {self.log_path}")
        return data

    def get(self, path: str, timeout: float | None = None):
        return self.call("GET", path, None, timeout)

    def post(self, path: str, body: dict, timeout: float | None = None):
        return self.call("POST", path, body, timeout)

    def slots(self) -> list[dict]:
        data = self.get("/slots", timeout=30)
        return data if isinstance(data, list) else []

    def metrics(self) -> dict[str, float]:
        """/metrics as {name: value}; labelled series as name{label="v"}."""
        text = self.get("/metrics", timeout=30)
        out: dict[str, float] = {}
        for line in str(text).splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            try:
                out[name.removeprefix("llamacpp:")] = float(value)
            except ValueError:
                continue
        return out

    def tokenize(self, text: str) -> list[int]:
        return list(self.post("/tokenize", {"content": text, "add_special": False}).get("tokens", []))

    def detokenize(self, tokens: list[int]) -> str:
        return str(self.post("/detokenize", {"tokens": tokens}).get("content", ""))
