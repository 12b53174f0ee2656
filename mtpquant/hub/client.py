"""Hugging Face Hub I/O: resolve a revision to a commit once, download through huggingface_hub (its cache, its
resume, its token handling), prove every byte against the hub's own hashes, and explain hub errors in one line."""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import (
    HfApi,
    constants,
    get_session,
    get_token,
    hf_hub_download,
    hf_hub_url,
    hf_raise_for_status,
    try_to_load_from_cache,
)
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import _http as hf_http
from huggingface_hub.utils import build_hf_headers

from mtpquant import __version__
from mtpquant.core.errors import HubError, IntegrityError, MtpquantError, UsageError
from mtpquant.core.files import CHUNK, SPLIT_RE, incomplete_path, stat_key
from mtpquant.core.paths import cache_root
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.modelfile.header import Cursor, iter_metadata

log = logging.getLogger(__name__)

SAFETENSORS = "safetensors"
# What the converter reads besides the weights: config, tokenizer, chat template, and the card (general.* metadata).
CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "README.md")
DEFAULT_ENDPOINT = "https://huggingface.co"
FILES_HINT = "give a .gguf file name, a shard pattern such as 'BF16/*.gguf', or 'safetensors'"
RETRY_HINT = "the damaged copy was removed from the Hugging Face cache and nothing was built from it; run again " \
             "to download it afresh"
TOKEN_HINT = "set HF_TOKEN or run `hf auth login` with a token that can read it"
TIMEOUT_ENV = "MTPQUANT_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 60.0  # seconds without a byte from the hub; huggingface_hub's own client waits for ever


@dataclass(frozen=True)
class HubFile:
    """One file of a commit as the hub lists it."""

    name: str
    size: int
    sha256: str | None  # LFS files: the hub's sha256; plain git files: known only once downloaded and checked
    git_oid: str | None  # git blob id (for LFS files, the pointer's)
    lfs: bool

    def to_json(self) -> dict:
        return {"name": self.name, "size": self.size, "sha256": self.sha256, "lfs": self.lfs, "git_oid": self.git_oid}


@dataclass(frozen=True)
class Snapshot:
    """A revision resolved to its commit, with every file there."""

    repo: str
    revision: str
    commit: str
    endpoint: str
    files: tuple[HubFile, ...]

    @property
    def where(self) -> str:
        return f"{self.repo}@{self.commit[:12]}"


@dataclass(frozen=True)
class HubSettings:
    endpoint: str
    cache_dir: Path
    offline: bool


def settings() -> HubSettings:
    """Endpoint, cache folder and offline switch as the environment says now (huggingface_hub reads them at import)."""

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT or DEFAULT_ENDPOINT).rstrip("/")
    if env := os.environ.get("HF_HUB_CACHE"):
        cache = Path(env)
    elif env := os.environ.get("HF_HOME"):
        cache = Path(env) / "hub"
    else:
        cache = Path(constants.HF_HUB_CACHE)
    offline = constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES",
                                                                                                "TRUE")
    return HubSettings(endpoint, cache.expanduser(), offline)


# ----------------------------------------------------------------------------------------------- timeouts

