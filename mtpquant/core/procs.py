"""Running external programs: argv lists, a log file per run, typed failures with the log's tail."""

from __future__ import annotations

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
    log = open(log_path, "a", encoding="utf-8", errors="replace") if log_path else None
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    out_lines: list[str] = []
    lock = threading.Lock()
    if log:
        log.write("$ " + " ".join(args) + "\n")
        log.flush()

    def pump(stream, keep: bool) -> None:
        for raw in iter(stream.readline, ""):
            line = raw.rstrip("\n")
            with lock:
                tail.append(line)
                if keep:
                    out_lines.append(line)
                if log:
                    log.write(raw if raw.endswith("\n") else raw + "\n")
                if on_line:
                    on_line(line)
        stream.close()

    try:
        proc = spawn(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", cwd=cwd,
                     env=env, bufsize=1)
    except FileNotFoundError as exc:
        if log:
            log.close()
        raise ToolError(args, "could not be started (not found)", log_path, str(exc), hint) from None
    threads = [threading.Thread(target=pump, args=(proc.stdout, True), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, False), daemon=True)]
    for t in threads:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        stop(proc)
    except BaseException:
        stop(proc)
        raise
    finally:
        for t in threads:
            t.join(timeout=5)
        if log:
            log.write(f"# {describe_exit(proc.returncode, timed_out)}\n")
            log.close()
    if check and (timed_out or proc.returncode != 0):
        raise ToolError(args, describe_exit(proc.returncode, timed_out), log_path, "\n".join(tail), hint)
    return ToolRun(tuple(args), proc.returncode, "\n".join(out_lines), log_path)


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGKILL when the parent dies, so a killed mtpquant leaves no tool running."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(argv: list[str], **popen) -> subprocess.Popen:
    """Start a program from an argv list (never a shell), stdin closed, in its own process group, and tied to this
    process's life (Linux: PR_SET_PDEATHSIG), so no child outlives mtpquant however mtpquant ends."""
    return subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_parent if _PRCTL is not None else None, **popen)


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
