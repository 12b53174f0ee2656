"""Running external programs: argv lists, a log file per run, typed failures with the log's tail."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import ToolError

TAIL_LINES = 20


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
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, errors="replace", cwd=cwd, env=env, bufsize=1,
        )
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
        _stop(proc)
    except BaseException:
        _stop(proc)
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


def _stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """terminate -> wait -> kill."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