def hub_timeout() -> float:
    """Seconds to wait for the hub to connect or to send its next bytes: $MTPQUANT_HUB_TIMEOUT, default 60."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise UsageError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds", f"unset it, or give e.g. {TIMEOUT_ENV}=60")
    return value


def bound_requests() -> float:
    """Give huggingface_hub's shared HTTP client a connect/read timeout (its default has none, so a hub that takes a
    connection and never answers would hang mtpquant for ever); a client factory of the user's own is left alone.
    Returns the timeout."""
    timeout = hub_timeout()
    current = getattr(hf_http, "_GLOBAL_CLIENT_FACTORY", None)
    default = getattr(hf_http, "default_client_factory", None)
    ours = getattr(current, "mtpquant_timeout", None)
    if default is None or (current is not default and ours is None) or ours == timeout:
        return timeout

    def factory():
        client = default()
        client.timeout = timeout
        return client

    factory.mtpquant_timeout = timeout
    hf_http.set_client_factory(factory)
    return timeout


def is_timeout(exc: BaseException) -> bool:
    """Whether a request failed because the hub sent nothing for too long (connecting or answering)."""
    return "Timeout" in type(exc).__name__ and is_network_error(exc)


# ----------------------------------------------------------------------------------------------- errors

class _Context:
    """What a hub error message names: the recipe, the repo, the revision, the endpoint."""

    def __init__(self, recipe_path: Path | None, repo: str, revision: str, endpoint: str):
        self.prefix = f"{recipe_path}: " if recipe_path else ""
        self.repo, self.revision, self.endpoint = repo, revision, endpoint

    def explain(self, exc: Exception, file: str | None = None) -> MtpquantError | None:
        """One line for each failure a user can act on; None for anything else (a bug to surface)."""

        if isinstance(exc, hf_errors.GatedRepoError):
            return HubError(f"{self.prefix}source.hf.repo: {self.repo} is gated and "
                            f"{'the token given has no access' if _has_token() else 'no token was given'}",
                            f"accept its terms on the Hub, then {TOKEN_HINT}")
        if isinstance(exc, hf_errors.RepositoryNotFoundError):
            return HubError(f"{self.prefix}source.hf.repo: {self.repo} was not found on {self.endpoint}",
                            f"check the repo id; a private repo also needs a token ({TOKEN_HINT})")
        if isinstance(exc, hf_errors.RevisionNotFoundError):
            return HubError(f"{self.prefix}source.hf.revision: {self.revision!r} is not a branch, tag or commit "
                            f"of {self.repo}", "give an existing branch, tag or full commit sha")
        if isinstance(exc, getattr(hf_errors, "RemoteEntryNotFoundError", hf_errors.EntryNotFoundError)):
            return HubError(f"{file or 'a file'} is no longer in {self.repo}@{self.revision[:12]} on {self.endpoint}",
                            "the listing changed under us; run again")
        if isinstance(exc, hf_errors.LocalEntryNotFoundError):
            why = "may not be asked (HF_HUB_OFFLINE is set)" if settings().offline else "cannot be reached"
            return HubError(f"{file} of {self.repo}@{self.revision[:12]} is not in the Hugging Face cache, and "
                            f"{self.endpoint} {why}", "connect to the hub (unset HF_HUB_OFFLINE) to download it once")
        if is_timeout(exc):
            return HubError(f"{self.endpoint} did not answer within {hub_timeout():g} s while resolving "
                            f"{self.repo}@{self.revision}{f' ({file})' if file else ''}",
                            f"check the network and HF_ENDPOINT; {TIMEOUT_ENV} sets how long to wait")
        if isinstance(exc, hf_errors.OfflineModeIsEnabled) or is_network_error(exc):
            return HubError(f"cannot reach {self.endpoint} to resolve {self.repo}@{self.revision} "
                            f"({first_line(exc)}), and this run has no recorded commit to use from the cache",
                            "check the network and HF_ENDPOINT; once a run has fetched this revision, re-runs work "
                            "offline from the cache")
        if isinstance(exc, hf_errors.HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else None
            if status == 401:
                return HubError(f"{self.endpoint} refused the Hugging Face token ({server_message(exc)})",
                                TOKEN_HINT)
            return HubError(f"{self.endpoint} answered HTTP {status} for {self.repo}@{self.revision}: "
                            f"{server_message(exc)}", "try again later")
        if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
            return HubError(f"the download of {file} from {self.repo} was cut short ({first_line(exc)})",
                            "run again; huggingface_hub starts the file afresh")
        return None


def _has_token() -> bool:

    return get_token() is not None


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def server_message(exc) -> str:
    msg = exc.response.headers.get("X-Error-Message") if exc.response is not None else None
    return msg or first_line(exc)


@functools.cache
def _network_error_types() -> tuple[type, ...]:
    """Connection-level failures of whichever HTTP stack this huggingface_hub uses."""
    types: list[type] = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            types.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def is_network_error(exc: Exception) -> bool:
    return isinstance(exc, _network_error_types())


# ----------------------------------------------------------------------------------------------- resolve + select

def resolve(repo: str, revision: str, endpoint: str, recipe_path: Path | None = None) -> Snapshot:
    """Ask the hub once for the commit a revision names and every file there (sizes, git ids, LFS sha256s)."""

    timeout = bound_requests()
    api = HfApi(endpoint=endpoint, library_name="mtpquant", library_version=__version__)
    try:
        info = api.model_info(repo, revision=revision, files_metadata=True, timeout=timeout)
    except Exception as exc:
        err = _Context(recipe_path, repo, revision, endpoint).explain(exc)
        if err is None:
            raise
        raise err from None
    files = tuple(HubFile(s.rfilename, int(s.lfs.size if s.lfs else s.size or 0), s.lfs.sha256 if s.lfs else None,
                          s.blob_id, s.lfs is not None) for s in (info.siblings or []))
    return Snapshot(repo, revision, info.sha, endpoint, files)


def select(snap: Snapshot, spec: str, recipe_path: Path | None = None) -> tuple[str, tuple[HubFile, ...]]:
    """The files `source.hf.files` names: ('gguf', every shard of one model) or ('safetensors', weights + configs)."""
    prefix = f"{recipe_path}: source.hf.files: " if recipe_path else "source.hf.files: "
    by_name = {f.name: f for f in snap.files}
    if spec == SAFETENSORS:
        weights = [f for f in snap.files if "/" not in f.name and f.name.endswith((".safetensors",
                                                                                   ".safetensors.index.json"))]
        if not any(f.name.endswith(".safetensors") for f in weights):
            raise HubError(f"{prefix}{snap.where} has no *.safetensors file at its top level", FILES_HINT)
        if "config.json" not in by_name:
            raise HubError(f"{prefix}{snap.where} has safetensors but no config.json", "is this a checkpoint repo?")
        extras = [by_name[n] for n in CHECKPOINT_FILES if n in by_name]
        return SAFETENSORS, tuple(sorted(weights + extras, key=lambda f: f.name))
    matched = [by_name[spec]] if spec in by_name else [f for f in snap.files if fnmatch.fnmatchcase(f.name, spec)]
    ggufs = [f for f in matched if f.name.endswith(".gguf")]
    if not ggufs:
        there = sorted(f.name for f in snap.files if f.name.endswith(".gguf"))
        shown = f" (GGUF files there: {', '.join(there[:8])}{', ...' if len(there) > 8 else ''})" if there else \
            " (it has no GGUF file; 'safetensors' converts its checkpoint)"
        raise HubError(f"{prefix}{spec!r} matches no GGUF file of {snap.where}{shown}", FILES_HINT)
    models: dict[tuple[str, int], list[HubFile]] = {}
    for f in ggufs:
        m = SPLIT_RE.match(f.name)
        models.setdefault((m["prefix"], int(m["n"])) if m else (f.name, 0), []).append(f)
    if len(models) > 1:
        names = sorted(f"{p}-*-of-{n:05d}.gguf" if n else p for p, n in models)
        raise HubError(f"{prefix}{spec!r} matches {len(models)} GGUF models of {snap.where}: {', '.join(names)}",
                       "narrow it to one model (its file name, or its shards' pattern)")
    (stem, n), _ = models.popitem()
    if not n:
        return "gguf", (by_name[stem],)
    wanted = [f"{stem}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise HubError(f"{prefix}the split GGUF {stem} at {snap.where} lacks shard(s) {', '.join(missing)}",
                       "is the upload complete? pin a commit that has every shard")
    return "gguf", tuple(by_name[w] for w in wanted)


# ----------------------------------------------------------------------------------------------- download + verify

class _ByteCounter:
    """Stands in for tqdm inside huggingface_hub: forwards byte counts to our progress callback."""

    def __init__(self, on_bytes, *args, **kwargs):
        self.on_bytes = on_bytes
        self.n = kwargs.get("initial") or 0
        if self.n:
            on_bytes(self.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: float | None = 1) -> None:
        self.n += int(n or 0)
        self.on_bytes(int(n or 0))

    def close(self) -> None:
        return None


def download(snap: Snapshot, files: tuple[HubFile, ...], cfg: HubSettings, progress: ProgressFn = no_progress,
             recipe_path: Path | None = None) -> dict[str, Path]:
    """Each file at the pinned commit through huggingface_hub's cache (a cached file costs no request)."""

    ctx = _Context(recipe_path, snap.repo, snap.commit, cfg.endpoint)
    label = f"download {snap.repo}"
    total = sum(f.size for f in files)
    done = inflight = 0

    def on_bytes(n: int) -> None:
        nonlocal inflight
        inflight += n
        progress(label, min(done + inflight, total), total)

    paths: dict[str, Path] = {}
    progress(label, 0, total)
    timeout = bound_requests()
    for f in files:
        inflight = 0
        try:
            got = hf_hub_download(snap.repo, f.name, revision=snap.commit, cache_dir=cfg.cache_dir,
                                  endpoint=cfg.endpoint, local_files_only=cfg.offline, etag_timeout=timeout,
                                  tqdm_class=functools.partial(_ByteCounter, on_bytes),
                                  library_name="mtpquant", library_version=__version__)
        except Exception as exc:
            err = ctx.explain(exc, f.name)
            if err is None:
                raise
            raise err from None
        done += f.size
        progress(label, done, total)
        paths[f.name] = Path(got)
    return paths


