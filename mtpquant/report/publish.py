"""`mtpquant publish`: a verified run directory to a Hugging Face model repo, resumable, and checked on the hub.

Order: the repo id, then `verify` (a run that does not verify is never sent), then read-only questions to the hub (the
token, the repo, what it holds), then the local preparation (artifacts over the per-file limit split with
llama-gguf-split into shards proven to hold the artifact's metadata and tensor bytes; receipts/publish.json; the card
re-rendered so it lists that receipt), then the upload: every new or changed blob first (the hub keeps the blobs it
has, so a re-run after Ctrl-C or a failure sends only what is missing), then one commit, then the hub's sha256 of every
file compared with the run directory.

receipts/publish.json is written before the upload and travels with it, so it cannot name the commit it lands in
(nor the card, which lists it): the commit, the endpoint and the post-upload check go to logs/publish.json, which
stays local.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mtpquant import __version__
from mtpquant.core.errors import MtpquantError, PublishError, UsageError, VerifyError
from mtpquant.core.files import (
    CHUNK,
    free_bytes,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from mtpquant.core.procs import run_tool
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.rundir import RunDir, locked
from mtpquant.hub import client as hub
from mtpquant.hub.client import first_line, is_network_error, server_message
from mtpquant.llamacpp.toolchain import locate
from mtpquant.modelfile.header import read_header
from mtpquant.report import audit, card

log = logging.getLogger(__name__)

DEFAULT_SPLIT_MAX_SIZE = 50 * 1000**3  # the Hub's per-file limit, 50 GB
SPLIT_UNIT = 1000**2  # llama-gguf-split takes sizes in M (10^6 bytes) or G
SPLIT_SLACK = 64 << 10  # room for the split.* keys and tensor-info alignment the shards add to the metadata
STEP = "publish"
SPLIT_DIR = "split"
RECORD = "publish.json"  # under logs/: what each publish did (endpoint, commit, the hub's check)
HUB_MADE = (".gitattributes",)  # written by the hub when it creates a repo
ENVELOPE = ("schema", "step", "variant", "mtpquant", "written_at")
# What check_shards proved. A merge (llama-gguf-split --merge) gives other bytes than the artifact: it keeps split.*
SHARDS_HOLD = "the artifact's metadata (split.* keys aside) and every tensor's bytes, in order"
TOKEN_HINT = "set HF_TOKEN or run `hf auth login` with a token that can write to {owner}"
RESUME_HINT = "run again: blobs the hub already holds are not sent again"
REPO_HINT = "give OWNER/NAME, e.g. my-org/Model-MTP-GGUF: letters, digits, '-', '_' and '.', at most 96 each"


@dataclass(frozen=True)
class PlannedFile:
    """One file of the repo as this run would have it."""

    path: str  # in the repo
    kind: str  # artifact | shard | imatrix | card | receipt | checksums | manifest | tensor-types
    local: Path | None  # None until made (a shard of a split not yet run)
    size: int | None
    sha256: str | None
    action: str = "upload"  # upload | unchanged | make (written by a real run; size and sha256 known only then)
    part_of: str | None = None  # a shard: the artifact it holds part of

    def to_json(self, root: Path | None = None) -> dict:
        local = None
        if self.local is not None:
            local = str(self.local.relative_to(root)) if root and self.local.is_relative_to(root) else str(self.local)
        return {"path": self.path, "kind": self.kind, "local": local, "size": self.size, "sha256": self.sha256,
                "action": self.action, "part_of": self.part_of}


@dataclass(frozen=True)
class PublishReport:
    root: Path
    repo: str
    endpoint: str
    dry_run: bool
    private: bool
    repo_existed: bool
    transfer: str | None  # lfs | xet; None when nothing was (or would be) sent
    files: tuple[PlannedFile, ...]
    shards: dict[str, list[str]]  # artifact -> its shards' repo paths
    commit: str | None  # the commit that holds the files (the head when nothing changed); None in a dry run
    checked: int = 0  # files whose sha256 on the hub matched the run directory
    notes: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"{self.endpoint}/{self.repo}"

    @property
    def uploaded(self) -> tuple[PlannedFile, ...]:
        return tuple(f for f in self.files if f.action in ("upload", "make"))

    @property
    def unchanged(self) -> tuple[PlannedFile, ...]:
        return tuple(f for f in self.files if f.action == "unchanged")

    def to_json(self) -> dict:
        return {"run_dir": str(self.root), "repo": self.repo, "endpoint": self.endpoint, "url": self.url,
                "dry_run": self.dry_run, "private": self.private, "repo_existed": self.repo_existed,
                "transfer": self.transfer, "commit": self.commit, "checked": self.checked,
                "files": [f.to_json(self.root) for f in self.files], "shards": self.shards, "notes": list(self.notes)}


# ----------------------------------------------------------------------------------------------- entry point

def publish_run(run_dir: Path, repo: str, private: bool = False, dry_run: bool = False, token: str | None = None,
                progress: ProgressFn = no_progress, split_max_size: int = DEFAULT_SPLIT_MAX_SIZE, toolchain=None,
                endpoint: str | None = None) -> PublishReport:
    """Verify, split what is over the per-file limit, upload what the repo lacks, and check the hub's sha256s."""

    repo = check_repo_id(repo)
    if split_max_size < 2 * SPLIT_UNIT:
        raise UsageError(f"split_max_size {split_max_size} bytes is too small",
                         f"give at least {2 * SPLIT_UNIT} bytes (llama-gguf-split counts in megabytes)")
    root = Path(run_dir).expanduser().resolve()
    if not root.is_dir():
        raise UsageError(f"{run_dir}: no such run directory", "give the folder `mtpquant build` wrote")
    cfg = hub.settings()
    if cfg.offline:
        raise UsageError("HF_HUB_OFFLINE is set and publishing needs the hub", "unset HF_HUB_OFFLINE")
    run = RunDir(root)
    lock = locked(run) if not dry_run and run.receipts.is_dir() else contextlib.nullcontext()
    with lock:
        try:
            verified = audit.verify_run(root, progress=progress)
        except VerifyError as exc:
            raise VerifyError(f"not published: {exc.message}", exc.hint) from None
        hubctx = _Hub(endpoint or cfg.endpoint, repo, token)
        with _quiet_hub():
            return _publish(run, hubctx, verified.artifacts, private, dry_run, split_max_size, toolchain, progress)


