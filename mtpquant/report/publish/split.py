"""Artifacts over the Hub's per-file limit, split with llama-gguf-split into shards proven to hold the artifact's
metadata and tensor bytes (or the shards an earlier publish made, when still intact)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from mtpquant.core.errors import UsageError, VerifyError
from mtpquant.core.files import CHUNK, free_bytes, sha256_file
from mtpquant.core.procs import run_tool
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.receipts import ImatrixReceipt, PublishReceipt
from mtpquant.core.rundir import RunDir
from mtpquant.llamacpp.toolchain import locate
from mtpquant.modelfile.header import raw_fields, read_header
from mtpquant.report.publish.plan import PlannedFile

log = logging.getLogger(__name__)

DEFAULT_SPLIT_MAX_SIZE = 50 * 1000**3  # the Hub's per-file limit, 50 GB
SPLIT_UNIT = 1000**2  # llama-gguf-split takes sizes in M (10^6 bytes) or G
SPLIT_SLACK = 64 << 10  # room for the split.* keys and tensor-info alignment the shards add to the metadata
SPLIT_DIR = "split"
CHANGED_HINT = "the split tool changed the file; check the toolchain"


def artifact_files(run: RunDir, sums: dict[str, str], limit: int, dry_run: bool, toolchain, progress: ProgressFn
                   ) -> tuple[list[PlannedFile], dict[str, list[PlannedFile]], bool]:
    """Every verified artifact, whole or as shards; and whether any shard is still to be made (dry run)."""
    imatrix_receipt = run.read(ImatrixReceipt, stale_ok=True)
    imatrix = imatrix_receipt.file if imatrix_receipt else None
    published = run.read(PublishReceipt, stale_ok=True)
    previous = published.body() if published else {}
    artifacts, shards, to_split = [], {}, []
    for name, sha in sorted(sums.items()):
        path = run.root / name
        kind = "imatrix" if name == imatrix else "artifact"
        artifacts.append(PlannedFile(name, kind, path, path.stat().st_size, sha))
        if path.stat().st_size <= limit:
            continue
        kept = _kept_shards(run, name, sha, limit, previous, progress)
        if kept is not None:
            shards[name] = kept
        else:
            to_split.append(artifacts[-1])
    if to_split and not dry_run:
        need, free = sum(a.size for a in to_split) + SPLIT_SLACK * len(to_split), free_bytes(run.root / SPLIT_DIR)
        if need > free:
            raise UsageError(f"not enough free disk in {run.root} to split {', '.join(a.path for a in to_split)}: "
                             f"the shards need {need} bytes, {free} are free", "free some space and run again")
    tc = (toolchain if toolchain is not None else locate()) if to_split else None
    for a in to_split:
        shards[a.path] = (_predicted_shards(tc, a.local, limit) if dry_run
                          else split_artifact(tc, run, a.path, a.sha256, limit, progress))
    return artifacts, dict(sorted(shards.items())), bool(to_split) and dry_run


def split_artifact(tc, run: RunDir, name: str, sha256: str, limit: int, progress: ProgressFn = no_progress
                   ) -> list[PlannedFile]:
    """Split an artifact into shards of at most `limit` bytes under split/<stem>/, proven to hold its metadata and
    tensor bytes; the folder appears only once that holds."""
    src = run.root / name
    stem = name.removesuffix(".gguf")
    final = run.root / SPLIT_DIR / stem
    tmp = final.with_name(f".{stem}.{os.getpid()}.incomplete")
    for stale in final.parent.glob(f".{stem}.*.incomplete"):  # a killed split's (the caller holds the run's lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        label = f"split {name}"
        progress(label, 0, 1)
        run_tool([tc.tool("llama-gguf-split"), "--split", "--split-max-size", _size_arg(src, limit), src, tmp / stem],
                 log_path=run.logs / f"split-{stem}.log")
        progress(label, 1, 1)
        made = _shard_files(tmp, stem)
        for p in made:
            if p.stat().st_size > limit:
                raise VerifyError(f"{p.name}: {p.stat().st_size} bytes, over the {limit}-byte limit (one tensor "
                                  "is larger than the limit)", "raise the split size; the Hub's limit is 50 GB")
        check_shards(src, made, progress)
        parts = [(p.name, p.stat().st_size, sha256_file(p)) for p in made]
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [PlannedFile(f"{stem}/{n}", "shard", final / n, size, sha, part_of=name) for n, size, sha in parts]


def _size_arg(src: Path, limit: int) -> str:
    """--split-max-size counts tensor bytes only: leave room for the metadata every shard repeats or adds."""
    meta = read_header(src).data_offset
    mb = (limit - meta - SPLIT_SLACK) // SPLIT_UNIT
    if mb < 1:
        raise UsageError(f"{src.name}: its {meta}-byte metadata leaves no room for tensors in {limit}-byte shards",
                         "raise the split size")
    return f"{mb}M"


def _shard_files(folder: Path, stem: str) -> list[Path]:
    found = sorted(folder.glob(f"{stem}-*-of-*.gguf"))
    n = len(found)
    want = [folder / f"{stem}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    if not found or found != want:
        raise VerifyError(f"llama-gguf-split left {', '.join(p.name for p in found) or 'no shard'} for {stem}",
                          f"see logs/split-{stem}.log")
    return found


def check_shards(src: Path, shards: list[Path], progress: ProgressFn = no_progress) -> None:
    """The shards hold the artifact's metadata (less the split.* keys) and its tensors, same order, same bytes."""
    want, got = raw_fields(src), raw_fields(shards[0])
    for key in list(want) + [k for k in got if k not in want]:
        if want.get(key) != got.get(key):
            raise VerifyError(f"{shards[0].name}: metadata key {key} differs from {src.name}", CHANGED_HINT)
    orig = read_header(src).tensors
    parts = [(p, t) for p in shards for t in read_header(p).tensors]
    if [t.name for _, t in parts] != [t.name for t in orig]:
        raise VerifyError(f"{src.name}: its shards hold other tensors, or in another order", CHANGED_HINT)
    total, done = sum(t.n_bytes for t in orig), 0
    label = f"check shards of {src.name}"
    with open(src, "rb") as a, contextlib.ExitStack() as stack:
        handles = {p: stack.enter_context(open(p, "rb")) for p in shards}
        for (p, t), o in zip(parts, orig):
            if (t.tensor_type, t.shape, t.n_bytes) != (o.tensor_type, o.shape, o.n_bytes):
                raise VerifyError(f"{p.name}: tensor {t.name} has another type or shape than in {src.name}",
                                  CHANGED_HINT)
            if not _same_bytes(a, o.data_offset, handles[p], t.data_offset, o.n_bytes):
                raise VerifyError(f"{p.name}: the bytes of tensor {t.name} differ from {src.name}", CHANGED_HINT)
            done += o.n_bytes
            progress(label, done, total)