def _hashes(path: Path, step) -> tuple[str, str]:
    """sha256 and git blob id of a file in one read."""
    size = path.stat().st_size
    sha, oid = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            sha.update(chunk)
            oid.update(chunk)
            step(len(chunk))
    return sha.hexdigest(), oid.hexdigest()


def verify(snap: Snapshot, files: tuple[HubFile, ...], paths: dict[str, Path], cache: dict[str, str],
           progress: ProgressFn = no_progress) -> tuple[HubFile, ...]:
    """Check every file against the hub's LFS sha256 (plain git files: their blob id); refuse any mismatch.

    Returns the files with sha256 filled in. `cache` (real path:size:mtime -> sha256) skips re-reading files
    this run already proved; it is updated in place.
    """
    label = f"verify {snap.repo}"
    total = sum(f.size for f in files)
    done = 0
    out = []
    for f in files:
        real = Path(os.path.realpath(paths[f.name]))
        st = real.stat()
        if st.st_size != f.size:
            _evict(paths[f.name])
            raise IntegrityError(f.name, snap.where, "size", f"{f.size} bytes", f"{st.st_size} bytes", RETRY_HINT)
        key = stat_key(real)
        if f.sha256 and cache.get(key) == f.sha256:
            sha = f.sha256
            done += f.size
            progress(label, done, total)
        else:
            def step(n: int) -> None:
                nonlocal done
                done += n
                progress(label, done, total)

            sha, oid = _hashes(real, step)
            if f.sha256 and sha != f.sha256:
                _evict(paths[f.name])
                raise IntegrityError(f.name, snap.where, "sha256", f.sha256, sha, RETRY_HINT)
            if not f.sha256 and oid != f.git_oid:
                _evict(paths[f.name])
                raise IntegrityError(f.name, snap.where, "git blob id", str(f.git_oid), oid, RETRY_HINT)
            cache[key] = sha
        out.append(HubFile(f.name, f.size, sha, f.git_oid, f.lfs))
    progress(label, total, total)
    return tuple(out)