def check_repo_id(repo: str) -> str:
    """OWNER/NAME as the Hub accepts it, or a UsageError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    ok = isinstance(repo, str) and repo.count("/") == 1 and all(repo.split("/"))
    if ok:
        try:
            validate_repo_id(repo)
        except HFValidationError:
            ok = False
    if not ok:
        raise UsageError(f"{repo!r} is not a Hugging Face repo id", REPO_HINT)
    return repo


def _publish(run: RunDir, hubctx: _Hub, sums: dict[str, str], private: bool, dry_run: bool, limit: int, toolchain,
             progress: ProgressFn) -> PublishReport:
    hubctx.check_token()
    remote = hubctx.state()
    existed = remote is not None
    notes = []
    if remote is not None and private and not remote.private:
        notes.append(f"{hubctx.repo} exists and is public: --private does not change an existing repo")
    artifacts, shards, made = _artifacts(run, sums, limit, dry_run, toolchain, progress)
    body = _receipt_body(hubctx.repo, limit, artifacts, shards, run)
    previous = run.read_receipt(STEP)
    receipt_changed = previous is None or _content(previous) != body
    if receipt_changed and not dry_run and not made:
        run.write_receipt(STEP, body)
        _render_card(run)
        receipt_changed = False
    files = _plan(run, artifacts, shards, pending=receipt_changed or made)
    files = tuple(_against(f, remote) for f in files)
    extra = sorted(set(remote.files) - {f.path for f in files} - set(HUB_MADE)) if remote else []
    if extra:
        notes.append(f"on the hub but not part of this run (left as they are): {', '.join(extra)}")
    shard_paths = {a: [s.path for s in ss] for a, ss in shards.items()}
    if dry_run:
        return PublishReport(run.root, hubctx.repo, hubctx.endpoint, True, private, existed, None, files,
                             shard_paths, None, 0, tuple(notes))
    todo = [f for f in files if f.action == "upload"]
    transfer, commit = None, remote.head if remote else None
    if todo:
        if remote is None:
            hubctx.create(private)
            remote = hubctx.state()
        transfer = hubctx.transfer()
        commit = hubctx.upload(todo, remote.head, _name(run), transfer, progress)
    checked = _check_remote(hubctx, commit, files)
    report = PublishReport(run.root, hubctx.repo, hubctx.endpoint, False, private, existed, transfer, files,
                           shard_paths, commit, checked, tuple(notes))
    _record(run, report)
    return report


def _content(receipt: dict) -> dict:
    return {k: v for k, v in receipt.items() if k not in ENVELOPE}


def _name(run: RunDir) -> str:
    return run.read_manifest().get("name") or run.root.name


def _render_card(run: RunDir) -> None:
    """README.md again from the receipts (which now include publish.json), without touching receipts/card.json."""

    write_text_atomic(run.root / card.CARD_FILE, card.render_card(run))


# ----------------------------------------------------------------------------------------------- local files

def _artifacts(run: RunDir, sums: dict[str, str], limit: int, dry_run: bool, toolchain, progress: ProgressFn
               ) -> tuple[list[PlannedFile], dict[str, list[PlannedFile]], bool]:
    """Every verified artifact, whole or as shards; and whether any shard is still to be made (dry run)."""

    imatrix = (run.read_receipt("imatrix") or {}).get("file")
    previous = run.read_receipt(STEP) or {}
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
    tc = _tc(toolchain) if to_split else None
    for a in to_split:
        shards[a.path] = (_predicted_shards(tc, a.local, limit) if dry_run
                          else split_artifact(tc, run, a.path, a.sha256, limit, progress))
    return artifacts, dict(sorted(shards.items())), bool(to_split) and dry_run


def _tc(toolchain):

    return toolchain if toolchain is not None else locate()


def _receipt_body(repo: str, limit: int, artifacts: list[PlannedFile], shards: dict[str, list[PlannedFile]],
                  run: RunDir) -> dict:
    """What receipts/publish.json records: the repo, every artifact (whole or its shards), and the other files sent
    besides the card and the receipts (the card lists every receipt with its sha256, and is rendered after this)."""
    entries = {}
    for a in artifacts:
        parts = shards.get(a.path)
        entries[a.path] = {"kind": a.kind, "size": a.size, "sha256": a.sha256,
                           "path": None if parts else a.path,
                           "shards": [{"path": s.path, "size": s.size, "sha256": s.sha256} for s in parts or []],
                           "shards_hold": SHARDS_HOLD if parts else None}
    others = [{"path": f.path, "kind": f.kind, "size": f.size, "sha256": f.sha256} for f in _support_files(run)]
    return {"repo": repo, "split_max_size": limit, "artifacts": entries, "files": others, "card": "README.md"}


def _support_files(run: RunDir) -> list[PlannedFile]:
    """SHA256SUMS, manifest.json and the tensor-type files the quantize receipts name (what --rebuild needs)."""
    out = [_local(run, "SHA256SUMS", "checksums")]
    if run.manifest_path.is_file():
        out.append(_local(run, "manifest.json", "manifest"))
    seen = set()
    for p in sorted(run.receipts.glob("quantize-*.json")):
        argv = [str(a) for a in json.loads(p.read_text()).get("command") or []]
        for flag, value in itertools.pairwise(argv):
            if flag == "--tensor-type-file" and value not in seen:
                seen.add(value)
                target = (run.root / value).resolve()
                if not target.is_relative_to(run.root) or not target.is_file():
                    raise VerifyError(f"receipts/{p.name}: names tensor-type file {value}, which is not in the run "
                                      "directory", "rebuild the run")
                out.append(_local(run, target.relative_to(run.root).as_posix(), "tensor-types"))
    return out


def _local(run: RunDir, rel: str, kind: str) -> PlannedFile:
    path = run.root / rel
    return PlannedFile(rel, kind, path, path.stat().st_size, sha256_file(path))


def _plan(run: RunDir, artifacts: list[PlannedFile], shards: dict[str, list[PlannedFile]], pending: bool
          ) -> list[PlannedFile]:
    """Every file of the repo: artifacts or their shards, support files, receipts, and the card last."""

    files = []
    for a in artifacts:
        files.extend(shards.get(a.path) or [a])
    files += _support_files(run)
    for p in sorted(run.receipts.glob("*.json")):
        if p.name == f"{STEP}.json" and pending:
            continue
        files.append(_local(run, f"receipts/{p.name}", "receipt"))
    if pending:  # a real run writes these before uploading; their bytes are not known now
        files.append(PlannedFile(f"receipts/{STEP}.json", "receipt", None, None, None, "make"))
        files.append(PlannedFile(card.CARD_FILE, "card", None, None, None, "make"))
    else:
        files.append(_local(run, card.CARD_FILE, "card"))
    return files


# ----------------------------------------------------------------------------------------------- splitting

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

    want, got = _raw_kv(src), _raw_kv(shards[0])
    for key in list(want) + [k for k in got if k not in want]:
        if want.get(key) != got.get(key):
            raise VerifyError(f"{shards[0].name}: metadata key {key} differs from {src.name}",
                              "the split tool changed the file; check the toolchain")
    orig = read_header(src).tensors
    parts = [(p, t) for p in shards for t in read_header(p).tensors]
    if [t.name for _, t in parts] != [t.name for t in orig]:
        raise VerifyError(f"{src.name}: its shards hold other tensors, or in another order",
                          "the split tool changed the file; check the toolchain")
    total, done = sum(t.n_bytes for t in orig), 0
    label = f"check shards of {src.name}"
    with open(src, "rb") as a, contextlib.ExitStack() as stack:
        handles = {p: stack.enter_context(open(p, "rb")) for p in shards}
        for (p, t), o in zip(parts, orig):
            if (t.tensor_type, t.shape, t.n_bytes) != (o.tensor_type, o.shape, o.n_bytes):
                raise VerifyError(f"{p.name}: tensor {t.name} has another type or shape than in {src.name}",
                                  "the split tool changed the file; check the toolchain")
            if not _same_bytes(a, o.data_offset, handles[p], t.data_offset, o.n_bytes):
                raise VerifyError(f"{p.name}: the bytes of tensor {t.name} differ from {src.name}",
                                  "the split tool changed the file; check the toolchain")
            done += o.n_bytes
            progress(label, done, total)


_GGUF_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _raw_kv(path: Path) -> dict[str, bytes]:
    """Every metadata key of a GGUF with its value's raw bytes (type tag included), less split.* keys."""
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 24  # magic, version, tensor count

        def u(fmt: str) -> int:
            nonlocal pos
            v = struct.unpack_from(fmt, buf, pos)[0]
            pos += struct.calcsize(fmt)
            return v

        def skip(vtype: int) -> None:
            nonlocal pos
            if vtype in _GGUF_WIDTH:
                pos += _GGUF_WIDTH[vtype]
            elif vtype == _GGUF_STRING:
                n = u("<Q")  # read before adding: u() moves pos itself
                pos += n
            elif vtype == _GGUF_ARRAY:
                etype, count = u("<I"), u("<Q")
                if etype in _GGUF_WIDTH:
                    pos += _GGUF_WIDTH[etype] * count
                else:
                    for _ in range(count):
                        skip(etype)
            else:
                raise VerifyError(f"{path.name}: unknown metadata value type {vtype}")

        n_kv = struct.unpack_from("<Q", buf, 16)[0]
        out = {}
        for _ in range(n_kv):
            n = u("<Q")
            key = bytes(buf[pos:pos + n]).decode("utf-8", errors="replace")
            pos += n
            start = pos
            skip(u("<I"))
            if not key.startswith("split."):
                out[key] = bytes(buf[start:pos])
        return out


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


