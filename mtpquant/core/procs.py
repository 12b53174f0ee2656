"""Running external programs: argv lists, a log file per run, typed failures with the log's tail."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import ToolError

TAIL_LINES = 20
PR_SET_PDEATHSIG = 1


def _load_prctl():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: children still get their own process group
        return None


_PRCTL = _load_prctl() if sys.platform.startswith("linux") else None


@dataclass(frozen=True)
class ToolRun:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    log_path: Path | None


class _Log:
    """A tool's log file. A failed write (a full disk) is kept, not raised, so the tool's output is still drained;
    `check` raises it afterwards as an OSError naming the log."""

    def __init__(self, path: Path | None):
        self.path, self.error = path, None
        self.f = open(path, "a", encoding="utf-8", errors="replace") if path else None  # noqa: SIM115

    def write(self, text: str, flush: bool = False) -> None:
        if self.f is None or self.error is not None:
            return
        try:
            self.f.write(text)
            if flush:
                self.f.flush()
        except OSError as exc:
            self.error = exc

    def close(self) -> None:
        if self.f is not None:
            try:
                self.f.close()
            except OSError as exc:
                self.error = self.error or exc

    def check(self) -> None:
        if self.error is not None:
            raise OSError(self.error.errno, self.error.strerror, str(self.path)) from self.error


def describe_exit(returncode: int | None, timed_out: bool = False) -> str:
    """Human words for how a process ended."""
    if timed_out:
        return "timed out"
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"was killed by signal {name}"
    return f"exited with code {returncode}"


def run_tool(
    argv: list[str | os.PathLike],
    log_path: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    hint: str | None = None,
) -> ToolRun:
    """Run argv, tee stdout+stderr line by line to log_path and on_line; raise ToolError on failure.

    stdout is also returned separately, since some llama.cpp tools print results there and logs on stderr.
    """
    args = [str(a) for a in argv]
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    log = _Log(log_path)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    out_lines: list[str] = []
    lock = threading.Lock()
    log.write("$ " + " ".join(args) + "\n", flush=True)

    def pump(stream, keep: bool) -> None:
        for raw in iter(stream.readline, ""):
            line = raw.rstrip("\n")
            with lock:
                tail.append(line)
                if keep:
                    out_lines.append(line)
                log.write(raw if raw.endswith("\n") else raw + "\n")
                if on_line:
                    on_line(line)
        stream.close()

    threads: list[threading.Thread] = []
    timed_out = False
    try:
        proc = spawn(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", cwd=cwd,
                     env=env, bufsize=1)
    except FileNotFoundError as exc:
        log.close()
        raise ToolError(args, "could not be started (not found)", log_path, str(exc), hint) from None
    try:  # from the moment the child exists: a signal while the readers start must stop it too
        threads += [threading.Thread(target=pump, args=(proc.stdout, True), daemon=True),
                    threading.Thread(target=pump, args=(proc.stderr, False), daemon=True)]
        for t in threads:
            t.start()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        stop(proc)
    except BaseException:
        stop(proc)
        raise
    finally:
        for t in threads:
            if t.ident is not None:  # started
                t.join(timeout=5)
        log.write(f"# {describe_exit(proc.returncode, timed_out)}\n")
        log.close()
    log.check()  # a log that could not be written (a full disk) is the first thing to say
    if check and (timed_out or proc.returncode != 0):
        raise ToolError(args, describe_exit(proc.returncode, timed_out), log_path, "\n".join(tail), hint)
    return ToolRun(tuple(args), proc.returncode, "\n".join(out_lines), log_path)


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGKILL when the parent dies, so a killed mtpquant leaves no tool running."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def spawn(argv: list[str], **popen) -> subprocess.Popen:
    """Start a program from an argv list (never a shell), stdin closed, in its own process group, and tied to this
    process's life (Linux: PR_SET_PDEATHSIG), so no child outlives mtpquant however mtpquant ends."""
    held: list[tuple[int, object]] = []
    proc = None
    try:
        with _signals_held(held):
            proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_parent if _PRCTL is not None else None, **popen)
    finally:
        if held:  # a stop signal came while the child was being started: stop it, then act on the signal
            if proc is not None:
                stop(proc)
            _redeliver(*held[0])
    return proc


@contextlib.contextmanager
def _signals_held(held: list):
    """Keep stop signals that arrive during a fork in `held` (with the handler they had), to act on them after it.

    A signal's Python handler can run inside an at-fork hook (filelock registers one), where an exception such as
    KeyboardInterrupt is printed and dropped: a SIGTERM sent just then would be lost and the command would go on."""
    if threading.current_thread() is not threading.main_thread():  # handlers run in the main thread only
        yield
        return
    # a signal set outside Python (None) cannot be put back, and an ignored one (nohup) must stay ignored in the child
    previous = {sig: h for sig in STOP_SIGNALS if (h := signal.getsignal(sig)) not in (None, signal.SIG_IGN)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: held.append((signum, previous[signum])))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _redeliver(signum: int, handler) -> None:
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """terminate -> wait -> kill, for the child and anything it started in its process group."""
    if proc.poll() is not None:
        return
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def capture(argv: list, timeout: float = 60.0) -> tuple[int | None, str]:
    """Run a short command (a probe) and return its exit code and combined output; None when it could not run or
    timed out, with the reason as the output."""
    try:
        proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    except OSError as exc:
        return None, str(exc)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        return None, f"{Path(str(argv[0])).name} timed out after {timeout:g} s"
    except BaseException:
        stop(proc)
        raise
    return proc.returncode, out
