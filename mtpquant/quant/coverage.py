"""Importance data for a plan: a pinned imatrix checked by sha256, what a computed one will cover, whether each
variant's tensors that need statistics have them, and which path the draft head took."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from mtpquant.core.errors import CoverageError, VerifyError
from mtpquant.core.files import atomic_path, sha256_file
from mtpquant.llamacpp.imatrix import ImatrixResult
from mtpquant.modelfile.imatrix import ImatrixInfo, read_imatrix
from mtpquant.modelfile.model import ModelInfo

# How the draft head's low-bit tensors got their importance data, for receipts and the card.
DRAFT_COLLECTED = "collected"  # llama-imatrix --nextn ran the NextN block
DRAFT_PINNED = "pinned"  # uncovered tensors pinned to an imatrix-free type
DRAFT_UNWEIGHTED = "unweighted"  # quantized without importance data (types that allow it)
DRAFT_NO_IMATRIX = "no imatrix"


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