# ----------------------------------------------------------------------------------------------- the hub

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


class _Hub:
    """huggingface_hub for one repo; every failure becomes one line that says whether anything was sent."""

    def __init__(self, endpoint: str, repo: str, token: str | None):
        from huggingface_hub import HfApi, get_token

        self.endpoint = endpoint.rstrip("/")
        self.repo = repo
        self.owner = repo.split("/")[0]
        self._token = token if token is not None else get_token()
        self.token_source = "the token given" if token is not None else _token_source()
        self.api = HfApi(endpoint=self.endpoint, token=self._token, library_name="mtpquant",
                         library_version=__version__)
        self.sent = False  # whether a blob may have reached the hub (then a failure leaves no commit, not nothing)

    def check_token(self) -> None:
        if self._token is None:
            raise PublishError("no Hugging Face token: HF_TOKEN is not set and there is no saved login",
                               TOKEN_HINT.format(owner=self.owner))
        self._call("check the token", self.api.whoami)

    def state(self, revision: str | None = None) -> RemoteState | None:
        """What the repo holds at `revision` (default: main); None when it does not exist yet."""
        from huggingface_hub import errors as e

        try:
            info = self._call("list the repo", self.api.model_info, self.repo, revision=revision,
                              files_metadata=True, _raise=(e.RepositoryNotFoundError,))
        except e.RepositoryNotFoundError:
            return None
        files = {s.rfilename: RemoteFile(int(s.lfs.size if s.lfs else s.size or 0), s.lfs.sha256 if s.lfs else None,
                                         s.blob_id) for s in info.siblings or []}
        return RemoteState(info.sha, bool(info.private), files)

    def create(self, private: bool) -> None:
        self._call("create the repo", self.api.create_repo, self.repo, private=private, exist_ok=True)

    def transfer(self) -> str:
        """'xet' when the hub hands out Xet write tokens (and hf_xet is installed), else the LFS basic transfer."""
        import importlib.util

        from huggingface_hub import constants, get_session
        from huggingface_hub.utils import build_hf_headers

        if constants.HF_HUB_DISABLE_XET or importlib.util.find_spec("hf_xet") is None:
            return "lfs"
        url = f"{self.endpoint}/api/models/{self.repo}/xet-write-token/main"
        headers = build_hf_headers(token=self._token, library_name="mtpquant", library_version=__version__)
        r = self._call("ask for Xet storage", get_session().get, url, headers=headers)
        return "xet" if r.status_code == 200 else "lfs"

    def upload(self, todo: list[PlannedFile], parent: str, name: str, transfer: str, progress: ProgressFn) -> str:
        """Send the blobs the hub lacks, then one commit of every file in `todo`; return the commit sha."""
        from huggingface_hub import CommitOperationAdd

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
        from huggingface_hub import errors as e


        token_hint = TOKEN_HINT.format(owner=self.owner)
        if isinstance(exc, e.LocalTokenNotFoundError):
            return "no Hugging Face token: HF_TOKEN is not set and there is no saved login", token_hint
        if is_network_error(exc):
            return (f"cannot reach {self.endpoint} to {what} ({first_line(exc)})",
                    None if self.sent else "check the network and HF_ENDPOINT, then run again")
        if isinstance(exc, ValueError) and str(exc).startswith("Invalid metadata in README.md"):
            return (f"{self.endpoint} refused the card's front matter ({' '.join(str(exc).split())})",
                    "run `mtpquant card RUN_DIR`, then `mtpquant verify RUN_DIR`")
        if not (isinstance(exc, e.HfHubHTTPError) and exc.response is not None):
            return None
        status, msg = exc.response.status_code, server_message(exc)
        if status == 401:
            return f"{self.endpoint} refused {self.token_source} (HTTP 401: {msg})", token_hint
        if status == 403:
            return (f"{self.token_source} may not write to {self.repo} on {self.endpoint} (HTTP 403: {msg})",
                    token_hint)
        if status == 412:
            return f"{self.repo} changed on {self.endpoint} while publishing (HTTP 412: {msg})", RESUME_HINT
        if isinstance(exc, e.RepositoryNotFoundError):
            return f"{self.repo} was not found on {self.endpoint} when trying to {what}", token_hint
        return (f"{self.endpoint} answered HTTP {status} when trying to {what} for {self.repo}: {msg}",
                None if self.sent else "try again later")


