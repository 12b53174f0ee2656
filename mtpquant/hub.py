"""Pinned Hugging Face sources: resolve the revision to a commit once, download through huggingface_hub (its cache,
its resume, its token handling), prove every byte against the hub's own hashes, convert safetensors to BF16 GGUF."""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from mtpquant import __version__, toolchain
from mtpquant.errors import MtpquantError, VerifyError
from mtpquant.files import CHUNK, incomplete_path
from mtpquant.inspect import SPLIT_RE
from mtpquant.progress import ProgressFn, no_progress
from mtpquant.receipts import RunDir
from mtpquant.recipe import Recipe

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


class HubError(MtpquantError):
    """The hub could not give what the recipe names: repo, revision, access, files or a connection."""


class IntegrityError(VerifyError):
    """A downloaded file's bytes differ from what the hub says the commit holds."""

    def __init__(self, file: str, where: str, what: str, expected: str, got: str):
        self.file, self.what, self.expected, self.got = file, what, expected, got
        super().__init__(f"{file} from {where}: {what} mismatch: expected {expected}, got {got}", RETRY_HINT)


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
    from huggingface_hub import constants

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


# ----------------------------------------------------------------------------------------------- errors

class _Context:
    """What a hub error message names: the recipe, the repo, the revision, the endpoint."""

    def __init__(self, recipe_path: Path | None, repo: str, revision: str, endpoint: str):
        self.prefix = f"{recipe_path}: " if recipe_path else ""
        self.repo, self.revision, self.endpoint = repo, revision, endpoint

    def explain(self, exc: Exception, file: str | None = None) -> MtpquantError | None:
        """One line for each failure a user can act on; None for anything else (a bug to surface)."""
        from huggingface_hub import errors as e

        if isinstance(exc, e.GatedRepoError):
            return HubError(f"{self.prefix}source.hf.repo: {self.repo} is gated and "
                            f"{'the token given has no access' if _has_token() else 'no token was given'}",
                            f"accept its terms on the Hub, then {TOKEN_HINT}")
        if isinstance(exc, e.RepositoryNotFoundError):
            return HubError(f"{self.prefix}source.hf.repo: {self.repo} was not found on {self.endpoint}",
                            f"check the repo id; a private repo also needs a token ({TOKEN_HINT})")
        if isinstance(exc, e.RevisionNotFoundError):
            return HubError(f"{self.prefix}source.hf.revision: {self.revision!r} is not a branch, tag or commit "
                            f"of {self.repo}", "give an existing branch, tag or full commit sha")
        if isinstance(exc, getattr(e, "RemoteEntryNotFoundError", e.EntryNotFoundError)):
            return HubError(f"{file or 'a file'} is no longer in {self.repo}@{self.revision[:12]} on {self.endpoint}",
                            "the listing changed under us; run again")
        if isinstance(exc, e.LocalEntryNotFoundError):
            why = "may not be asked (HF_HUB_OFFLINE is set)" if settings().offline else "cannot be reached"
            return HubError(f"{file} of {self.repo}@{self.revision[:12]} is not in the Hugging Face cache, and "
                            f"{self.endpoint} {why}", "connect to the hub (unset HF_HUB_OFFLINE) to download it once")
        if isinstance(exc, e.OfflineModeIsEnabled) or is_network_error(exc):
            return HubError(f"cannot reach {self.endpoint} to resolve {self.repo}@{self.revision} "
                            f"({first_line(exc)}), and this run has no recorded commit to use from the cache",
                            "check the network and HF_ENDPOINT; once a run has fetched this revision, re-runs work "
                            "offline from the cache")
        if isinstance(exc, e.HfHubHTTPError):
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
    from huggingface_hub import get_token

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
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, library_name="mtpquant", library_version=__version__)
    try:
        info = api.model_info(repo, revision=revision, files_metadata=True)
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
    from huggingface_hub import hf_hub_download

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
    for f in files:
        inflight = 0
        try:
            got = hf_hub_download(snap.repo, f.name, revision=snap.commit, cache_dir=cfg.cache_dir,
                                  endpoint=cfg.endpoint, local_files_only=cfg.offline,
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
            raise IntegrityError(f.name, snap.where, "size", f"{f.size} bytes", f"{st.st_size} bytes")
        key = f"{real}:{st.st_size}:{st.st_mtime_ns}"
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
                raise IntegrityError(f.name, snap.where, "sha256", f.sha256, sha)
            if not f.sha256 and oid != f.git_oid:
                _evict(paths[f.name])
                raise IntegrityError(f.name, snap.where, "git blob id", str(f.git_oid), oid)
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
    root = toolchain.cache_root() / "hf" / f"models--{snap.repo.replace('/', '--')}" / snap.commit
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
        st = dest.stat()  # keyed like source.prepare's hash cache: resolved path, size, mtime
        cache[f"{os.path.realpath(dest)}:{st.st_size}:{st.st_mtime_ns}"] = f.sha256
        out[f.name] = dest
    return out


def _same_content(dest: Path, blob: Path, f: HubFile, cache: dict[str, str]) -> bool:
    try:
        if os.path.samefile(dest, blob):
            return True
        st = dest.stat()
    except OSError:
        return False
    return cache.get(f"{os.path.realpath(dest)}:{st.st_size}:{st.st_mtime_ns}") == f.sha256


def _cached(snap: Snapshot, f: HubFile, cfg: HubSettings) -> bool:
    from huggingface_hub import try_to_load_from_cache

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
    from mtpquant.inspect import Cursor, iter_metadata

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
    for key, value in items:
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
    from huggingface_hub import get_session, hf_hub_url, hf_raise_for_status
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(snap.repo, f.name, revision=snap.commit, endpoint=cfg.endpoint)
    headers = build_hf_headers(library_name="mtpquant", library_version=__version__)

    def fetch(offset: int, size: int) -> bytes:
        end = min(offset + size, f.size) - 1
        if end < offset:
            return b""
        r = get_session().get(url, headers={**headers, "Range": f"bytes={offset}-{end}"}, timeout=60)
        hf_raise_for_status(r)
        if r.status_code != 206:
            raise EOFError("the hub does not serve byte ranges")
        return r.content

    try:
        return read_gguf_header(fetch)
    except Exception as exc:  # any failure only skips the early check
        log.info("could not read the header of %s ahead of the download: %s", f.name, exc)
        return None


def precheck_header(recipe: Recipe, header: dict, where: str) -> None:
    """Architecture, layer counts and MTP head of a GGUF header against `expect:` / `mtp:`."""
    from mtpquant.source import expect_problems, raise_problems

    nextn = int(header["nextn_layers"] or 0)
    main = int(header["block_count"]) - nextn if header["block_count"] is not None else None
    raise_problems(where, expect_problems(recipe, header["arch"], main, nextn))


# ----------------------------------------------------------------------------------------------- the source step

def precheck_config(recipe: Recipe, config_path: Path, where: str) -> None:
    """Layer counts and MTP head from config.json against `expect:` / `mtp:`, before download and conversion."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HubError(f"{where}: config.json is not readable JSON ({exc})", "is this a checkpoint repo?") from None
    text = {**config, **(config.get("text_config") or {})}
    layers = text.get("num_hidden_layers")
    nextn = next((text[k] for k in ("mtp_num_hidden_layers", "num_nextn_predict_layers") if k in text), None)
    from mtpquant.source import expect_problems, raise_problems

    # the architecture is a llama.cpp name, known only after conversion; it is checked then
    raise_problems(f"{where} config.json", expect_problems(
        recipe, None, layers if isinstance(layers, int) else None, nextn if isinstance(nextn, int) else None,
        "mtp_num_hidden_layers"))


def _recorded(previous: dict, hf) -> dict | None:
    """The resolution this run already recorded for the same repo, revision and file selection."""
    if previous.get("kind") == "hf" and previous.get("repo") == hf.repo and previous.get("revision") == hf.revision \
            and previous.get("files_spec") == hf.files and previous.get("commit") and previous.get("hf_files"):
        return previous
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


def fetch_source(recipe: Recipe, run: RunDir, progress: ProgressFn = no_progress) -> tuple[Path, dict]:
    """The recipe's `source.hf` as a verified local GGUF (first shard), converting safetensors; plus provenance."""
    hf = recipe.source.hf
    cfg = settings()
    previous = _recorded(run.read_receipt("source") or {}, hf)
    snap, fmt, files, resolved_at = _pin(recipe, previous, cfg, progress)
    here = Snapshot(snap.repo, snap.revision, snap.commit, cfg.endpoint, snap.files)  # where to download from now
    if fmt == SAFETENSORS:
        # config.json first: a checkpoint that cannot match the recipe is refused before the weights come
        config = download(here, tuple(f for f in files if f.name == "config.json"), cfg, progress, recipe.path)
        precheck_config(recipe, config["config.json"], snap.where)
    elif not previous and not _cached(here, files[0], cfg) and (header := peek_gguf(here, files[0], cfg)):
        # the header first (byte ranges): a model that cannot match the recipe is refused before the download
        precheck_header(recipe, header, f"{snap.where} {files[0].name} (header)")
    paths = download(here, files, cfg, progress, recipe.path)
    verified = dict((previous or {}).get("hf_verified") or {})
    checked = verify(snap, files, paths, verified, progress)
    provenance = {
        "kind": "hf", "repo": hf.repo, "revision": hf.revision, "commit": snap.commit, "endpoint": snap.endpoint,
        "files_spec": hf.files, "format": fmt, "resolved_at": resolved_at, "commit_from_receipt": bool(previous),
        "hf_files": [f.to_json() for f in checked], "pre_tokenizer": hf.pre_tokenizer,
    }
    if fmt == SAFETENSORS:
        from mtpquant import convert

        conversion = convert.convert_checkpoint(paths["config.json"].parent, {f.name: f.sha256 for f in checked},
                                                hf.repo.split("/")[1], pre_tokenizer=hf.pre_tokenizer,
                                                log_path=run.logs / "convert.log", progress=progress)
        path, provenance["conversion"], kept = conversion.path, conversion.provenance(), list(paths.values())
    else:
        linked = materialize(snap, checked, paths, verified)
        path, provenance["local_dir"] = linked[files[0].name], str(linked[files[0].name].parent)
        kept = [*paths.values(), *linked.values()]
    provenance["hf_verified"] = {k: v for k, v in verified.items()
                                 if any(k.startswith(os.path.realpath(p) + ":") for p in kept)}
    return path, provenance


def _pin(recipe: Recipe, previous: dict | None, cfg: HubSettings, progress: ProgressFn
         ) -> tuple[Snapshot, str, tuple[HubFile, ...], str | None]:
    """The commit and files to fetch: as this run recorded them, else resolved now (the revision, once)."""
    hf = recipe.source.hf
    if previous:
        # resolved once: later runs of this run directory keep the recorded commit and need no request at all
        snap = Snapshot(hf.repo, hf.revision, previous["commit"], previous.get("endpoint") or cfg.endpoint,
                        tuple(HubFile(d["name"], d["size"], d["sha256"], d.get("git_oid"), d.get("lfs", True))
                              for d in previous["hf_files"]))
        log.info("using commit %s of %s recorded for revision %s", snap.commit, hf.repo, hf.revision)
        return snap, previous.get("format", "gguf"), snap.files, previous.get("resolved_at")
    if cfg.offline:
        raise HubError(f"HF_HUB_OFFLINE is set and this run has not yet resolved {hf.repo}@{hf.revision}",
                       "run once online; re-runs of this run directory then use the Hugging Face cache")
    label = f"resolve {hf.repo}@{hf.revision}"
    progress(label, 0, 1)
    snap = resolve(hf.repo, hf.revision, cfg.endpoint, recipe.path)
    fmt, files = select(snap, hf.files, recipe.path)
    if fmt != SAFETENSORS and hf.pre_tokenizer:
        raise HubError(f"{recipe.path}: source.hf.pre_tokenizer: only used when converting safetensors, and "
                       f"{hf.files!r} is a GGUF", "remove it, or set source.hf.files: safetensors")
    progress(label, 1, 1)
    return snap, fmt, files, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
