"""llama-quantize: one variant (argv list, log, progress from its [i/N] lines, partial files removed), and its
--dry-run parsed into the type it will give each tensor."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import PlanError, ToolError
from mtpquant.core.procs import run_tool
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.llamacpp.toolchain import Toolchain

PROGRESS_RE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
LINE_RE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+-\s+\[([^\]]*)\],\s+type =\s*(\S+),(.*)$")
TARGET_RE = re.compile(r"(?:converting to (\S+?)\s|\((\S+)\)\s*$)")
LLAMA_MESSAGE_RE = re.compile(r"((?:failed to|Missing importance matrix|error: |invalid |requantizing from).*)")


@dataclass(frozen=True)
class QuantizeRun:
    argv: tuple[str, ...]
    seconds: float


def quantize_argv(tc: Toolchain, source: Path, out: Path, ftype: str, tensor_types: Path | None,
                  imatrix: Path | None, threads: int | None = None) -> list:
    argv: list = [tc.tool("llama-quantize")]
    if imatrix is not None:
        argv += ["--imatrix", imatrix]
    if tensor_types is not None:
        argv += ["--tensor-type-file", tensor_types]
    argv += [source, out, ftype, str(threads or os.cpu_count() or 2)]
    return argv


def run_quantize(tc: Toolchain, source: Path, out: Path, ftype: str, label: str, tensor_types: Path | None,
                 imatrix: Path | None, log: Path, cwd: Path, progress: ProgressFn = no_progress) -> QuantizeRun:
    """Quantize into `out` (a temporary name the caller renames after verification); on failure remove it and
    raise with llama.cpp's own message."""

    def on_line(line: str) -> None:
        if m := PROGRESS_RE.match(line):
            progress(label, int(m.group(1)), int(m.group(2)))

    argv = quantize_argv(tc, source, out, ftype, tensor_types, imatrix)
    written = out if out.is_absolute() else cwd / out
    started = time.monotonic()
    try:
        run_tool(argv, log_path=log, on_line=on_line, cwd=cwd)
    except ToolError as exc:
        written.unlink(missing_ok=True)  # llama-quantize leaves a truncated file behind on failure
        msg = _llama_message(log) or exc.tail.strip().splitlines()[-1:] or [exc.how]
        raise ToolError(exc.argv, exc.how, log, msg if isinstance(msg, str) else msg[0],
                        hint="nothing was kept; read the log for the full output") from None
    except BaseException:
        written.unlink(missing_ok=True)
        raise
    return QuantizeRun(tuple(str(a) for a in argv), round(time.monotonic() - started, 3))


def _llama_message(log: Path) -> str | None:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("$ "):
            continue
        if m := LLAMA_MESSAGE_RE.search(line):
            return m.group(1).strip()  # the first complaint is the cause; later ones repeat it
    return None


def parse_dry_run(text: str) -> dict[str, tuple[str, str | None]]:
    """{tensor: (source_type, target_type or None when copied unchanged)} from llama-quantize's tensor lines."""
    out: dict[str, tuple[str, str | None]] = {}
    for line in text.splitlines():
        m = LINE_RE.match(line.strip())
        if not m:
            continue
        rest = m.group(6)
        target = None
        if "->" in rest or "converting to" in rest:
            t = TARGET_RE.search(rest)
            if t:
                target = (t.group(1) or t.group(2)).upper()
        out[m.group(3)] = (m.group(5).upper(), target)
    return out


def dry_run(tc: Toolchain, source: Path, ftype: str, log: Path, overrides_file: Path | None = None,
            imatrix: Path | None = None) -> dict[str, tuple[str, str | None]]:
    """Run llama-quantize --dry-run and parse its per-tensor decisions."""
    argv: list = [tc.tool("llama-quantize"), "--dry-run"]
    if overrides_file is not None:
        argv += ["--tensor-type-file", overrides_file]
    if imatrix is not None:
        argv += ["--imatrix", imatrix]
    argv += [source, ftype, "1"]
    lines: list[str] = []
    run_tool(argv, log_path=log, on_line=lines.append)
    parsed = parse_dry_run("\n".join(lines))
    if not parsed:
        raise PlanError(f"llama-quantize --dry-run printed no tensor lines for {source.name}; log: {log}",
                        "is the toolchain the pinned llama.cpp? run `mtpquant toolchain doctor`")
    return parsed
