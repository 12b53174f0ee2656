"""The files of the repo as this run would have it, and what receipts/publish.json records about them."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import VerifyError
from mtpquant.core.files import sha256_file
from mtpquant.core.rundir import RunDir
from mtpquant.report import card

STEP = "publish"
# What split.check_shards proved. A merge (llama-gguf-split --merge) gives other bytes than the artifact:
# it keeps split.*
SHARDS_HOLD = "the artifact's metadata (split.* keys aside) and every tensor's bytes, in order"


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
        """The file as JSON, its local path relative to `root` when it lies inside."""
        local = None
        if self.local is not None:
            local = str(self.local.relative_to(root)) if root and self.local.is_relative_to(root) else str(self.local)
        return {"path": self.path, "kind": self.kind, "local": local, "size": self.size, "sha256": self.sha256,
                "action": self.action, "part_of": self.part_of}


def local_file(run: RunDir, rel: str, kind: str) -> PlannedFile:
    """A file of the run directory as it is now, at the same path in the repo."""
    path = run.root / rel
    return PlannedFile(rel, kind, path, path.stat().st_size, sha256_file(path))


def receipt_body(repo: str, limit: int, artifacts: list[PlannedFile], shards: dict[str, list[PlannedFile]],
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
    return {"repo": repo, "split_max_size": limit, "artifacts": entries, "files": others, "card": card.CARD_FILE}


def _support_files(run: RunDir) -> list[PlannedFile]:
    """SHA256SUMS, manifest.json and the tensor-type files the quantize receipts name (what --rebuild needs)."""
    out = [local_file(run, "SHA256SUMS", "checksums")]
    if run.manifest_path.is_file():
        out.append(local_file(run, "manifest.json", "manifest"))
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
                out.append(local_file(run, target.relative_to(run.root).as_posix(), "tensor-types"))
    return out


def repo_files(run: RunDir, artifacts: list[PlannedFile], shards: dict[str, list[PlannedFile]], pending: bool
               ) -> list[PlannedFile]:
    """Every file of the repo: artifacts or their shards, support files, receipts, and the card last."""
    files = []
    for a in artifacts:
        files.extend(shards.get(a.path) or [a])
    files += _support_files(run)
    for p in sorted(run.receipts.glob("*.json")):
        if p.name == f"{STEP}.json" and pending:
            continue
        files.append(local_file(run, f"receipts/{p.name}", "receipt"))
    if pending:  # a real run writes these before uploading; their bytes are not known now
        files.append(PlannedFile(f"receipts/{STEP}.json", "receipt", None, None, None, "make"))
        files.append(PlannedFile(card.CARD_FILE, "card", None, None, None, "make"))
    else:
        files.append(local_file(run, card.CARD_FILE, "card"))
    return files
