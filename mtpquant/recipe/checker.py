"""A YAML tree checked field by field: every problem collected as `FILE: field.path: problem (hint)`."""

from __future__ import annotations

import codecs
import difflib
import math
import re
import re._parser as re_parser  # the stdlib's own regex parser, to look at a pattern's structure
import stat
from pathlib import Path
from typing import Any

MISSING = object()
# C0 and C1 controls (tab, CR, LF, NEL among them), DEL, and Unicode's line and paragraph separators: a recipe value
# is one line of text, and it reaches file names, commands and the model card
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class Checker:
    """Collects `FILE: field.path: problem (hint)` lines while reading a YAML tree."""

    def __init__(self, file: Path):
        self.file = file
        self.problems: list[str] = []

    def bad(self, path: str, problem: str, hint: str | None = None) -> None:
        self.problems.append(f"{self.file}: {path or '(top level)'}: {problem}" + (f" ({hint})" if hint else ""))

    def mapping(self, value: Any, path: str, allowed: dict[str, bool]) -> dict | None:
        """A dict with only known keys; allowed maps key -> required."""
        if not isinstance(value, dict):
            self.bad(path, f"expected a mapping, got {kind_of(value)}")
            return None
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                near = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
                hint = f"did you mean '{near[0]}'?" if near else "known fields: " + ", ".join(sorted(allowed))
                self.bad(join(path, str(key)), "unknown field", hint)
        for key, required in allowed.items():
            if required and key not in value:
                self.bad(join(path, key), "missing required field")
        return value

    def section(self, value: Any, path: str, allowed: dict[str, bool]) -> dict | None:
        """An optional recipe section as `mapping` checks it; None when it is absent (the defaults apply) or not a
        mapping (reported)."""
        return None if value is None else self.mapping(value, path, allowed)

    def string(self, value: Any, path: str, pattern: re.Pattern | None = None, what: str = "") -> str | None:
        if value is MISSING or value is None:
            return None
        if isinstance(value, bool):
            self.bad(path, f"expected a string, got boolean {str(value).lower()}",
                     "YAML reads yes/no/on/off/true/false as booleans: quote the value")
            return None
        if isinstance(value, (int, float)):
            self.bad(path, f"expected a string, got number {value!r}",
                     "YAML reads unquoted numbers (1.10 becomes 1.1): quote the value")
            return None
        if not isinstance(value, str):
            self.bad(path, f"expected a string, got {kind_of(value)}")
            return None
        if m := _CONTROL.search(value):
            self.bad(path, f"has a line break or control character ({m.group()!r} at position {m.start()})",
                     "write the value on one line, without control characters")
            return None
        if pattern is not None and not pattern.match(value):
            self.bad(path, f"{value!r} is not a valid {what}")
            return None
        return value

    def integer(self, value: Any, path: str, lo: int | None = None, hi: int | None = None) -> int | None:
        if value is MISSING or value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(path, f"expected an integer, got {kind_of(value)} {value!r}")
            return None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"from {lo}" + (f" to {hi}" if hi is not None else "")
            self.bad(path, f"{value} is out of range", f"use a value {rng}")
            return None
        return value

    def number(self, value: Any, path: str, lo: float | None = None, hi: float | None = None) -> float | None:
        if value is MISSING or value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.bad(path, f"expected a number, got {kind_of(value)} {value!r}")
            return None
        if not math.isfinite(value):
            self.bad(path, f"{value} is not a finite number", "YAML reads .nan and .inf as numbers: give a value")
            return None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.bad(path, f"{value} is out of range", f"use a value between {lo} and {hi}")
            return None
        return float(value)

    def boolean(self, value: Any, path: str) -> bool | None:
        if value is MISSING or value is None:
            return None
        if not isinstance(value, bool):
            self.bad(path, f"expected true or false, got {kind_of(value)} {value!r}")
            return None
        return value

    def choice(self, value: Any, path: str, choices: tuple[str, ...], what: str, fold: bool = True) -> str | None:
        s = self.string(value, path)
        if s is None:
            return None
        canon = s.upper() if fold else s
        if canon in choices:
            return canon
        near = difflib.get_close_matches(canon, list(choices), n=1, cutoff=0.6)
        hint = (f"did you mean {near[0]}? " if near else "") + "valid: " + ", ".join(choices)
        self.bad(path, f"unknown {what} {s!r}", hint)
        return None

    def int_list(self, value: Any, path: str, lo: int = 0, hi: int | None = None) -> tuple[int, ...] | None:
        if value is MISSING or value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value:
            self.bad(path, f"expected a non-empty list of integers, got {kind_of(value)}")
            return None
        out = [self.integer(v, f"{path}[{i}]", lo, hi) for i, v in enumerate(value)]
        if any(v is None for v in out):
            return None
        if len(set(out)) != len(out):
            self.bad(path, "has duplicates")
            return None
        return tuple(out)  # type: ignore[arg-type]

    def regex(self, value: Any, path: str) -> str | None:
        s = self.string(value, path)
        if s is None:
            return None
        try:
            parsed = re_parser.parse(s)
        except re.error as exc:
            self.bad(path, f"invalid regular expression {s!r}: {exc}")
            return None
        if why := _backtracking(parsed):
            self.bad(path, f"regular expression {s!r} {why}, which can take exponential time", BACKTRACK_HINTS[why])
            return None
        return s

    def path(self, value: Any, path: str, base: Path, must_exist: bool = True, text: bool = False) -> Path | None:
        """A path relative to `base`; when it must exist, a regular file (and with `text`, UTF-8 text)."""
        s = self.string(value, path)
        if s is None:
            return None
        p = Path(s).expanduser()
        p = p if p.is_absolute() else (base / p)
        if must_exist and not p.exists():
            self.bad(path, f"file not found: {p}", "paths are relative to the recipe's folder")
            return None
        if must_exist and (problem := file_problem(p, text)):
            self.bad(path, f"{p}{problem}", "save it as UTF-8 text" if "UTF-8" in problem else "give a file")
            return None
        return p


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def file_kind(p: Path) -> str:
    """What a path that is not a regular file is, in words: 'a directory', 'a FIFO', 'a character device', ..."""
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return what
    return "not a regular file"


