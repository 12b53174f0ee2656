"""manifest.json against the receipts: the run's name, the source, and each step's files, sha256s and receipt."""

from __future__ import annotations

import json

from mtpquant.core.errors import VerifyError
from mtpquant.core.receipts import KINDS, file_name
from mtpquant.report.audit.state import Audit
from mtpquant.report.card import CARD_FILE

WHERE = "manifest.json"
HINT = "manifest.json and the receipts are not of the same build; rebuild the run (mtpquant build)"
# Steps whose receipts must be there: what the artifacts are. Measurements may be redone or removed since.
REQUIRED = ("imatrix", "quantize")


def check_manifest(audit: Audit, receipts: dict, quantize: dict) -> None:
    """The manifest names the run, the source, the imatrix and every variant as the receipts do, and each step's
    receipt; one VerifyError naming the first field that differs."""
    manifest = _load(audit)
    card = receipts.get("card.json")
    if card is not None and manifest.get("name") != card.get("name"):
        _differs("name", manifest.get("name"), "receipts/card.json", card.get("name"))
    src = receipts["source.json"]
    for key in ("file", "sha256"):
        _same(f"source.{key}", (manifest.get("source") or {}).get(key), "receipts/source.json", src.get(key))
    steps = manifest.get("steps")
    if not isinstance(steps, dict):
        raise VerifyError(f"{WHERE}: no 'steps' object", HINT)
    listed = {name.partition(":")[2] for name in steps if name.startswith("quantize:")}
    if unlisted := sorted(set(quantize) - listed):
        raise VerifyError(f"{WHERE}: steps has no quantize:{unlisted[0]}, but receipts/quantize-{unlisted[0]}.json "
                          "is there", HINT)
    for name, entry in steps.items():
        _check_step(audit, receipts, quantize, name, entry)
    audit.ok(f"{WHERE} agrees with the receipts ({len(steps)} step(s): name, source, files, sha256s)")


def _load(audit: Audit) -> dict:
    path = audit.run.manifest_path
    if not path.is_file():
        raise VerifyError(f"{WHERE}: missing", "the run is incomplete; rerun `mtpquant build`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise VerifyError(f"{WHERE}: unreadable ({exc})", HINT) from None
    if not isinstance(data, dict):
        raise VerifyError(f"{WHERE}: not a JSON object", HINT)
    return data


def _check_step(audit: Audit, receipts: dict, quantize: dict, name: str, entry) -> None:
    kind, _, tag = name.partition(":")
    field = f"steps.{name}"
    if entry is None:
        used = {q.get("imatrix_sha256") for q in quantize.values()} - {None}
        if kind == "imatrix" and ("imatrix.json" in receipts or used):
            raise VerifyError(f"{WHERE}: {field} is null, but the variants were quantized with an imatrix", HINT)
        return
    if not isinstance(entry, dict):
        raise VerifyError(f"{WHERE}: {field} is not an object", HINT)
    if kind == "card":
        if entry.get("file") != CARD_FILE:
            raise VerifyError(f"{WHERE}: {field}.file is {json.dumps(entry.get('file'))}, a run's card is "
                              f"{CARD_FILE}", HINT)
        return
    if kind not in KINDS:  # a step this mtpquant does not know: nothing to hold it against
        return
    if kind == "quantize" and tag not in quantize:
        raise VerifyError(f"{WHERE}: {field} has no receipt (receipts/quantize-{tag}.json is missing)", HINT)
    own = f"receipts/{file_name(kind, tag or None)}"
    if "receipt" in entry and entry["receipt"] != own:
        raise VerifyError(f"{WHERE}: {field}.receipt is {json.dumps(entry['receipt'])}, the step's receipt is {own}",
                          HINT)
    receipt = receipts.get(own.removeprefix("receipts/"))
    if receipt is None:
        if kind == "imatrix" and "imatrix.json" not in receipts:  # a pinned imatrix: the variants name its sha256
            pinned = {q.get("imatrix_sha256") for q in quantize.values()}
            if entry.get("sha256") not in pinned:
                _differs(f"{field}.sha256", entry.get("sha256"), "the quantize receipts' imatrix_sha256",
                         ", ".join(sorted(filter(None, pinned))) or None)
            return
        if kind in REQUIRED:
            raise VerifyError(f"{WHERE}: {field} names {own}, which is missing", HINT)
        audit.note(f"{WHERE}: {field} names {own}, not in this run (measured at build time, removed since)")
        return
    outputs = dict(entry.get("outputs") or {})
    if "file" in entry or "sha256" in entry:
        outputs[entry.get("file")] = entry.get("sha256")
    for file, sha in outputs.items():
        _same(f"{field}.file", file, own, receipt.get("file"))
        _same(f"{field}.sha256", sha, own, receipt.get("sha256"))


def _same(field: str, value, where: str, want) -> None:
    if value != want:
        _differs(field, value, where, want)


def _differs(field: str, value, where: str, want) -> None:
    raise VerifyError(f"{WHERE}: {field} is {json.dumps(value)}, {where} says {json.dumps(want)}", HINT)
