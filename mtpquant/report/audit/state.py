"""What one verify run collects (the checks that held, the notes), and the helpers every check uses."""

from __future__ import annotations

from pathlib import Path

from mtpquant.core.errors import CardError, VerifyError
from mtpquant.core.progress import ProgressFn
from mtpquant.core.rundir import RunDir
from mtpquant.report import card


class Audit:
    """A run directory under verification: its checks, its notes, and where each artifact's header is read."""

    def __init__(self, run: RunDir, progress: ProgressFn):
        self.run = run
        self.progress = progress
        self.checks: list[str] = []
        self.notes: list[str] = []
        self.local: dict[str, Path] = {}  # artifact name -> the file to read its header from (first shard if split)
        self.split: dict[str, dict] = {}  # artifact name -> its publish.json entry, when only its shards are here

    def ok(self, line: str) -> None:
        """Record a check that held."""
        self.checks.append(line)

    def note(self, line: str) -> None:
        """Record what could not be checked here, and why."""
        self.notes.append(line)


def load_receipts(run: RunDir) -> dict[str, dict]:
    """Every receipts/*.json as plain JSON, by file name; unreadable ones as a VerifyError."""
    try:
        nodes = card.load_receipts(run)
    except CardError as exc:
        raise VerifyError(exc.message, exc.hint) from None
    return {name: card.plain(node) for name, node in nodes.items()}


def need(d: dict, key: str, where: str):
    """d[key], or a VerifyError naming the receipt and the field."""
    if key not in d:
        raise VerifyError(f"{where}: no field '{key}'", "the receipt is incomplete; rerun the step that writes it")
    return d[key]


def first_diff(a, b, path: str = ""):
    """(path, a_value, b_value) of the first difference between two JSON values, or (None, None, None)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{path}.{k}", a.get(k), b.get(k)
            r = first_diff(a[k], b[k], f"{path}.{k}")
            if r[0] is not None:
                return r
        return None, None, None
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            r = first_diff(x, y, f"{path}[{i}]")
            if r[0] is not None:
                return r
        if len(a) != len(b):
            return f"{path} length", len(a), len(b)
        return None, None, None
    if a != b or type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        return path, a, b
    return None, None, None
