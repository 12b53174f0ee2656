"""llama-imatrix: importance statistics from a corpus, with the NextN block's (--nextn) when asked."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import MtpquantError
from mtpquant.core.files import atomic_path, sha256_file
from mtpquant.core.procs import run_tool
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.llamacpp.toolchain import Toolchain
from mtpquant.modelfile.imatrix import ImatrixInfo, read_imatrix

CHUNK_RE = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class ImatrixResult:
    path: Path
    sha256: str
    info: ImatrixInfo
    reused: bool


def compute_args(source: Path, corpus: Path, out: Path, chunks: int, ctx: int, nextn: bool,
                 threads: int | None = None) -> list:
    """llama-imatrix arguments; --nextn needs one sequence per batch, so -b is set to -c."""
    argv: list = ["-m", source, "-f", corpus, "-o", out, "--chunks", str(chunks), "-c", str(ctx), "-b", str(ctx),
                  "-t", str(threads or os.cpu_count() or 2), "--no-ppl"]
    if nextn:
        argv.append("--nextn")
    return argv


def compute_imatrix(tc: Toolchain, source: Path, corpus: Path, dest: Path, chunks: int, ctx: int, nextn: bool,
                    log: Path, cwd: Path | None = None, progress: ProgressFn = no_progress) -> ImatrixResult:
    """Run llama-imatrix into `dest` (written under a temporary name, renamed when complete).

    `corpus` may be relative to `cwd`: llama-imatrix records the path as given as the imatrix's dataset name."""
    with atomic_path(dest) as tmp:
        def on_line(line: str) -> None:
            if "compute_imatrix" in line or line.startswith("["):
                for m in CHUNK_RE.finditer(line):
                    progress("imatrix", min(int(m.group(1)), chunks), chunks)

        # llama-imatrix insists on a .gguf suffix to pick the GGUF writer; the temp name keeps it.
        out = tmp.with_name(tmp.name + ".gguf")
        try:
            run_tool([tc.tool("llama-imatrix"), *compute_args(source, corpus, out.absolute(), chunks, ctx, nextn)],
                     log_path=log, on_line=on_line, cwd=cwd)
            if not out.is_file():
                raise MtpquantError(f"llama-imatrix finished but wrote no file; log: {log}")
            os.replace(out, tmp)
        finally:
            out.unlink(missing_ok=True)
    progress("imatrix", chunks, chunks)
    info = read_imatrix(dest)
    return ImatrixResult(dest, sha256_file(dest), info, reused=False)