def file_problem(p: Path, text: bool = False) -> str | None:
    """Why an existing path cannot be read as a file (' is a FIFO (named pipe), not a regular file', ': not UTF-8
    (byte N)'), worded to follow the path; None when it can."""
    if not p.is_file():  # stat only: opening a FIFO to look at it would block
        return f" is {file_kind(p)}, not a regular file"
    problem = utf8_problem(p) if text else None
    return f": {problem}" if problem else None


def utf8_problem(p: Path, chunk: int = 1 << 20) -> str | None:
    """Why a regular file is not UTF-8 text ('not UTF-8 (byte N)', or the read error), None when it is."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0
    try:
        with open(p, "rb") as f:
            while True:
                data = f.read(chunk)
                pending = len(decoder.getstate()[0])  # bytes of a character split by the previous chunk
                try:
                    decoder.decode(data, final=not data)
                except UnicodeDecodeError as exc:
                    return f"not UTF-8 (byte {done - pending + exc.start})"
                if not data:
                    break
                done += len(data)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


def kind_of(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


NESTED = "repeats a repetition"
AMBIGUOUS = "repeats alternatives that can match the same text"
BACKTRACK_HINTS = {
    NESTED: "write it without a quantified group that itself holds a quantifier, e.g. (a+)+ -> a+",
    AMBIGUOUS: "inside a repeated group, start each alternative with a different letter, e.g. (a|ab)* -> (ab?)*",
}


def _backtracking(items, inside: bool = False) -> str | None:
    """Why a parsed pattern can backtrack catastrophically: a repeat (max > 1) inside another, or, inside one,
    alternatives not told apart by their first letter (the parser has already factored out common prefixes, so
    `(a|ab)` arrives as `a(?:|b)`: an empty alternative)."""
    for op, av in items:
        if op in (re_parser.MAX_REPEAT, re_parser.MIN_REPEAT, re_parser.POSSESSIVE_REPEAT):
            _lo, hi, sub = av
            repeats = hi is re_parser.MAXREPEAT or hi > 1
            if repeats and inside:
                return NESTED
            if why := _backtracking(sub, inside or repeats):
                return why
        elif op == re_parser.SUBPATTERN:
            if why := _backtracking(av[-1], inside):
                return why
        elif op == re_parser.BRANCH:
            if inside and not _distinct_starts(av[1]):
                return AMBIGUOUS
            for b in av[1]:
                if why := _backtracking(b, inside):
                    return why
        elif op in (re_parser.ASSERT, re_parser.ASSERT_NOT) and (why := _backtracking(av[1], inside)):
            return why
    return None


def _distinct_starts(alternatives) -> bool:
    """Every alternative starts with a literal character and no two with the same one."""
    firsts = [alt[0][1] if alt and alt[0][0] == re_parser.LITERAL else None for alt in alternatives]
    return None not in firsts and len(set(firsts)) == len(firsts)
