"""Long prompts for the context sweep, from real text that this project did not write and that every machine has:
the installed Python standard library's own source files (a coding-agent style prompt), or the user's documents.

A document is one long text; the prompt for a context length is its first N tokens (counted by the server's own
/tokenize) followed by a question, so the documents of one length differ and each length cuts the same documents.
"""

from __future__ import annotations

import os
import platform
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import UsageError
from mtpquant.core.files import sha256_bytes

Tokenize = Callable[[str], list[int]]
Detokenize = Callable[[list[int]], str]

# Not the library's own code: third-party packages installed beside it, caches, and test suites (their data files
# carry deliberately odd encodings and generated blobs).
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
FILE_HEADER = "# file: {path}\n"
STDLIB_QUESTION = ("\n\nYou are a coding agent working in the code above. Pick one function defined in these files, "
                   "say which file defines it, and explain in a few sentences what it does and how you would test "
                   "it.")
DOCUMENT_QUESTION = "\n\nSummarize the document above in a few sentences."
FIRST_GUESS_CHARS_PER_TOKEN = 4.0  # only sizes the first read; the server's token count decides


@dataclass(frozen=True)
class LongSource:
    """Where the documents come from: every stdlib source file in sorted order, or the user's files in order."""

    kind: str  # "stdlib" | "documents"
    root: Path | None  # the stdlib folder (never recorded: it names this machine's folders)
    files: tuple[str, ...]  # stdlib: paths relative to root; documents: the paths as given

    def describe(self) -> dict:
        """What the receipt says about the source (no machine-specific folders)."""
        if self.kind == "stdlib":
            return {"kind": "stdlib", "python": platform.python_version(),
                    "implementation": platform.python_implementation(), "files_available": len(self.files),
                    "order": "paths relative to sysconfig.get_paths()['stdlib'], sorted; document i starts at file "
                             "i * files_available // documents",
                    "skipped_folders": sorted(SKIP_DIRS), "file_header": FILE_HEADER.strip(),
                    "question": STDLIB_QUESTION.strip()}
        return {"kind": "documents", "files": [Path(f).name for f in self.files],
                "question": DOCUMENT_QUESTION.strip()}


@dataclass(frozen=True)
class Document:
    """One long text and the files it is made of (their start offsets in `text`)."""

    index: int
    text: str
    tokens: tuple[int, ...]
    files: tuple[tuple[str, int, str], ...]  # (path or name, start offset in text, sha256 of the file's bytes)
    preface: str
    question: str

    def prompt(self, body_tokens: int, detokenize: Detokenize) -> tuple[str, dict]:
        """The prompt holding the first `body_tokens` tokens of the document, and what the receipt says about it."""
        body = detokenize(list(self.tokens[:body_tokens]))
        used = len(os.path.commonprefix([self.text[:len(body) + 8], body]))  # a cut inside a UTF-8 character
        content = self.preface + body + self.question
        out = {"document": self.index, "body_tokens": min(body_tokens, len(self.tokens)), "body_chars": len(body),
               "content_sha256": sha256_bytes(content.encode("utf-8")), "content_chars": len(content)}
        inside = [p for p, start, _ in self.files if start < used]
        ends = [start for _, start, _ in self.files[1:]] + [len(self.text)]
        out["files"] = inside
        out["last_file_truncated"] = used < ends[len(inside) - 1]
        return content, out


def stdlib_source() -> LongSource:
    """Every .py file of the installed standard library (third-party packages and test suites left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        rel = Path(folder).relative_to(root)
        files += [(rel / n).as_posix() for n in names if n.endswith(".py")]
    if not files:
        raise UsageError(f"no Python source files under {root} (sysconfig's stdlib folder)",
                         "give your own long documents: smoke.long_documents in the recipe")
    return LongSource("stdlib", root, tuple(sorted(files)))


def documents_source(paths: Sequence[Path]) -> LongSource:
    """The user's own documents, each one document, in the order given."""
    for p in paths:
        _read_text(Path(p))
    return LongSource("documents", None, tuple(str(p) for p in paths))


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read long document ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: long document is not UTF-8 text (byte {exc.start})",
                         "give plain UTF-8 text files in smoke.long_documents") from None


def documents(src: LongSource, count: int, need_tokens: int, tokenize: Tokenize) -> list[Document]:
    """`count` documents of at least `need_tokens` tokens each where the source allows (user documents as they
    are, however long: the sweep skips a length a document is too short for)."""
    if src.kind == "documents":
        out = []
        for i, f in enumerate(src.files):
            text = _read_text(Path(f))
            out.append(Document(i, text, tuple(tokenize(text)), ((Path(f).name, 0, sha256_bytes(text.encode())),),
                                "", DOCUMENT_QUESTION))
        return out
    return [_stdlib_document(src, i, (i * len(src.files)) // count, need_tokens, tokenize) for i in range(count)]


def _stdlib_document(src: LongSource, index: int, start: int, need_tokens: int, tokenize: Tokenize) -> Document:
    """Files from `start` on (wrapping round), each under its header line, until the text holds need_tokens."""
    parts: list[str] = []
    files: list[tuple[str, int, str]] = []
    size = 0
    chars_per_token = FIRST_GUESS_CHARS_PER_TOKEN
    pos = start
    while True:
        target = need_tokens * chars_per_token * 1.1
        while size < target:
            if pos - start == len(src.files):
                raise UsageError(f"the Python standard library holds fewer than {need_tokens} tokens of source",
                                 "give your own long documents: smoke.long_documents in the recipe")
            path = src.files[pos % len(src.files)]
            pos += 1
            raw = (src.root / path).read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            block = FILE_HEADER.format(path=path) + text + ("\n" if not text.endswith("\n") else "") + "\n"
            files.append((path, size, sha256_bytes(raw)))
            parts.append(block)
            size += len(block)
        text = "".join(parts)
        tokens = tokenize(text)
        if len(tokens) >= need_tokens:
            return Document(index, text, tuple(tokens), tuple(files), _stdlib_preface(files[0][0]),
                            STDLIB_QUESTION)
        chars_per_token = max(size / max(len(tokens), 1), 0.5)


def _stdlib_preface(first: str) -> str:
    return (f"Below are source files of the Python {platform.python_version()} standard library, one after another "
            f"in sorted order starting at {first}; each starts with a line '# file: <path>'.\n\n")