def _same_bytes(a, a_off: int, b, b_off: int, n: int) -> bool:
    a.seek(a_off)
    b.seek(b_off)
    while n > 0:
        k = min(CHUNK, n)
        if a.read(k) != b.read(k):
            return False
        n -= k
    return True


def _kept_shards(run: RunDir, name: str, sha: str, limit: int, previous: dict, progress: ProgressFn
                 ) -> list[PlannedFile] | None:
    """The shards an earlier publish made of this very artifact at this limit, if they are still intact."""
    rec = (previous.get("artifacts") or {}).get(name) or {}
    if previous.get("split_max_size") != limit or rec.get("sha256") != sha or not rec.get("shards"):
        return None
    out = []
    for s in rec["shards"]:
        local = run.root / SPLIT_DIR / s["path"]
        if not local.is_file() or local.stat().st_size != s["size"] or sha256_file(local) != s["sha256"]:
            log.info("re-splitting %s: %s is missing or changed", name, local)
            return None
        out.append(PlannedFile(s["path"], "shard", local, s["size"], s["sha256"], part_of=name))
    progress(f"reuse shards of {name}", 1, 1)
    return out


def _predicted_shards(tc, src: Path, limit: int) -> list[PlannedFile]:
    """The shard names a split would give (llama-gguf-split --dry-run writes nothing); sizes and sha256s unknown."""
    stem = src.name.removesuffix(".gguf")
    with tempfile.TemporaryDirectory() as tmp:
        out = run_tool([tc.tool("llama-gguf-split"), "--split", "--dry-run", "--split-max-size", _size_arg(src, limit),
                        src, Path(tmp) / stem]).stdout
    m = re.search(r"n_split:\s*(\d+)", out)
    if not m:
        raise VerifyError(f"llama-gguf-split --dry-run printed no split plan for {src.name}")
    n = int(m[1])
    return [PlannedFile(f"{stem}/{stem}-{i:05d}-of-{n:05d}.gguf", "shard", None, None, None, "make", src.name)
            for i in range(1, n + 1)]