def materialize(snap: Snapshot, files: tuple[HubFile, ...], paths: dict[str, Path], cache: dict[str, str]
                ) -> dict[str, Path]:
    """The verified files under their own names as real files (hard links to the cache's blobs).

    The cache's snapshot entries are symlinks to blobs named by hash: anything that resolves the path (llama.cpp
    finds a split model's other shards from the first one's name) would see the blob name.
    """
    root = cache_root() / "hf" / f"models--{snap.repo.replace('/', '--')}" / snap.commit
    out = {}
    for f in files:
        blob = Path(os.path.realpath(paths[f.name]))
        dest = root / f.name
        if not _same_content(dest, blob, f, cache):
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = incomplete_path(dest)
            tmp.unlink(missing_ok=True)
            try:
                os.link(blob, tmp)
            except OSError:  # another filesystem: a copy, recorded as verified so later runs keep it
                log.warning("cannot hard-link %s into %s; copying it", blob, root)
                shutil.copyfile(blob, tmp)
            os.replace(tmp, dest)
        cache[stat_key(dest)] = f.sha256
        out[f.name] = dest
    return out


def _same_content(dest: Path, blob: Path, f: HubFile, cache: dict[str, str]) -> bool:
    try:
        if os.path.samefile(dest, blob):
            return True
        key = stat_key(dest)
    except OSError:
        return False
    return cache.get(key) == f.sha256


