"""A loopback Hugging Face Hub-compatible HTTP endpoint for tests: the real `huggingface_hub` client talks to it
through `HF_ENDPOINT` (or `endpoint=`), so hub I/O is tested without patching anything away.

Folder layout (`root`), readable and editable by hand:

    <owner>/<name>/repo.json        {"gated": bool, "private": bool, "branches": {name: sha}, "tags": {name: sha},
                                      "commits": {sha: {"parents": [...], "message": str,
                                                        "files": {path: {"sha256", "size", "lfs"}}}}}
    <owner>/<name>/objects/<sha256> file contents, addressed by their sha256

Read endpoints served (what huggingface_hub 2.4 calls for model repos):
    GET  /api/models/{repo}[/revision/{rev}]      model_info / repo_info (siblings; blobId/size/lfs with ?blobs=1)
    GET  /api/models/{repo}/tree/{rev}[/{path}]   list_repo_tree / list_repo_files (?recursive=1)
    GET  /api/models/{repo}/refs                  list_repo_refs
    HEAD /{repo}/resolve/{rev}/{path}             hf_hub_download's metadata call: X-Repo-Commit, ETag,
                                                  X-Linked-Etag / X-Linked-Size for LFS files, Content-Length
    GET  /{repo}/resolve/{rev}/{path}             the bytes, with Range support (206 + Content-Range)
Errors carry the X-Error-Code / X-Error-Message headers the client maps to RepositoryNotFoundError,
RevisionNotFoundError, EntryNotFoundError and GatedRepoError.

Write endpoints served (what huggingface_hub 2.4's create_repo / create_commit call when the hub offers no Xet
storage; every one needs `Authorization: Bearer <token>` when the server has a token):
    GET  /api/whoami-v2                           whoami: 401 "Invalid credentials in Authorization header" otherwise
    POST /api/repos/create                        create_repo: 409 when it exists; a new repo gets an initial commit
                                                  holding .gitattributes, as on the Hub
    POST /api/validate-yaml                       the README front matter check create_commit makes first
    POST /api/models/{repo}/preupload/{rev}       upload mode (lfs/regular) and the remote oid of each path
    POST /{repo}.git/info/lfs/objects/batch       LFS batch, basic transfer: no `actions` for an object already
                                                  stored (so an interrupted upload resumes where it stopped)
    PUT  /lfs-upload/{repo}/{oid}                 the bytes; refused unless they hash to `oid`
    POST /lfs-verify/{repo}                       LFS verify
    POST /api/models/{repo}/commit/{rev}          NDJSON commit: header, file (base64), lfsFile, deletedFile,
                                                  deletedFolder; `parentCommit` checked (412 when stale)
No Xet endpoint is served: the client's Xet path needs a CAS server, so callers must use the LFS transfer.

Routes are entries of `HubServer.routes`, each a (method, regex, handler) whose handler takes (request, match) and
returns a `Reply`. `HubServer.faults` injects one-off failures; `HubServer.on_commit` runs after each API commit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Files the Hub keeps in LFS (its default .gitattributes patterns, abridged) and anything above 10 MiB.
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".npz", ".npy", ".zip",
                ".tar", ".gz", ".model", ".msgpack")
LFS_MIN_SIZE = 10 << 20
CHUNK = 1 << 20
DATE = "2026-01-01T00:00:00.000Z"
SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
REPO = rf"(?P<repo>{SEGMENT}/{SEGMENT})"
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()
USER = "mtpquant-test"


def git_blob_oid(data: bytes) -> str:
    """git's object id of a file: sha1 over 'blob <size>\\0' + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The pointer file git keeps in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Request:
    method: str
    path: str  # raw (still percent-encoded) path
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""

    def flag(self, name: str) -> bool:
        return (self.query.get(name) or ["false"])[0].lower() in ("1", "true")


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None  # streamed instead of `body`
    start: int = 0
    length: int = 0

    @classmethod
    def json(cls, data, status: int = 200, headers: dict | None = None) -> Reply:
        return cls(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode())

    @classmethod
    def error(cls, status: int, code: str | None, message: str, headers: dict | None = None) -> Reply:
        h = {"X-Error-Message": message, **(headers or {})}
        if code:
            h["X-Error-Code"] = code
        return cls.json({"error": message}, status, h)


