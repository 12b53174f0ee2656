"""What a publish did: the report it returns, and its entry in logs/publish.json (the endpoint and commit, which
the uploaded receipt cannot hold)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from mtpquant import __version__
from mtpquant.core.files import write_json_atomic
from mtpquant.core.rundir import RunDir
from mtpquant.report.publish.plan import PlannedFile

RECORD = "publish.json"  # under logs/: what each publish did (endpoint, commit, the hub's check)


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
        """The repo's page on the hub."""
        return f"{self.endpoint}/{self.repo}"

    @property
    def uploaded(self) -> tuple[PlannedFile, ...]:
        """The files sent (or, in a dry run, to be sent or made)."""
        return tuple(f for f in self.files if f.action in ("upload", "make"))

    @property
    def unchanged(self) -> tuple[PlannedFile, ...]:
        """The files the hub already held with these bytes."""
        return tuple(f for f in self.files if f.action == "unchanged")

    def to_json(self) -> dict:
        """The report as JSON (what `publish --json` prints)."""
        return {"run_dir": str(self.root), "repo": self.repo, "endpoint": self.endpoint, "url": self.url,
                "dry_run": self.dry_run, "private": self.private, "repo_existed": self.repo_existed,
                "transfer": self.transfer, "commit": self.commit, "checked": self.checked,
                "files": [f.to_json(self.root) for f in self.files], "shards": self.shards, "notes": list(self.notes)}


def record(run: RunDir, report: PublishReport) -> None:
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
