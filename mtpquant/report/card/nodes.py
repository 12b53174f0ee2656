"""Receipts as data for the card: each receipt a Node that names its file and field when a value is missing."""

from __future__ import annotations

from jinja2 import StrictUndefined

from mtpquant.core.errors import CardError
from mtpquant.core.files import plain_json, sha256_file
from mtpquant.core.receipts import read_file
from mtpquant.core.rundir import RunDir

STALE_HINT = "the receipt is older than this card step or was edited; rerun the step that writes it"


class Node(dict):
    """A receipt (or part of one) that knows where it came from, so a missing field is named in errors."""

    __slots__ = ("path", "where")

    def __init__(self, data: dict, where: str, path: str = ""):
        super().__init__()
        self.where = where
        self.path = path
        for key, value in data.items():
            self[key] = wrap(value, where, f"{path}.{key}" if path else str(key))

    def need(self, dotted: str):
        """The value at a dotted path, or a CardError naming the receipt file and the field."""
        node = self
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise CardError(f"{self.where}: no field '{_join(self.path, dotted)}'", STALE_HINT)
            node = node[part]
        return node


def wrap(value, where: str, path: str):
    """Dicts (also inside lists) as Nodes of the receipt `where`; other values as they are."""
    if isinstance(value, dict) and not isinstance(value, Node):
        return Node(value, where, path)
    if isinstance(value, list):
        return [wrap(v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def plain(value):
    """A Node (or list of them) back as plain dicts and lists."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b


class ReceiptUndefined(StrictUndefined):
    """StrictUndefined whose message names the receipt file and the missing field."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        obj = self._undefined_obj
        if isinstance(obj, Node) and isinstance(self._undefined_name, str):
            return f"{obj.where}: no field '{_join(obj.path, self._undefined_name)}'"
        return super()._undefined_message


def load_receipts(run: RunDir) -> dict[str, Node]:
    """Every receipts/*.json, read as its typed kind (version and fields checked), as a Node keyed by file name."""
    out: dict[str, Node] = {}
    if not run.receipts.is_dir():
        raise CardError(f"{run.root}: no receipts/ folder", "is this a run directory made by `mtpquant build`?")
    for p in sorted(run.receipts.glob("*.json")):
        receipt, envelope = read_file(p)
        out[p.name] = Node(plain_json({**envelope, **receipt.body()}), f"receipts/{p.name}")
    return out


def receipt_sha256s(run: RunDir) -> dict[str, str]:
    """sha256 of every receipts/*.json, by file name (sorted)."""
    return {p.name: sha256_file(p) for p in sorted(run.receipts.glob("*.json"))} if run.receipts.is_dir() else {}
