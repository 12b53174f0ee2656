"""huggingface_hub for one repo: the questions publish asks, the upload, and every failure as one line that says
whether anything was sent."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_session, get_token
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import (
    HFValidationError,
    are_progress_bars_disabled,
    build_hf_headers,
    disable_progress_bars,
    enable_progress_bars,
    validate_repo_id,
)

from mtpquant import __version__
from mtpquant.core.errors import MtpquantError, PublishError, UsageError
from mtpquant.core.progress import ProgressFn
from mtpquant.hub.client import bound_requests, first_line, is_network_error, server_message
from mtpquant.report.publish.plan import PlannedFile

TOKEN_HINT = "set HF_TOKEN or run `hf auth login` with a token that can write to {owner}"
RESUME_HINT = "run again: blobs the hub already holds are not sent again"
REPO_HINT = "give OWNER/NAME, e.g. my-org/Model-MTP-GGUF: letters, digits, '-', '_' and '.', at most 96 each"
NO_TOKEN = "no Hugging Face token: HF_TOKEN is not set and there is no saved login"


def check_repo_id(repo: str) -> str:
    """OWNER/NAME as the Hub accepts it, or a UsageError."""
    ok = isinstance(repo, str) and repo.count("/") == 1 and all(repo.split("/"))
    if ok:
        try:
            validate_repo_id(repo)
        except HFValidationError:
            ok = False
    if not ok:
        raise UsageError(f"{repo!r} is not a Hugging Face repo id", REPO_HINT)
    return repo


@dataclass(frozen=True)
class RemoteFile:
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob id (of the pointer, for LFS files)


@dataclass(frozen=True)
class RemoteState:
    head: str
    private: bool
    files: dict[str, RemoteFile]


class Hub:
    """huggingface_hub for one repo; every failure becomes one line that says whether anything was sent."""

    def __init__(self, endpoint: str, repo: str, token: str | None):
        self.endpoint = endpoint.rstrip("/")
        self.repo = repo
        self.owner = repo.split("/")[0]
        self._token = token if token is not None else get_token()
        self.token_source = "the token given" if token is not None else _token_source()
        self.api = HfApi(endpoint=self.endpoint, token=self._token, library_name="mtpquant",
                         library_version=__version__)
        self.sent = False  # whether a blob may have reached the hub (then a failure leaves no commit, not nothing)
        self.timeout = bound_requests()  # a hub that takes the connection and never answers fails, not hangs

    @property
    def has_token(self) -> bool:
        """Whether a token was given or found (HF_TOKEN, the saved login); not whether the hub accepts it."""
        return self._token is not None

    def check_token(self) -> None:
        """A token is there and the hub accepts it."""
        if self._token is None:
            raise PublishError(NO_TOKEN, TOKEN_HINT.format(owner=self.owner))
        self._call("check the token", self.api.whoami)

    def state(self, revision: str | None = None) -> RemoteState | None:
        """What the repo holds at `revision` (default: main); None when it does not exist yet."""
        try:
            info = self._call("list the repo", self.api.model_info, self.repo, revision=revision,
                              files_metadata=True, timeout=self.timeout,
                              _raise=(hf_errors.RepositoryNotFoundError,))
        except hf_errors.RepositoryNotFoundError:
            return None
        files = {s.rfilename: RemoteFile(int(s.lfs.size if s.lfs else s.size or 0), s.lfs.sha256 if s.lfs else None,
                                         s.blob_id) for s in info.siblings or []}
        return RemoteState(info.sha, bool(info.private), files)

    def create(self, private: bool) -> None:
        """Create the repo (nothing happens if it exists)."""
        self._call("create the repo", self.api.create_repo, self.repo, private=private, exist_ok=True)

    def transfer(self) -> str:
        """'xet' when the hub hands out Xet write tokens (and hf_xet is installed), else the LFS basic transfer."""
        if constants.HF_HUB_DISABLE_XET or importlib.util.find_spec("hf_xet") is None:
            return "lfs"
        url = f"{self.endpoint}/api/models/{self.repo}/xet-write-token/main"
        headers = build_hf_headers(token=self._token, library_name="mtpquant", library_version=__version__)
        r = self._call("ask for Xet storage", get_session().get, url, headers=headers)
        return "xet" if r.status_code == 200 else "lfs"

    def upload(self, todo: list[PlannedFile], parent: str, name: str, transfer: str, progress: ProgressFn) -> str:
        """Send the blobs the hub lacks, then one commit of every file in `todo`; return the commit sha."""
        label = f"upload {self.repo}"
        total = sum(f.size for f in todo)
        counter = _Counter(label, total, progress)
        ops, readers = [], []
        try:
            for f in todo:
                op = CommitOperationAdd(f.path, str(f.local))
                op.upload_info.sha256 = bytes.fromhex(f.sha256)  # verified already: no second read to hash
                if transfer == "lfs":  # reads counted for progress; Xet reads the path itself
                    reader = _CountingReader(f.local, counter.add)
                    readers.append(reader)
                    op.path_or_fileobj = reader
                ops.append(op)
            progress(label, 0, total)
            with _no_xet() if transfer == "lfs" else contextlib.nullcontext():
                self.sent = True
                self._call("upload", self.api.preupload_lfs_files, self.repo, additions=ops, free_memory=False)
                info = self._call("commit", self.api.create_commit, self.repo, ops, parent_commit=parent,
                                  commit_message=f"Upload {name} with mtpquant {__version__}",
                                  commit_description=f"{len(ops)} file(s), listed with their sha256 in "
                                                     "receipts/publish.json and the model card.")
            progress(label, total, total)
            return info.oid
        finally:
            for r in readers:
                r.close()

    def _call(self, what: str, fn, *args, _raise: tuple = (), **kwargs):
        try:
            return fn(*args, **kwargs)
        except _raise:
            raise
        except Exception as exc:
            err = self.explain(exc, what)
            if err is None:
                raise
            raise err from None

    def explain(self, exc: Exception, what: str) -> MtpquantError | None:
        """One line for each failure a user can act on; None for anything else (a bug to surface)."""
        after = "no commit was made" if self.sent else "nothing was uploaded"
        if isinstance(exc, RuntimeError) and str(exc).startswith("Error while uploading") and exc.__cause__:
            m = re.search(r"'(.+)'", str(exc))
            return PublishError(f"uploading {m[1] if m else 'a file'} to {self.repo} failed "
                                f"({_why(exc.__cause__)}); {after}", RESUME_HINT)
        reason = self._reason(exc, what)
        if reason is None:
            return None
        message, hint = reason
        return PublishError(f"{message}; {after}", RESUME_HINT if self.sent and hint is None else hint)

    def _reason(self, exc: Exception, what: str) -> tuple[str, str | None] | None:
        token_hint = TOKEN_HINT.format(owner=self.owner)
        if isinstance(exc, hf_errors.LocalTokenNotFoundError):
            return NO_TOKEN, token_hint
        if is_network_error(exc):
            return (f"cannot reach {self.endpoint} to {what} ({first_line(exc)})",
                    None if self.sent else "check the network and HF_ENDPOINT, then run again")
        if isinstance(exc, ValueError) and str(exc).startswith("Invalid metadata in README.md"):
            return (f"{self.endpoint} refused the card's front matter ({' '.join(str(exc).split())})",
                    "run `mtpquant card RUN_DIR`, then `mtpquant verify RUN_DIR`")
        if not (isinstance(exc, hf_errors.HfHubHTTPError) and exc.response is not None):
            return None
        status, msg = exc.response.status_code, server_message(exc)
        if status == 401:
            return f"{self.endpoint} refused {self.token_source} (HTTP 401: {msg})", token_hint
        if status == 403:
            return (f"{self.token_source} may not write to {self.repo} on {self.endpoint} (HTTP 403: {msg})",
                    token_hint)
        if status == 412:
            return f"{self.repo} changed on {self.endpoint} while publishing (HTTP 412: {msg})", RESUME_HINT
        if isinstance(exc, hf_errors.RepositoryNotFoundError):
            return f"{self.repo} was not found on {self.endpoint} when trying to {what}", token_hint
        return (f"{self.endpoint} answered HTTP {status} when trying to {what} for {self.repo}: {msg}",
                None if self.sent else "try again later")


def _why(exc: BaseException) -> str:
    """A failed transfer in a few words: the HTTP status and the hub's message, or the connection error."""
    if isinstance(exc, hf_errors.HfHubHTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}: {server_message(exc)}"
    return first_line(exc)


