"""llama-imatrix: importance statistics from a corpus, with the NextN block's (--nextn) when asked."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import MtpquantError, UsageError
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
                 threads: int | None = None, first_chunk: int = 0) -> list:
    """llama-imatrix arguments; --nextn needs one sequence per batch, so -b is set to -c. With `first_chunk` the
    corpus's first chunks are skipped (--chunk), so `chunks` chunks from there are one part of a map-reduce."""
    skip = ["--chunk", str(first_chunk)] if first_chunk else []
    argv: list = ["-m", source, "-f", corpus, "-o", out, *skip, "--chunks", str(chunks), "-c", str(ctx), "-b",
                  str(ctx), "-t", str(threads or os.cpu_count() or 2), "--no-ppl"]
    if nextn:
        argv.append("--nextn")
    return argv


def compute_imatrix(tc: Toolchain, source: Path, corpus: Path, dest: Path, chunks: int, ctx: int, nextn: bool,
                    log: Path, cwd: Path | None = None, progress: ProgressFn = no_progress, first_chunk: int = 0,
                    label: str = "imatrix") -> ImatrixResult:
    """Run llama-imatrix into `dest` (written under a temporary name, renamed when complete).

    `corpus` may be relative to `cwd`: llama-imatrix records the path as given as the imatrix's dataset name."""
    def on_line(line: str) -> None:
        if "compute_imatrix" in line or line.startswith("["):
            for m in CHUNK_RE.finditer(line):
                progress(label, min(int(m.group(1)), chunks), chunks)

    _write_gguf(tc, compute_args(source, corpus, None, chunks, ctx, nextn, first_chunk=first_chunk), dest, log, cwd,
                on_line)
    progress(label, chunks, chunks)
    info = read_imatrix(dest)
    return ImatrixResult(dest, sha256_file(dest), info, reused=False)


def _write_gguf(tc: Toolchain, args: list, dest: Path, log: Path, cwd: Path | None, on_line=None) -> None:
    """llama-imatrix with `-o` pointed at a temporary name that is renamed to `dest` only when complete."""
    with atomic_path(dest) as tmp:
        # llama-imatrix insists on a .gguf suffix to pick the GGUF writer; the temp name keeps it.
        out = tmp.with_name(tmp.name + ".gguf")
        args = [out.absolute() if a is None else a for a in args]
        try:
            run_tool([tc.tool("llama-imatrix"), *args], log_path=log, on_line=on_line, cwd=cwd)
            if not out.is_file():
                raise MtpquantError(f"llama-imatrix finished but wrote no file; log: {log}")
            os.replace(out, tmp)
        finally:
            out.unlink(missing_ok=True)


def chunk_ranges(chunks: int, parts: int) -> list[tuple[int, int]]:
    """The corpus's chunks as `parts` contiguous (first, count) ranges of near-equal size, in corpus order."""
    if not 1 <= parts <= chunks // 2:
        raise UsageError(f"--imatrix-parts {parts}: the imatrix has {chunks} chunks and llama-imatrix needs at least "
                         f"2 per part", f"give 1 to {max(1, chunks // 2)}")
    base, extra = divmod(chunks, parts)
    out, first = [], 0
    for i in range(parts):
        count = base + (i < extra)
        out.append((first, count))
        first += count
    return out


def merge_args(source: Path, parts: list[Path], out: Path | None) -> list:
    """llama-imatrix's own merge: no corpus, every part as --in-file (their sums and counts are added); -m is
    required by its argument parser though no model is loaded."""
    return ["-m", source, *[a for p in parts for a in ("--in-file", p)], "-o", out]


def merge_imatrix(tc: Toolchain, source: Path, parts: list[Path], dest: Path, log: Path,
                  cwd: Path | None = None) -> ImatrixResult:
    """Merge part imatrix files into `dest` with llama-imatrix --in-file (relative part paths are taken from
    `cwd`)."""
    _write_gguf(tc, merge_args(source, parts, None), dest, log, cwd)
    info = read_imatrix(dest)
    return ImatrixResult(dest, sha256_file(dest), info, reused=False)
