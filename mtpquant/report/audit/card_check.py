"""The card against a fresh rendering from the receipts: its front matter, the receipts it lists with their
sha256s, the chat template it quotes, and then every line."""

from __future__ import annotations

import re

import yaml

from mtpquant.core.errors import CardError, VerifyError
from mtpquant.report import card
from mtpquant.report.audit.state import Audit

TOKEN_RE = re.compile(r"`[^`]*`|[^\s|]+")
LISTED_RE = re.compile(r"^\| `receipts/([^`|]+\.json)` \|.*\| `([0-9a-f]{64})` \|$", re.MULTILINE)
REGENERATE = "run `mtpquant card RUN_DIR`"


def check_card(audit: Audit, receipts: dict, src: dict, quantize: dict) -> None:
    """README.md is exactly what the receipts render to; the first difference is named by line and value."""
    readme = audit.run.root / card.CARD_FILE
    if not readme.is_file():
        raise VerifyError(f"{card.CARD_FILE}: missing", REGENERATE)
    text = readme.read_text(encoding="utf-8")
    card_in = receipts.get(f"{card.CARD_STEP}.json")
    if card_in is not None:
        _check_gguf_text(audit, card_in, quantize)
    try:
        ctx = card.card_context(audit.run)
        expected = card.render_context(ctx)
    except CardError as exc:
        raise VerifyError(f"{card.CARD_FILE}: cannot be re-rendered from the receipts: {exc.message}",
                          exc.hint) from None
    meta = _front_matter(text)
    if meta.get("base_model") != ctx["base_model"]:
        want = ctx["base_model"] or "no base_model"
        raise VerifyError(f"{card.CARD_FILE}: base_model is {meta.get('base_model') or 'absent'}, receipts/source.json "
                          f"gives {want} ({src.get('kind')} source, {src.get('architecture')}, "
                          f"{src.get('main_layers')} main + {src.get('nextn_predict_layers')} NextN layers)",
                          "regenerate the card with `mtpquant card RUN_DIR`")
    actual = _check_listed_receipts(audit, text)
    if text != expected:
        raise VerifyError(_card_difference(text, expected), "regenerate it with `mtpquant card RUN_DIR`")
    audit.ok(f"{card.CARD_FILE}: identical to a fresh rendering from {len(actual)} receipt(s)")


def _check_listed_receipts(audit: Audit, text: str) -> dict[str, str]:
    """The card lists every receipt with its current sha256, and no other; returns the receipts' sha256s."""
    listed = dict(LISTED_RE.findall(text))
    actual = card.receipt_sha256s(audit.run)
    for name, sha in actual.items():
        if name not in listed:
            raise VerifyError(f"{card.CARD_FILE}: does not list receipts/{name}",
                              "the card is older than the receipt; run `mtpquant card RUN_DIR`")
        if listed[name] != sha:
            raise VerifyError(f"receipts/{name}: sha256 is {sha}, {card.CARD_FILE} lists {listed[name]}",
                              "the receipt changed after the card was written; run `mtpquant card RUN_DIR`")
    for name in listed:
        if name not in actual:
            raise VerifyError(f"{card.CARD_FILE}: lists receipts/{name}, which is missing")
    return actual


def _check_gguf_text(audit: Audit, card_in: dict, quantize: dict) -> None:
    gg = card_in.get("gguf") or {}
    want = gg.get("chat_template_sha256")
    for q in quantize.values():
        got = card.gguf_text(audit.local[q["file"]])
        if got["chat_template_sha256"] != want:
            raise VerifyError(f"{q['file']}: tokenizer.chat_template sha256 is {got['chat_template_sha256']}, "
                              f"receipts/card.json records {want}", REGENERATE)


def _front_matter(text: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    if not m:
        raise VerifyError(f"{card.CARD_FILE}: no YAML front matter", REGENERATE)
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as exc:
        raise VerifyError(f"{card.CARD_FILE}: front matter is not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise VerifyError(f"{card.CARD_FILE}: front matter is not a mapping")
    return data


def _card_difference(text: str, expected: str) -> str:
    """`README.md line N (section): shows X, the receipts give Y` for the first differing line."""
    got, want = text.splitlines(), expected.splitlines()
    for i in range(max(len(got), len(want))):
        a = got[i] if i < len(got) else None
        b = want[i] if i < len(want) else None
        if a == b:
            continue
        section = next((ln.lstrip("#").strip() for ln in reversed(want[:i + 1]) if ln.startswith("#")), "front matter")
        if a is None:
            return f"{card.CARD_FILE} ends at line {i} ({section}); the receipts give more: {b[:120]!r}"
        if b is None:
            return f"{card.CARD_FILE} line {i + 1} ({section}): {a[:120]!r} is not in a rendering from the receipts"
        return _line_difference(i, section, a, b)
    return f"{card.CARD_FILE}: differs from a rendering from the receipts (line endings)"


def _line_difference(i: int, section: str, a: str, b: str) -> str:
    ta, tb = TOKEN_RE.findall(a), TOKEN_RE.findall(b)
    j = next((j for j in range(max(len(ta), len(tb))) if (ta[j] if j < len(ta) else None)
              != (tb[j] if j < len(tb) else None)), None)
    if j is not None:
        shown = ta[j] if j < len(ta) else "(nothing)"
        given = tb[j] if j < len(tb) else "(nothing)"
        return f"{card.CARD_FILE} line {i + 1} ({section}): shows {shown!r}, the receipts give {given!r}"
    return f"{card.CARD_FILE} line {i + 1} ({section}): spacing differs from a rendering from the receipts"