def _token_source() -> str:
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "the token in HF_TOKEN"
    return "the saved Hugging Face login"


@contextlib.contextmanager
def quiet_hub():
    """huggingface_hub's own progress bars off: progress goes through the callback, the CLI draws it."""
    was = are_progress_bars_disabled()
    if not was:
        disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            enable_progress_bars()


@contextlib.contextmanager
def _no_xet():
    """The LFS transfer for a hub without Xet storage (huggingface_hub would otherwise pick Xet for paths)."""
    before = constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = before


class _Counter:
    """Bytes sent so far across upload threads, forwarded to the progress callback."""

    def __init__(self, label: str, total: int, progress: ProgressFn):
        self.label, self.total, self.progress = label, total, progress
        self.done = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:  # the callback too: a CLI's bars are not thread-safe
            self.done = min(self.done + n, self.total)
            self.progress(self.label, self.done, self.total)


class _CountingReader(io.BufferedReader):
    """A file whose reads report the furthest byte reached, so re-reads (retries, hashing) count once."""

    def __init__(self, path: Path, on_bytes):
        super().__init__(io.FileIO(str(path), "rb"))
        self.reached = 0
        self.on_bytes = on_bytes

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        end = self.tell()
        if end > self.reached:
            self.on_bytes(end - self.reached)
            self.reached = end
        return data
