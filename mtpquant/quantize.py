"""One variant through llama-quantize: argv list, log, progress from its [i/N] lines, partial files removed."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from mtpquant.errors import ToolError
from mtpquant.plan import VariantPlan
from mtpquant.procs import run_tool
from mtpquant.progress import ProgressFn, no_progress
from mtpquant.toolchain import Toolchain

PROGRESS_RE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
LLAMA_MESSAGE_RE = re.compile(r"((?:failed to|Missing importance matrix|error: |invalid |requantizing from).*)")


@dataclass(frozen=True)
class QuantizeRun:
    argv: tuple[str, ...]
    seconds: float


def quantize_argv(tc: Toolchain, source: Path, out: Path, vplan: VariantPlan, tensor_types: Path | None,
                  imatrix: Path | None, threads: int | None = None) -> list:
    argv: list = [tc.tool("llama-quantize")]
    if imatrix is not None:
        argv += ["--imatrix", imatrix]
    if tensor_types is not None:
        argv += ["--tensor-type-file", tensor_types]
    argv += [source, out, vplan.variant.type, str(threads or os.cpu_count() or 2)]
    return argv


def run_quantize(tc: Toolchain, source: Path, out: Path, vplan: VariantPlan, tensor_types: Path | None,
                 imatrix: Path | None, log: Path, cwd: Path, progress: ProgressFn = no_progress) -> QuantizeRun:
    """Quantize into `out` (a temporary name the caller renames after verification); on failure remove it and
    raise with llama.cpp's own message."""
    label = f"quantize {vplan.variant.tag}"

    def on_line(line: str) -> None:
        if m := PROGRESS_RE.match(line):
            progress(label, int(m.group(1)), int(m.group(2)))

    argv = quantize_argv(tc, source, out, vplan, tensor_types, imatrix)
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
