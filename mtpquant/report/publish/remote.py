"""The plan against what the hub holds: files already there with these bytes before the upload, and every file's
sha256 (LFS) or git blob id (regular file) on the hub after it."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from mtpquant.core.errors import VerifyError
from mtpquant.core.files import CHUNK
from mtpquant.report.publish.hub import RESUME_HINT, Hub, RemoteFile, RemoteState
from mtpquant.report.publish.plan import PlannedFile


def mark_unchanged(f: PlannedFile, remote: RemoteState | None) -> PlannedFile:
    """Mark a file unchanged when the hub already holds these very bytes at that path."""
    if f.action != "upload" or remote is None or f.path not in remote.files:
        return f
    if _same(remote.files[f.path], f):
        return dataclasses.replace(f, action="unchanged")
    return f


def _same(r: RemoteFile, f: PlannedFile) -> bool:
    if r.size != f.size:
        return False
    if r.sha256:
        return r.sha256 == f.sha256
    return r.blob_id == _git_oid(f.local)


def _git_oid(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_remote(hub: Hub, commit: str, files: tuple[PlannedFile, ...]) -> int:
    """Every file's sha256 (LFS) or git blob id (regular file) on the hub at `commit` against the run directory."""
    state = hub.state(commit)
    where = f"{hub.repo}@{commit[:12]}"
    if state is None:
        raise VerifyError(f"{hub.repo} is not on {hub.endpoint} after the upload", RESUME_HINT)
    for f in files:
        r = state.files.get(f.path)
        if r is None:
            raise VerifyError(f"{f.path}: not on the hub at {where} after the upload", RESUME_HINT)
        if r.sha256 is not None:
            if r.sha256 != f.sha256:
                raise VerifyError(f"{f.path}: the hub has sha256 {r.sha256} at {where}, the run directory has "
                                  f"{f.sha256}", RESUME_HINT)
        elif r.blob_id != _git_oid(f.local):
            raise VerifyError(f"{f.path}: the hub has git blob {r.blob_id} at {where}, the run directory's file is "
                              f"{_git_oid(f.local)}", RESUME_HINT)
        if r.size != f.size:
            raise VerifyError(f"{f.path}: the hub has {r.size} bytes at {where}, the run directory has {f.size}",
                              RESUME_HINT)
    return len(files)
