"""The run directory: manifest, one receipt per step and variant, logs, SHA256SUMS."""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from dataclasses import dataclass
from pathlib import Path

from mtpquant import __version__
from mtpquant.core.errors import UsageError
from mtpquant.core.files import SPLIT_RE, write_json_atomic, write_text_atomic

SCHEMA = 1


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
            p.mkdir(parents=True, exist_ok=True)

    def receipt_path(self, step: str, tag: str | None = None) -> Path:
        return self.receipts / (f"{step}-{tag}.json" if tag else f"{step}.json")

    def read_receipt(self, step: str, tag: str | None = None) -> dict | None:
        p = self.receipt_path(step, tag)
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise UsageError(f"{p}: unreadable receipt ({exc})", "delete it, or rerun with --force") from None

    def write_receipt(self, step: str, data: dict, tag: str | None = None) -> Path:
        p = self.receipt_path(step, tag)
        body = {"schema": SCHEMA, "step": step, "variant": tag, "mtpquant": __version__,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **data}
        write_json_atomic(p, body)
        return p

    def all_receipts(self) -> dict[str, dict]:
        out = {}
        if self.receipts.is_dir():
            for p in sorted(self.receipts.glob("*.json")):
                out[p.name] = json.loads(p.read_text())
        return out

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
        p = self.root / "SHA256SUMS"
        out = {}
        if p.is_file():
            for line in p.read_text().splitlines():
                if line.strip():
                    sha, _, name = line.partition("  ")
                    out[name.strip()] = sha.strip()
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
            r = self.read_receipt("quantize", p.stem.removeprefix("quantize-")) or {}
            if r.get("file"):
                tags[r["file"]] = r.get("variant") or p.stem.removeprefix("quantize-")
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
