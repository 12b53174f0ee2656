"""Files written whole or not at all, and hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

CHUNK = 4 << 20
# llama-gguf-split's shard names: <prefix>-00001-of-00003.gguf
SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


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
    except OSError as exc:
        if exc.filename is None:  # a failed write (a full disk) names no file: name the one being written
            raise OSError(exc.errno, exc.strerror, str(final)) from exc
        raise
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


def plain_json(value):
    """A value as JSON gives it back (tuples as lists, paths as strings): what a receipt reads like when reloaded."""
    return json.loads(json.dumps(value, default=str))


def sha256_json(data) -> str:
    """A stable digest of a JSON-able value (keys sorted)."""
    return sha256_bytes(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode())


def remove_stale_incomplete(folder: Path) -> list[Path]:
    """Delete the `.incomplete` leftovers of killed runs anywhere under `folder`; return what was removed.

    Callers hold the folder's lock, so no live writer's temporary file is among them."""
    removed = []
    if folder.is_dir():
        for p in folder.rglob(".*.incomplete*"):
            if p.is_file() or p.is_symlink():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def stat_key(path: Path) -> str:
    """The hash-cache key of a file as it is now: real path, size, mtime. A digest stored under it is reused
    only while the file is unchanged."""
    st = os.stat(path)
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


def cache_entries_for(cache: dict[str, str], paths) -> dict[str, str]:
    """The entries of a hash cache that belong to these files (by real path), for storing in a receipt."""
    prefixes = tuple(os.path.realpath(p) + ":" for p in paths)
    return {k: v for k, v in cache.items() if k.startswith(prefixes)}


def cached_sha256(path: Path, cache: dict[str, str], progress: Callable[[int], None] | None = None) -> str:
    """sha256 of a file, reusing `cache[stat_key(path)]`; a fresh digest is stored there."""
    key = stat_key(path)
    if key not in cache:
        cache[key] = sha256_file(path, progress)
    elif progress:
        progress(os.stat(path).st_size)
    return cache[key]


def free_bytes(folder: Path) -> int:
    """Bytes free to this user on the filesystem of `folder` (created if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize
