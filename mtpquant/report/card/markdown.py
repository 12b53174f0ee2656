"""Markdown from receipt values: the escaping filters, number formats and shell commands the card prints.

Text from a recipe or a GGUF is data: it reaches the card only through these functions, each of which returns Md.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable

from jinja2.runtime import Undefined

from mtpquant.core.errors import CardError
from mtpquant.report.card.nodes import Node

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_MD_SPECIAL = re.compile(r"([\\`*\[\]|~])")
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")  # intraword _ never makes emphasis
# At the start of a line these begin a block (heading, list, setext underline, thematic break), and a value may be
# printed at the start of a line
_MD_BLOCK_MARK = re.compile(r"^( ?)([#+=-])")
_MD_ORDERED_MARK = re.compile(r"^( ?\d{1,9})([.)])(?=\s|$)")
# CommonMark's line endings (LF, CR, CRLF); NEL, LS and PS are line breaks to Unicode (and to str.splitlines)
_CR_LINE_END = re.compile(r"\r\n?")
_UNICODE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_SHELL_UNSAFE = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
SHELL_BARE = ("-s", "--metrics", "--no-webui", "--no-ppl")  # options that take no value
FIG_ONE = {"pct": lambda x: f"{100 * x:.1f}", "x": lambda x: f"{x:.2f}", "tps": lambda x: f"{x:.1f}",
           "len": lambda x: f"{x:.2f}"}
FIG_UNIT = {"pct": " %", "x": "×", "tps": " tok/s", "len": ""}


class Md(str):
    """Text that is safe to place in Markdown as it is (escaped, or written by the card code)."""


def md_text(value) -> Md:
    """Prose: Markdown punctuation backslash-escaped, HTML characters as entities, one line (every run of white
    space, line breaks of every kind included, becomes one space), nothing that starts a block."""
    if isinstance(value, Md):
        return value
    s = re.sub(r"\s+", " ", _scalar(value, "text"))
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = _MD_UNDERSCORE.sub(r"\\_", _MD_SPECIAL.sub(r"\\\1", s))
    return Md(_MD_ORDERED_MARK.sub(r"\1\\\2", _MD_BLOCK_MARK.sub(r"\1\\\2", s)))


def md_code(value, cell: bool = False) -> Md:
    """An inline code span that shows `value` literally (fence longer than any backtick run inside), on one line."""
    s = " ".join(_scalar(value, "code").splitlines()) or " "  # "``" would open a span, not show an empty one
    longest = max((len(m) for m in re.findall(r"`+", s)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if s.startswith("`") or s.endswith("`") or (s.startswith(" ") and s.endswith(" ") and s.strip()) \
        else ""
    if cell:
        s = s.replace("|", "\\|")  # GFM splits table cells on | even inside code spans
    return Md(f"{fence}{pad}{s}{pad}{fence}")


def md_fence(value, lang: str = "") -> Md:
    """A fenced code block that shows `value` literally, whatever backticks it holds.

    CR and CRLF become LF: CommonMark ends lines there too, and the card is read back with universal newlines."""
    s = _CR_LINE_END.sub("\n", _scalar(value, "block")).rstrip("\n")
    longest = max((len(m) for m in re.findall(r"^\s*(`{3,}|~{3,})", s, re.MULTILINE)), default=0)
    fence = "`" * max(3, longest + 1)
    return Md(f"{fence}{lang}\n{s}\n{fence}")


def md_sha(value) -> Md:
    """A sha256 as code, refused unless it is 64 lowercase hex digits."""
    s = _scalar(value, "sha256")
    if not SHA_RE.match(s):
        raise CardError(f"a sha256 in the receipts is not 64 lowercase hex digits: {s[:80]!r}")
    return Md(f"`{s}`")


def md_json(value) -> Md:
    """A value as indented JSON (for a fence); NEL, LS and PS escaped like the other line breaks."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    for ch, escaped in _UNICODE_BREAKS.items():
        text = text.replace(ch, escaped)
    return Md(text)


def _scalar(value, what: str) -> str:
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    if value is None or isinstance(value, (dict, list)):
        raise CardError(f"the card needs a {what} value here, the receipts hold {json.dumps(value)[:80]}")
    return str(value)


def number(value, what: str) -> float:
    """A receipt value that must be a number, as a float; a CardError naming `what` otherwise."""
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CardError(f"the card needs a number for {what}, the receipts hold {json.dumps(value)[:80]}")
    return float(value)


def fmt_num(value, spec: str = ".2f") -> Md:
    """A figure in a format spec."""
    return Md(format(number(value, "a figure"), spec))


def fmt_pct(value, digits: int = 1) -> Md:
    """A share as a percentage."""
    return Md(f"{100 * number(value, 'a share'):.{digits}f} %")


def fmt_size(n) -> Md:
    """Bytes in the largest binary unit that fits."""
    b = number(n, "a size")
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= scale:
            return Md(f"{b / scale:.2f} {unit}")
    return Md(f"{int(b)} B")


def fmt_fig(fig, kind: str) -> Md:
    """A smoke figure {"value", "ci95"} as text: `58.3 % (95% CI 57.7–58.9 %)`, `1.39× (...)`, `812.3 tok/s`."""
    if not isinstance(fig, dict) or "value" not in fig or "ci95" not in fig:
        where = f"{fig.where}: {fig.path}" if isinstance(fig, Node) else "a figure"
        raise CardError(f"{where}: expected {{value, ci95}}")
    value, ci = fig["value"], fig["ci95"]
    if value is None:
        return Md("not defined (no drafts)" if kind == "pct" else "not defined")
    one, unit = FIG_ONE[kind], FIG_UNIT[kind]
    text = f"{one(number(value, 'a figure'))}{unit}"
    n = fig.get("n")
    if ci:
        text += f" (95% CI {one(ci[0])}–{one(ci[1])}{unit}, n={int(n)} prompts)" if n else \
            f" (95% CI {one(ci[0])}–{one(ci[1])}{unit})"
    elif fig.get("note"):
        text += " (" + md_text(str(fig["note"])) + ")"
    return Md(text)


def shell_command(argv: Iterable, bare: tuple[str, ...] = SHELL_BARE) -> str:
    """argv as a copy-pasteable shell command, one option (with its value) per continued line.

    `bare` options take no value, so a word after them starts a line of its own."""
    args = [_shell_quote(str(a)) for a in argv]
    if not args:
        raise CardError("an empty command was recorded")
    lines = [[args[0]]]
    for a in args[1:]:
        last = lines[-1]
        is_opt = a.startswith("-") and not re.fullmatch(r"-\d[\d.]*", a)
        if is_opt or len(lines) == 1 or last[0] in bare or (last[0].startswith("-") and len(last) == 2):
            lines.append([a])  # a new option, or a positional after an option that already has its value
        else:
            last.append(a)
    return " \\\n  ".join(" ".join(line) for line in lines)


def _shell_quote(arg: str) -> str:
    """shlex.quote, or bash's $'...' with escapes when the word holds a control character or a line break, so the
    command stays on its lines and copies back exactly."""
    if not _SHELL_UNSAFE.search(arg):
        return shlex.quote(arg)
    out = []
    for ch in arg:
        if ch in "\\'":
            out.append("\\" + ch)
        elif _SHELL_UNSAFE.match(ch):
            out.append("".join(f"\\x{b:02x}" for b in ch.encode()))  # UTF-8 bytes: the same in every locale
        else:
            out.append(ch)
    return "$'" + "".join(out) + "'"