def _why(exc: BaseException) -> str:
    """A failed transfer in a few words: the HTTP status and the hub's message, or the connection error."""
    from huggingface_hub import errors as e


    if isinstance(exc, e.HfHubHTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}: {server_message(exc)}"
    return first_line(exc)


def _token_source() -> str:
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "the token in HF_TOKEN"
    return "the saved Hugging Face login"


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub's own progress bars off: progress goes through the callback, the CLI draws it."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

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
    from huggingface_hub import constants

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


def _against(f: PlannedFile, remote: RemoteState | None) -> PlannedFile:
    """Mark a file unchanged when the hub already holds these very bytes at that path."""
    if f.action != "upload" or remote is None or f.path not in remote.files:
        return f
    if _same(remote.files[f.path], f):
        return PlannedFile(f.path, f.kind, f.local, f.size, f.sha256, "unchanged", f.part_of)
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


def _check_remote(hubctx: _Hub, commit: str, files: tuple[PlannedFile, ...]) -> int:
    """Every file's sha256 (LFS) or git blob id (regular file) on the hub at `commit` against the run directory."""
    state = hubctx.state(commit)
    where = f"{hubctx.repo}@{commit[:12]}"
    if state is None:
        raise VerifyError(f"{hubctx.repo} is not on {hubctx.endpoint} after the upload", RESUME_HINT)
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


def _record(run: RunDir, report: PublishReport) -> None:
    """Append this publish to logs/publish.json (endpoint and commit: what the uploaded receipt cannot hold)."""
    path = run.logs / RECORD
    try:
        history = json.loads(path.read_text()).get("history", [])
    except (OSError, ValueError):
        history = []
    history.append({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "mtpquant": __version__,
                    "repo": report.repo, "endpoint": report.endpoint, "commit": report.commit,
                    "transfer": report.transfer, "private": report.private,
                    "uploaded": [f.path for f in report.uploaded], "unchanged": [f.path for f in report.unchanged],
                    "checked_on_hub": report.checked})
    write_json_atomic(path, {"history": history})
