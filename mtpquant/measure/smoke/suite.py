"""The prompt suite: JSONL prompts checked all at once, picked category by category, and identified by hash."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import UsageError
from mtpquant.core.files import sha256_bytes, sha256_file
from mtpquant.core.paths import DATA_DIR
from mtpquant.recipe.checker import file_problem

SUITE_PATH = DATA_DIR / "prompts" / "suite-v1.jsonl"
CATEGORIES = ("code", "math", "general")
FIELDS = ("id", "category", "messages", "prompt")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    """One prompt of the suite, as chat messages and as raw text."""

    id: str
    category: str
    messages: tuple[tuple[str, str], ...]  # (role, content)
    prompt: str  # the raw text for /completion

    def messages_json(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def to_json(self) -> dict:
        return {"id": self.id, "category": self.category, "messages": self.messages_json(), "prompt": self.prompt}


def load_suite(path: Path | None = None) -> list[Prompt]:
    """Read a JSONL prompt suite ({"id", "category", "messages", "prompt"} per line); every problem at once."""
    path = Path(path) if path is not None else SUITE_PATH
    if path.exists() and (problem := file_problem(path, text=True)):
        raise UsageError(f"{path}{problem}", "give a JSONL prompt suite saved as UTF-8")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read prompt suite ({exc.strerror or exc})") from None
    problems: list[str] = []
    out: list[Prompt] = []
    seen: set[str] = set()
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        p = _read_line(line, where, problems)
        if p is None:
            continue
        if p.id in seen:
            problems.append(f"{where}: duplicate id {p.id!r}")
            continue
        seen.add(p.id)
        out.append(p)
    if not out and not problems:
        problems.append(f"{path}: the prompt suite is empty")
    if problems:
        raise UsageError("\n".join(problems))
    return out


def _read_line(line: str, where: str, problems: list[str]) -> Prompt | None:
    try:
        d = json.loads(line)
    except ValueError as exc:
        problems.append(f"{where}: not JSON ({exc.msg})")
        return None
    return _prompt(d, where, problems)


def _prompt(d, where: str, problems: list[str]) -> Prompt | None:
    if not isinstance(d, dict):
        problems.append(f"{where}: expected a JSON object")
        return None
    bad = len(problems)
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(unknown)}")
    pid, cat, msgs, raw = d.get("id"), d.get("category"), d.get("messages"), d.get("prompt")
    if not isinstance(pid, str) or not pid:
        problems.append(f"{where}: id must be a non-empty string")
    if cat not in CATEGORIES:
        problems.append(f"{where}: category must be one of {', '.join(CATEGORIES)}, got {cat!r}")
    if not isinstance(raw, str) or not raw.strip():
        problems.append(f"{where}: prompt must be a non-empty string")
    if not _valid_messages(msgs):
        problems.append(f"{where}: messages must be a non-empty list of {{role: system|user|assistant, content}}")
    if len(problems) > bad:
        return None
    return Prompt(pid, cat, tuple((m["role"], m["content"]) for m in msgs), raw)


def _valid_messages(msgs) -> bool:
    return isinstance(msgs, list) and bool(msgs) and all(
        isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in ROLES and isinstance(m["content"], str)
        for m in msgs)


def select_prompts(suite: Sequence[Prompt], n: int | None) -> list[Prompt]:
    """The first n prompts in category-interleaved order (code, math, general, code, ...), so every category shows."""
    if n is None or n >= len(suite):
        return list(suite)
    by_cat: dict[str, list[Prompt]] = {}
    for p in suite:
        by_cat.setdefault(p.category, []).append(p)
    order: list[Prompt] = []
    for i in range(max(len(v) for v in by_cat.values())):
        order += [v[i] for v in by_cat.values() if i < len(v)]
    return order[:n]


def suite_info(suite: Sequence[Prompt] | None) -> tuple[dict, list[Prompt]]:
    """What the receipt says about the suite (file or inline prompts, sha256, size), and the suite itself."""
    if suite is None:
        full = load_suite()
        return {"file": f"mtpquant/data/prompts/{SUITE_PATH.name}", "sha256": sha256_file(SUITE_PATH),
                "prompts": len(full)}, full
    full = list(suite)
    if not full:
        raise UsageError("the prompt suite is empty")
    blob = "\n".join(json.dumps(p.to_json(), sort_keys=True) for p in full).encode()
    return {"file": None, "sha256": sha256_bytes(blob), "prompts": len(full),
            "inline": [p.to_json() for p in full]}, full
