"""Files written whole or not at all, and hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

CHUNK = 4 << 20


def incomplete_path(final: Path) -> Path:
    """A process-unique temporary name beside `final`, recognisable as unfinished."""
    return final.with_name(f".{final.name}.{os.getpid()}.incomplete")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path; rename it to `final` only if the block succeeds, else delete it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = incomplete_path(final)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(final: Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(final: Path, data) -> None:
    write_text_atomic(final, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """sha256 of a file, read in chunks; `progress(n)` is called with each chunk's size."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)  # one reused buffer: memory stays flat whatever the file size
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if progress:
                progress(n)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(data) -> str:
    """A stable digest of a JSON-able value (keys sorted)."""
    return sha256_bytes(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode())


def remove_stale_incomplete(folder: Path) -> list[Path]:
    """Delete `.incomplete` leftovers of killed runs; return what was removed."""
    removed = []
    if folder.is_dir():
        for p in folder.glob(".*.incomplete"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
