"""The run directory: manifest, one receipt per step and variant, logs, SHA256SUMS."""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
from dataclasses import dataclass
from pathlib import Path

from mtpquant import __version__
from mtpquant.core import receipts
from mtpquant.core.errors import UsageError, VerifyError
from mtpquant.core.files import SPLIT_RE, write_json_atomic, write_text_atomic
from mtpquant.core.receipts import R, Receipt

SCHEMA = 1


SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def unsafe_name(name: str) -> str | None:
    """Why a listed file name could leave the run directory or mislead a reader, or None when it is a plain
    relative name."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if any(part in ("..", ".", "") for part in name.split("/")):
        return "has '..', '.' or empty parts"
    if any(ord(ch) < 32 or ord(ch) == 127 or ch in "\\\x85\u2028\u2029" for ch in name):
        return "has a control character, a backslash or a line separator"
    return None


@dataclass(frozen=True)
class Artifact:
    """A model file of a run: its variant tag, path (first shard when split) and sha256 from SHA256SUMS."""

    variant: str
    path: Path
    sha256: str | None


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def receipts(self) -> Path:
        return self.root / "receipts"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def work(self) -> Path:
        """Plans, tensor-type files and other small intermediates, kept for the record."""
        return self.root / "work"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def ensure(self) -> None:
        for p in (self.root, self.receipts, self.logs, self.work):
            if p.exists() and not p.is_dir():
                raise UsageError(f"{p} is a file, not a run directory", "give --out a folder (new or a run's)")
            p.mkdir(parents=True, exist_ok=True)

    def read(self, kind: type[R], variant: str | None = None, *, stale_ok: bool = False) -> R | None:
        """The typed receipt of a kind (and variant), None if there is none (see core.receipts.read)."""
        return receipts.read(self.receipts, kind, variant, stale_ok=stale_ok)

    def write(self, receipt: Receipt, variant: str | None = None) -> Path:
        return receipts.write(self.receipts, receipt, variant)

    def read_manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return {}

    def write_manifest(self, data: dict) -> None:
        write_json_atomic(self.manifest_path, {"schema": SCHEMA, "mtpquant": __version__, **data})

    def write_sha256sums(self, entries: dict[str, str]) -> Path:
        """`<sha256>  <file>` lines (sha256sum's format), sorted by file name."""
        p = self.root / "SHA256SUMS"
        write_text_atomic(p, "".join(f"{sha}  {name}\n" for name, sha in sorted(entries.items())))
        return p

    def read_sha256sums(self) -> dict[str, str]:
        """{file: sha256} from SHA256SUMS; a name that could leave the run directory is refused in one line."""
        p = self.root / "SHA256SUMS"
        out = {}
        if not p.is_file():
            return out
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise VerifyError(f"{p}: unreadable ({exc})", "rebuild the run (mtpquant build)") from None
        for no, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            sha, sep, name = line.partition("  ")
            if not sep or not SHA256_RE.match(sha) or not name:
                raise VerifyError(f"{p}:{no}: not a '<sha256>  <file>' line", "rebuild the run (mtpquant build)")
            if problem := unsafe_name(name):
                raise VerifyError(f"{p}:{no}: {name!r} {problem}",
                                  "SHA256SUMS may list only files inside the run directory; rebuild the run")
            out[name] = sha
        return out

    def artifacts(self) -> list[Artifact]:
        """The model GGUFs SHA256SUMS lists (imatrix files and later shards left out), tagged by variant.

        The tag comes from the quantize receipt naming the file, else from the file name after `<name>-`.
        """

        sums = self.read_sha256sums()
        if not sums:
            raise UsageError(f"{self.root}: no SHA256SUMS (is this a run directory made by `mtpquant build`?)",
                             "give a .gguf file or a finished run directory")
        tags = {}
        for p in sorted(self.receipts.glob("quantize-*.json")) if self.receipts.is_dir() else []:
            tag = p.stem.removeprefix("quantize-")
            r = self.read(receipts.QuantizeReceipt, tag, stale_ok=True)
            if r is not None:
                tags[r.file] = tag
        name = self.read_manifest().get("name")
        out = []
        for fname in sorted(sums):
            if not fname.endswith(".gguf") or fname.endswith(".imatrix.gguf"):
                continue
            m = SPLIT_RE.match(fname)
            if m and m.group("i") != "00001":
                continue
            stem = m.group("prefix") if m else fname[:-len(".gguf")]
            tag = tags.get(fname)
            if tag is None:
                tag = stem[len(name) + 1:] if name and stem.startswith(name + "-") else stem.rsplit("-", 1)[-1]
            path = self.root / fname
            if not path.is_file():
                raise UsageError(f"{path}: listed in SHA256SUMS but missing", "rerun `mtpquant build`")
            out.append(Artifact(tag, path, sums[fname]))
        if not out:
            raise UsageError(f"{self.root}: SHA256SUMS lists no model .gguf", "run `mtpquant build` first")
        return out


@contextlib.contextmanager
def locked(run: RunDir):
    """One build per run directory at a time."""
    run.ensure()
    with open(run.root / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{run.root} is in use by another mtpquant process",
                             "wait for it to finish or choose another --out") from None
        yield
