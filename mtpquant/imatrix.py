"""Importance matrices: a pinned file checked by sha256, or computed once by llama-imatrix (with NextN statistics)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mtpquant.errors import MtpquantError, VerifyError
from mtpquant.files import atomic_path, sha256_file
from mtpquant.inspect import ImatrixInfo, ModelInfo, read_imatrix
from mtpquant.procs import run_tool
from mtpquant.progress import ProgressFn, no_progress
from mtpquant.toolchain import Toolchain

CHUNK_RE = re.compile(r"\[(\d+)\]")

# How the draft head's low-bit tensors got their importance data, for receipts and the card.
DRAFT_COLLECTED = "collected"  # llama-imatrix --nextn ran the NextN block
DRAFT_PINNED = "pinned"  # uncovered tensors pinned to an imatrix-free type
DRAFT_UNWEIGHTED = "unweighted"  # quantized without importance data (types that allow it)
DRAFT_NO_IMATRIX = "no imatrix"


@dataclass(frozen=True)
class ImatrixResult:
    path: Path
    sha256: str
    info: ImatrixInfo
    reused: bool


class CoverageError(MtpquantError):
    """The imatrix lacks statistics that the plan relies on."""


def compute_args(source: Path, corpus: Path, out: Path, chunks: int, ctx: int, nextn: bool,
                 threads: int | None = None) -> list:
    """llama-imatrix arguments; --nextn needs one sequence per batch, so -b is set to -c."""
    argv: list = ["-m", source, "-f", corpus, "-o", out, "--chunks", str(chunks), "-c", str(ctx), "-b", str(ctx),
                  "-t", str(threads or os.cpu_count() or 2), "--no-ppl"]
    if nextn:
        argv.append("--nextn")
    return argv


def compute(tc: Toolchain, source: Path, corpus: Path, dest: Path, chunks: int, ctx: int, nextn: bool,
            log: Path, progress: ProgressFn = no_progress) -> ImatrixResult:
    """Run llama-imatrix into `dest` (written under a temporary name, renamed when complete)."""
    with atomic_path(dest) as tmp:
        def on_line(line: str) -> None:
            if "compute_imatrix" in line or line.startswith("["):
                for m in CHUNK_RE.finditer(line):
                    progress("imatrix", min(int(m.group(1)), chunks), chunks)

        # llama-imatrix insists on a .gguf suffix to pick the GGUF writer; the temp name keeps it.
        out = tmp.with_name(tmp.name + ".gguf")
        try:
            run_tool([tc.tool("llama-imatrix"), *compute_args(source, corpus, out, chunks, ctx, nextn)],
                     log_path=log, on_line=on_line)
            if not out.is_file():
                raise MtpquantError(f"llama-imatrix finished but wrote no file; log: {log}")
            os.replace(out, tmp)
        finally:
            out.unlink(missing_ok=True)
    progress("imatrix", chunks, chunks)
    info = read_imatrix(dest)
    return ImatrixResult(dest, sha256_file(dest), info, reused=False)


def load_pinned(path: Path, expected_sha256: str) -> ImatrixResult:
    """A user-supplied imatrix, refused unless its sha256 is the one the recipe pins."""
    sha = sha256_file(path)
    if sha != expected_sha256:
        raise VerifyError(f"{path}: sha256 is {sha}, the recipe pins {expected_sha256}",
                          "use the file the recipe was written for, or update imatrix.file.sha256")
    return ImatrixResult(path, sha, read_imatrix(path), reused=True)


def predicted_coverage(model: ModelInfo, nextn: bool) -> set[str]:
    """Weights llama-imatrix records: every block's matrices it runs (the NextN block only with --nextn)."""
    blocks = set(range(model.n_layer)) | (set(model.nextn.blocks) if nextn else set())
    return {t.name for t in model.tensors if t.block in blocks and len(t.shape) >= 2}


def check_coverage(needed: dict[str, list[str]], info: ImatrixInfo) -> None:
    """Every tensor a variant plans to weight by importance must have an entry."""
    have = set(info.entries)
    problems = []
    for tag, names in needed.items():
        lacking = sorted(n for n in names if n not in have)
        if lacking:
            problems.append(f"variant {tag}: {', '.join(lacking[:6])}" + (f" and {len(lacking) - 6} more"
                                                                          if len(lacking) > 6 else ""))
    if problems:
        raise CoverageError(f"{info.path.name} has no statistics for tensors that need them: " + "; ".join(problems),
                            "collect them (imatrix.compute.nextn: true) or set imatrix.uncovered: pin")


def draft_head_path(model: ModelInfo, info: ImatrixInfo | None, pins: tuple[str, ...]) -> str:
    """Which path the NextN block's quantization took: collected, pinned, unweighted or no imatrix."""
    if info is None:
        return DRAFT_NO_IMATRIX
    nextn_prefixes = tuple(f"blk.{b}." for b in model.nextn.blocks)
    if any(e.startswith(nextn_prefixes) for e in info.entries):
        return DRAFT_COLLECTED
    if any(p.startswith(nextn_prefixes) for p in pins):
        return DRAFT_PINNED
    return DRAFT_UNWEIGHTED


def write_placeholder(model: ModelInfo, covered: set[str], dest: Path) -> Path:
    """A stand-in imatrix for --dry-run only: one uniform entry, for the smallest covered weight.

    llama-quantize picks some mixture types by whether any imatrix is given at all (not by its entries), so the
    plan of a variant whose imatrix is not computed yet must be dry-run with one to show the types the real run
    will write. One entry keeps it tiny for a 35B model; coverage itself is checked by mtpquant, not by dry runs.
    """
    import gguf
    import numpy as np

    with atomic_path(dest) as tmp:
        w = gguf.GGUFWriter(tmp, arch="imatrix", use_temp_file=False)
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", ["mtpquant-placeholder"])
        w.add_uint32("imatrix.chunk_count", 1)
        w.add_uint32("imatrix.chunk_size", 1)
        for t in sorted((t for t in model.tensors if t.name in covered), key=lambda t: t.n_elements)[:1]:
            n_mat = t.shape[2] if len(t.shape) > 2 else 1
            w.add_tensor(f"{t.name}.in_sum2", np.ones((n_mat, t.shape[0]), dtype=np.float32))
            w.add_tensor(f"{t.name}.counts", np.ones((n_mat, 1), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return dest