class HubError(Exception):
    def __init__(self, reply: Reply):
        self.reply = reply


@dataclass
class Fault:
    """Answer the next `times` requests matching method and path regex with `reply` instead of serving them."""

    method: str
    pattern: str
    reply: Reply
    times: int = 1


class HubServer:
    """Serves the repos under `root` on 127.0.0.1 (a free port); `token` is what gated and private repos accept and
    what writes need."""

    def __init__(self, root: Path, token: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.faults: list[Fault] = []
        self.on_commit: Callable[[str, str], None] | None = None  # (repo, commit sha) after each API commit
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self.routes: list[tuple[str, re.Pattern, Callable[[Request, re.Match], Reply]]] = [
            ("GET", re.compile(rf"^/api/models/{REPO}/?$"), self.api_model_info),
            ("GET", re.compile(rf"^/api/models/{REPO}/revision/(?P<rev>[^/]+)/?$"), self.api_model_info),
            ("GET", re.compile(rf"^/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), self.api_tree),
            ("GET", re.compile(rf"^/api/models/{REPO}/refs/?$"), self.api_refs),
            ("HEAD", re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), self.resolve),
            ("GET", re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), self.resolve),
            ("GET", re.compile(r"^/api/whoami-v2/?$"), self.api_whoami),
            ("POST", re.compile(r"^/api/repos/create/?$"), self.api_create_repo),
            ("POST", re.compile(r"^/api/validate-yaml/?$"), self.api_validate_yaml),
            ("POST", re.compile(rf"^/api/models/{REPO}/preupload/(?P<rev>[^/]+)/?$"), self.api_preupload),
            ("POST", re.compile(rf"^/{REPO}\.git/info/lfs/objects/batch/?$"), self.lfs_batch),
            ("PUT", re.compile(rf"^/lfs-upload/{REPO}/(?P<oid>[0-9a-f]{{64}})$"), self.lfs_upload),
            ("POST", re.compile(rf"^/lfs-verify/{REPO}/?$"), self.lfs_verify),
            ("POST", re.compile(rf"^/api/models/{REPO}/commit/(?P<rev>[^/]+)/?$"), self.api_commit),
        ]

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the hub server has not been started")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> HubServer:
        """Listen (on the same port as before when restarted) and serve in a daemon thread."""
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self._port or 0), Handler)
        self._httpd.daemon_threads = True
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), name="hubserver",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: later requests get 'connection refused', as with an unreachable hub."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=10)
            self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ repos on disk

    def repo_dir(self, repo: str) -> Path:
        return self.root / repo

    def load(self, repo: str) -> dict | None:
        try:
            return json.loads((self.repo_dir(repo) / "repo.json").read_text())
        except FileNotFoundError:
            return None

    def save(self, repo: str, data: dict) -> None:
        p = self.repo_dir(repo) / "repo.json"
        tmp = p.with_name(".repo.json.incomplete")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(p)

    def create_repo(self, repo: str, gated: bool = False, exist_ok: bool = False, private: bool = False,
                    initial_commit: bool = False) -> None:
        """An empty repo, or (`initial_commit`, as the Hub's create does) one whose main holds .gitattributes."""
        with self._lock:
            if self.load(repo) is not None:
                if exist_ok:
                    return
                raise ValueError(f"{repo} exists")
            (self.repo_dir(repo) / "objects").mkdir(parents=True, exist_ok=True)
            self.save(repo, {"gated": gated, "private": private, "branches": {}, "tags": {}, "commits": {}})
        if initial_commit:
            self.commit(repo, {".gitattributes": GITATTRIBUTES}, message="initial commit")

    def store(self, repo: str, blob: bytes) -> str:
        """Keep `blob` under its sha256 in the repo's object store; return the sha256."""
        sha = hashlib.sha256(blob).hexdigest()
        obj = self.repo_dir(repo) / "objects" / sha
        if not obj.exists():
            tmp = obj.with_name(f".{sha}.{os.getpid()}.{threading.get_ident()}.incomplete")
            tmp.write_bytes(blob)
            tmp.replace(obj)
        return sha

    @staticmethod
    def entry(sha256: str, size: int, lfs: bool, blob: bytes | None = None) -> dict:
        """A tree entry; a regular file's git oid needs its bytes."""
        return {"sha256": sha256, "size": size, "lfs": lfs,
                "oid": git_blob_oid(lfs_pointer(sha256, size) if lfs else blob)}

    def commit(self, repo: str, files: dict[str, bytes | Path], branch: str = "main", message: str = "upload",
               delete: tuple[str, ...] = ()) -> str:
        """Add/replace `files` (repo path -> bytes or a local file) on `branch`; return the new commit sha."""
        self.create_repo(repo, exist_ok=True)
        entries = {}
        for path, content in files.items():
            blob = content.read_bytes() if isinstance(content, Path) else bytes(content)
            lfs = path.endswith(LFS_SUFFIXES) or len(blob) >= LFS_MIN_SIZE
            entries[path] = self.entry(self.store(repo, blob), len(blob), lfs, blob)
        return self.commit_entries(repo, entries, branch, message, delete)

    def commit_entries(self, repo: str, entries: dict[str, dict], branch: str = "main", message: str = "upload",
                       delete: tuple[str, ...] = (), delete_folders: tuple[str, ...] = (),
                       parent_commit: str | None = None) -> str:
        """A new commit on `branch` from tree entries whose objects are stored; return its sha."""
        with self._lock:
            data = self.load(repo)
            parent = data["branches"].get(branch)
            if parent_commit is not None and parent is not None and not parent.startswith(parent_commit):
                raise HubError(Reply.error(412, None, "A commit has happened since. Please refresh and try again."))
            tree = dict(data["commits"][parent]["files"]) if parent else {}
            for path in delete:
                tree.pop(path, None)
            for folder in delete_folders:
                tree = {p: f for p, f in tree.items() if not p.startswith(folder.rstrip("/") + "/")}
            tree.update(entries)
            stamp = json.dumps({"parents": [parent] if parent else [], "message": message, "tree": tree,
                                "n": len(data["commits"])}, sort_keys=True)
            sha = hashlib.sha1(stamp.encode()).hexdigest()
            data["commits"][sha] = {"parents": [parent] if parent else [], "message": message, "files": tree}
            data["branches"][branch] = sha
            self.save(repo, data)
        return sha

    def tag(self, repo: str, name: str, revision: str) -> str:
        with self._lock:
            data = self.load(repo)
            sha = self._resolve(repo, data, revision)
            data["tags"][name] = sha
            self.save(repo, data)
        return sha

    def corrupt(self, repo: str, path: str, revision: str = "main") -> None:
        """Damage the stored bytes of a file (same size) while the listing keeps advertising its true sha256."""
        data = self.load(repo)
        entry = data["commits"][self._resolve(repo, data, revision)]["files"][path]
        obj = self.repo_dir(repo) / "objects" / entry["sha256"]
        blob = bytearray(obj.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        obj.write_bytes(bytes(blob))

    def _resolve(self, repo: str, data: dict, rev: str) -> str:
        if rev in data["commits"]:
            return rev
        sha = data["branches"].get(rev) or data["tags"].get(rev)
        for prefix, table in (("refs/heads/", "branches"), ("refs/tags/", "tags")):
            if not sha and rev.startswith(prefix):
                sha = data[table].get(rev[len(prefix):])
        if not sha:
            raise HubError(Reply.error(404, "RevisionNotFound", f"Invalid rev id: {rev}"))
        return sha

    # ------------------------------------------------------------------------------------------ read endpoints

    def _repo(self, req: Request, repo: str) -> dict:
        data = self.load(repo)
        if data is None:
            raise HubError(Reply.error(404, "RepoNotFound", "Repository not found"))
        if data.get("private") and self.token is not None and _bearer(req) != self.token:
            raise HubError(Reply.error(404, "RepoNotFound", "Repository not found"))
        if data.get("gated"):
            auth = req.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else None
            if given is None or given != self.token:
                if given is not None and self.token is not None and given != self.token:
                    raise HubError(Reply.error(401, None, "Invalid credentials in Authorization header"))
                raise HubError(Reply.error(401, "GatedRepo", f"Access to model {repo} is restricted. You must have "
                                                             "access to it and be authenticated to access it."))
        return data

    def api_model_info(self, req: Request, m: re.Match) -> Reply:
        repo = m["repo"]
        data = self._repo(req, repo)
        sha = self._resolve(repo, data, unquote(m.groupdict().get("rev") or "main"))
        siblings = []
        for path, f in sorted(data["commits"][sha]["files"].items()):
            s: dict = {"rfilename": path}
            if req.flag("blobs"):
                s.update({"blobId": f["oid"], "size": f["size"]})
                if f["lfs"]:
                    s["lfs"] = {"sha256": f["sha256"], "size": f["size"],
                                "pointerSize": len(lfs_pointer(f["sha256"], f["size"]))}
            siblings.append(s)
        owner = repo.split("/")[0]
        return Reply.json({"_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo,
                           "author": owner, "sha": sha, "lastModified": DATE, "createdAt": DATE,
                           "private": bool(data.get("private")),
                           "gated": "manual" if data.get("gated") else False, "disabled": False, "downloads": 0,
                           "likes": 0, "tags": [], "library_name": None, "siblings": siblings})

    def api_tree(self, req: Request, m: re.Match) -> Reply:
        repo = m["repo"]
        data = self._repo(req, repo)
        sha = self._resolve(repo, data, unquote(m["rev"]))
        base = unquote(m["path"] or "").strip("/")
        prefix = base + "/" if base else ""
        files = data["commits"][sha]["files"]
        if base and base in files:
            raise HubError(Reply.error(404, "EntryNotFound", f"{base} is a file, not a folder"))
        entries, folders = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):].split("/")
            for depth in range(1, len(rest)):
                if depth == 1 or req.flag("recursive"):
                    folders.add(prefix + "/".join(rest[:depth]))
            if len(rest) == 1 or req.flag("recursive"):
                f = files[path]
                e = {"type": "file", "oid": f["oid"], "size": f["size"], "path": path}
                if f["lfs"]:
                    e["lfs"] = {"oid": f["sha256"], "size": f["size"],
                                "pointerSize": len(lfs_pointer(f["sha256"], f["size"]))}
                entries.append(e)
        if base and not entries and not folders:
            raise HubError(Reply.error(404, "EntryNotFound", f"{base} does not exist at {sha}",
                                       {"X-Repo-Commit": sha}))
        dirs = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                for d in sorted(folders)]
        return Reply.json(dirs + entries)

    def api_refs(self, req: Request, m: re.Match) -> Reply:
        data = self._repo(req, m["repo"])

        def refs(table: str, kind: str) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": s} for n, s in sorted(data[table].items())]

        return Reply.json({"branches": refs("branches", "heads"), "tags": refs("tags", "tags"), "converts": [],
                           "pullRequests": []})

    def resolve(self, req: Request, m: re.Match) -> Reply:
        repo = m["repo"]
        data = self._repo(req, repo)
        sha = self._resolve(repo, data, unquote(m["rev"]))
        path = unquote(m["path"])
        f = data["commits"][sha]["files"].get(path)
        if f is None:
            raise HubError(Reply.error(404, "EntryNotFound", f"{path} does not exist at {sha}",
                                       {"X-Repo-Commit": sha}))
        obj = self.repo_dir(repo) / "objects" / f["sha256"]
        size = obj.stat().st_size
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f["oid"]}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if f["lfs"]:
            headers.update({"X-Linked-Etag": f'"{f["sha256"]}"', "X-Linked-Size": str(f["size"])})
        start, end, status = 0, size - 1, 200
        if rng := re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("range", "")):
            start = int(rng[1])
            end = min(int(rng[2]), size - 1) if rng[2] else size - 1
            if start >= size:
                return Reply.error(416, None, "Requested range not satisfiable",
                                   {"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return Reply(status, headers, file=obj, start=start, length=end - start + 1)

    # ------------------------------------------------------------------------------------------ write endpoints

    def _writer(self, req: Request) -> None:
        """Writes need the server's token (any, or none, when the server has no token)."""
        if self.token is None:
            return
        given = _bearer(req)
        if given is None:
            raise HubError(Reply.error(401, None, "Invalid username or password."))
        if given != self.token:
            raise HubError(Reply.error(401, None, "Invalid credentials in Authorization header"))

    def _writable(self, req: Request, repo: str) -> dict:
        self._writer(req)
        data = self.load(repo)
        if data is None:
            raise HubError(Reply.error(404, "RepoNotFound", "Repository not found"))
        return data

    def api_whoami(self, req: Request, m: re.Match) -> Reply:
        if self.token is not None and _bearer(req) != self.token:
            raise HubError(Reply.error(401, None, "Invalid credentials in Authorization header"))
        return Reply.json({"type": "user", "id": "0" * 24, "name": USER, "fullname": USER, "orgs": [],
                           "auth": {"type": "access_token", "accessToken": {"displayName": "loopback",
                                                                            "role": "write"}}})

    def api_create_repo(self, req: Request, m: re.Match) -> Reply:
        self._writer(req)
        body = json.loads(req.body or b"{}")
        if body.get("type", "model") != "model":
            raise HubError(Reply.error(400, None, "this loopback hub serves model repos only"))
        name, owner = body.get("name") or "", body.get("organization") or USER
        repo = f"{owner}/{name}"
        if not re.fullmatch(rf"{SEGMENT}/{SEGMENT}", repo):
            raise HubError(Reply.error(400, None, f"Invalid repo name {repo!r}"))
        private = body.get("visibility") == "private" or bool(body.get("private"))
        try:
            self.create_repo(repo, private=private, initial_commit=True)
        except ValueError:
            return Reply.json({"error": "You already created this model repo", "url": f"{self.url}/{repo}"}, 409,
                              {"X-Error-Message": "You already created this model repo"})
        return Reply.json({"url": f"{self.url}/{repo}", "name": repo, "id": hashlib.sha1(repo.encode()).hexdigest()})

    def api_validate_yaml(self, req: Request, m: re.Match) -> Reply:
        import yaml

        content = json.loads(req.body or b"{}").get("content", "")
        front = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            meta = yaml.safe_load(front.group(1)) if front else {}
        except yaml.YAMLError as exc:
            return Reply.json({"errors": [{"message": f"Invalid YAML: {exc}"}]}, 400,
                              {"X-Error-Message": "Invalid metadata in README.md"})
        if front and not isinstance(meta, dict):
            return Reply.json({"errors": [{"message": "metadata must be a mapping"}]}, 400,
                              {"X-Error-Message": "Invalid metadata in README.md"})
        return Reply.json({"errors": [], "warnings": []})

    def _tree(self, repo: str, data: dict, branch: str) -> dict:
        """The files at the head of `branch` (none for a branch with no commit yet)."""
        sha = data["branches"].get(branch)
        return dict(data["commits"][sha]["files"]) if sha else {}

    def api_preupload(self, req: Request, m: re.Match) -> Reply:
        repo = m["repo"]
        data = self._writable(req, repo)
        tree = self._tree(repo, data, unquote(m["rev"]))
        out = []
        for f in json.loads(req.body)["files"]:
            sample = base64.b64decode(f.get("sample") or "")
            lfs = f["path"].endswith(LFS_SUFFIXES) or int(f["size"]) >= LFS_MIN_SIZE or b"\0" in sample
            there = tree.get(f["path"])
            oid = None if there is None else there["sha256"] if there["lfs"] else there["oid"]
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        return Reply.json({"files": out, "commitOid": data["branches"].get("main")})

    def lfs_batch(self, req: Request, m: re.Match) -> Reply:
        repo = m["repo"]
        self._writable(req, repo)
        body = json.loads(req.body)
        if body.get("operation") != "upload" or "basic" not in (body.get("transfers") or ["basic"]):
            raise HubError(Reply.error(400, None, "this loopback hub offers the basic upload transfer only"))
        objects = []
        for o in body["objects"]:
            oid, size = o["oid"], int(o["size"])
            obj = self.repo_dir(repo) / "objects" / oid
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not SHA256_RE.match(oid):
                entry["error"] = {"code": 422, "message": f"invalid oid {oid!r}"}
            elif not (obj.is_file() and obj.stat().st_size == size):
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{repo}/{oid}", "header": {}},
                                    "verify": {"href": f"{self.url}/lfs-verify/{repo}", "header": {}}}
            objects.append(entry)
        return Reply(200, {"Content-Type": "application/vnd.git-lfs+json"},
                     json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode())

    def lfs_upload(self, req: Request, m: re.Match) -> Reply:
        # no token asked: like the Hub's presigned storage URLs, the href from the batch answer is the permission
        repo, oid = m["repo"], m["oid"]
        if self.load(repo) is None:
            raise HubError(Reply.error(404, "RepoNotFound", "Repository not found"))
        got = hashlib.sha256(req.body).hexdigest()
        if got != oid:
            raise HubError(Reply.error(400, None, f"sha256 of the uploaded bytes is {got}, not {oid}"))
        self.store(repo, req.body)
        return Reply(200)

    def lfs_verify(self, req: Request, m: re.Match) -> Reply:
        repo = m["repo"]
        self._writable(req, repo)
        body = json.loads(req.body)
        obj = self.repo_dir(repo) / "objects" / body["oid"]
        if not (obj.is_file() and obj.stat().st_size == int(body["size"])):
            raise HubError(Reply.error(404, None, f"LFS object {body['oid']} not found"))
        return Reply.json({"ok": True})

    def api_commit(self, req: Request, m: re.Match) -> Reply:
        repo = m["repo"]
        self._writable(req, repo)
        branch = unquote(m["rev"])
        header: dict = {}
        entries: dict[str, dict] = {}
        deleted, deleted_folders = [], []
        for line in req.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                blob = base64.b64decode(value["content"])
                entries[value["path"]] = self.entry(self.store(repo, blob), len(blob), False, blob)
            elif key == "lfsFile":
                obj = self.repo_dir(repo) / "objects" / value["oid"]
                if not obj.is_file():
                    raise HubError(Reply.error(422, None, f"LFS object {value['oid']} of {value['path']} was "
                                                          "never uploaded"))
                size = obj.stat().st_size
                if value.get("size") is not None and int(value["size"]) != size:
                    raise HubError(Reply.error(422, None, f"{value['path']}: size {value['size']} given, "
                                                          f"the object has {size}"))
                entries[value["path"]] = self.entry(value["oid"], size, True)
            elif key == "deletedFile":
                deleted.append(value["path"])
            elif key == "deletedFolder":
                deleted_folders.append(value["path"])
            else:
                raise HubError(Reply.error(400, None, f"unknown commit operation {key!r}"))
        message = header.get("summary") or "upload"
        sha = self.commit_entries(repo, entries, branch, message, tuple(deleted), tuple(deleted_folders),
                                  header.get("parentCommit"))
        if self.on_commit is not None:
            self.on_commit(repo, sha)
        return Reply.json({"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo}/commit/{sha}",
                           "hookOutput": ""})

    # ------------------------------------------------------------------------------------------ dispatch

    def _fault(self, req: Request, path: str) -> Reply | None:
        with self._lock:
            for fault in self.faults:
                if fault.method == req.method and re.search(fault.pattern, path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                    return fault.reply
        return None

    def handle(self, req: Request) -> Reply:
        with self._lock:
            self.requests.append((req.method, req.path))
        path = urlsplit(req.path).path
        if (fault := self._fault(req, path)) is not None:
            return fault
        for method, pattern, handler in self.routes:
            if method == req.method and (m := pattern.match(path)):
                try:
                    return handler(req, m)
                except HubError as exc:
                    return exc.reply
                except Exception as exc:  # a bug in this test server: answer 500 rather than drop the connection
                    return Reply.error(500, None, f"{type(exc).__name__}: {exc}")
        return Reply.error(404, None, f"no route for {req.method} {path}")


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    server_version = "mtpquant-test-hub/1"

    def log_message(self, format, *args) -> None:  # keep pytest output clean
        return None

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        body = self._body()
        req = Request(self.command, self.path, parse_qs(parts.query),
                      {k.lower(): v for k, v in self.headers.items()}, body)
        reply = self.hub.handle(req)
        self.send_response(reply.status)
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(reply.length if reply.file else len(reply.body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            if reply.file is None:
                self.wfile.write(reply.body)
                return
            with open(reply.file, "rb") as fh:
                fh.seek(reply.start)
                left = reply.length
                while left > 0 and (chunk := fh.read(min(CHUNK, left))):
                    self.wfile.write(chunk)
                    left -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve


def _bearer(req: Request) -> str | None:
    auth = req.headers.get("authorization", "")
    return auth[7:] if auth.lower().startswith("bearer ") else None