def is_cached(snap: Snapshot, f: HubFile, cfg: HubSettings) -> bool:

    return isinstance(try_to_load_from_cache(snap.repo, f.name, cache_dir=cfg.cache_dir, revision=snap.commit), str)


def _evict(pointer: Path) -> None:
    """Remove a bad file from the Hugging Face cache (snapshot link and blob) so the next run downloads it again."""
    blob = Path(os.path.realpath(pointer))
    pointer.unlink(missing_ok=True)
    if blob != pointer and blob.parent.name == "blobs":
        blob.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- header peek

PEEK_LIMIT = 64 << 20  # the metadata of a 248k-token vocabulary is ~10 MiB; never read further than this


def read_gguf_header(fetch) -> dict:
    """architecture, block_count and nextn_predict_layers of a remote GGUF, reading byte ranges only as far as
    needed. `fetch(offset, size) -> bytes`; the fields are parsed by inspect's own header reader."""

    buf = bytearray()

    def grow(needed: int) -> bool:
        while len(buf) < needed:
            if len(buf) >= PEEK_LIMIT:
                raise EOFError("metadata larger than the peek limit")
            more = fetch(len(buf), min(max(len(buf), 1 << 20), PEEK_LIMIT - len(buf)))
            if not more:
                return False
            buf.extend(more)
            cursor.size = len(buf)
        return True

    cursor = Cursor(buf, 0, grow)
    found: dict = {}
    items = iter_metadata(cursor)
    next(items)
    for key, value, _ in items:
        found[key] = value
        arch = found.get("general.architecture")
        if arch and f"{arch}.block_count" in found and f"{arch}.nextn_predict_layers" in found:
            break
    arch = found.get("general.architecture")
    return {"arch": arch, "block_count": found.get(f"{arch}.block_count"),
            "nextn_layers": found.get(f"{arch}.nextn_predict_layers", 0)}


def peek_gguf(snap: Snapshot, f: HubFile, cfg: HubSettings) -> dict | None:
    """The first shard's architecture and layer counts through HTTP range requests, before any download.

    None when the hub cannot serve ranges or the header cannot be read: the full check after download still runs.
    """

    url = hf_hub_url(snap.repo, f.name, revision=snap.commit, endpoint=cfg.endpoint)
    headers = build_hf_headers(library_name="mtpquant", library_version=__version__)
    timeout = bound_requests()

    def fetch(offset: int, size: int) -> bytes:
        end = min(offset + size, f.size) - 1
        if end < offset:
            return b""
        r = get_session().get(url, headers={**headers, "Range": f"bytes={offset}-{end}"}, timeout=timeout)
        hf_raise_for_status(r)
        if r.status_code != 206:
            raise EOFError("the hub does not serve byte ranges")
        return r.content

    try:
        return read_gguf_header(fetch)
    except Exception as exc:  # any failure only skips the early check
        log.info("could not read the header of %s ahead of the download: %s", f.name, exc)
        return None


def fetch_file(repo: str, revision: str, name: str, progress: ProgressFn = no_progress,
               recipe_path: Path | None = None) -> tuple[Path, dict]:
    """One file of a repo at a pinned revision (e.g. a published imatrix), checked against the hub's sha256."""
    cfg = settings()
    snap = resolve(repo, revision, cfg.endpoint, recipe_path)
    found = tuple(f for f in snap.files if f.name == name)
    if not found:
        raise HubError(f"{repo}@{snap.commit[:12]} has no file {name!r}", "check imatrix.file.hf.path")
    paths = download(snap, found, cfg, progress, recipe_path)
    verify(snap, found, paths, {}, progress)
    return paths[name], {"repo": repo, "revision": revision, "commit": snap.commit, "path": name,
                         "endpoint": cfg.endpoint}
