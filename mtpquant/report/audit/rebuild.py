"""`verify --rebuild`: llama-quantize again from the recorded source, tensor-type overrides and imatrix, in a
temporary folder laid out like the run, and the bytes compared with the artifact's; what of the toolchain (commit,
flags, compiler, CPU features, llama-quantize's sha256) differs from the one each receipt records is said too."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import GGUFReadError, VerifyError
from mtpquant.core.files import CHUNK, cached_sha256, sha256_file
from mtpquant.core.procs import run_tool
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.rundir import RunDir
from mtpquant.modelfile.header import read_header
from mtpquant.quant.keys import quantize_key, toolchain_key
from mtpquant.report.audit.state import load_receipts, need


@dataclass(frozen=True)
class RebuildResult:
    variant: str
    file: str
    bit_exact: bool
    sha256: str  # of the rebuilt file
    seconds: float
    same_toolchain: bool  # the recorded input key re-derives with this toolchain
    first_difference: str | None = None
    toolchain_differences: tuple[str, ...] = ()  # what of this toolchain's identity differs from the recorded one

    def to_json(self) -> dict:
        """The result as JSON."""
        return {"variant": self.variant, "file": self.file, "bit_exact": self.bit_exact, "sha256": self.sha256,
                "seconds": self.seconds, "same_toolchain": self.same_toolchain,
                "first_difference": self.first_difference, "toolchain_differences": list(self.toolchain_differences)}

    def line(self) -> str:
        """What the rebuild showed, in one line: whether the bytes agree, and with which toolchain."""
        verdict = f"bit-exact ({self.seconds:.1f} s)" if self.bit_exact else (
            f"rebuilt sha256 {self.sha256}, first difference {self.first_difference}")
        if not self.toolchain_differences:
            return f"{self.file}: {verdict} with the recorded toolchain"
        return (f"{self.file}: {verdict} with another toolchain than the recorded one: "
                f"{'; '.join(self.toolchain_differences)}")


def rebuild_run(run: RunDir, tc, source: Path | None = None, progress: ProgressFn = no_progress,
                receipts: dict | None = None, workdir: Path | None = None) -> list[RebuildResult]:
    """Quantize every variant again from its receipt into a temporary folder and compare the bytes.

    Raises VerifyError naming every variant whose bytes differ (after all were tried).
    """
    receipts = receipts if receipts is not None else load_receipts(run)
    src = receipts["source.json"]
    quantize = [(n[len("quantize-"):-5], r) for n, r in receipts.items() if n.startswith("quantize-")]
    source_path = _find_source(run, src, [q for _, q in quantize], source)
    sizes = sum(q["bytes"] for _, q in quantize)
    base = Path(workdir) if workdir else run.root
    free = shutil.disk_usage(base).free
    if sizes > free:
        raise VerifyError(f"{base}: {free} bytes free, the rebuild needs {sizes}", "free space or pass a work folder")
    results = []
    with tempfile.TemporaryDirectory(prefix=".verify-rebuild-", dir=base) as tmp:
        for i, (tag, q) in enumerate(quantize):
            progress("rebuild", i, len(quantize))
            results.append(_rebuild_one(run, tc, tag, q, source_path, Path(tmp) / tag))
        progress("rebuild", len(quantize), len(quantize))
    bad = [r for r in results if not r.bit_exact]
    if bad:
        raise VerifyError(f"rebuild differs: {' | '.join(r.line() for r in bad)}",
                          "with the recorded toolchain the bytes should be identical; check the toolchain and source")
    return results


# What of a toolchain's identity the rebuild compares: (what to call it, how to read it from an identity).
IDENTITY_PARTS = (
    ("llama.cpp commit", lambda i: i.get("llama_cpp_commit")),
    ("CMake flags", lambda i: i.get("cmake_flags")),
    ("compiler", lambda i: i.get("compiler")),
    ("CPU features", lambda i: (i.get("cpu") or {}).get("features")),
    ("llama-quantize sha256", lambda i: ((i.get("binaries") or {}).get("llama-quantize") or {}).get("sha256")),
)


def toolchain_differences(recorded: dict, current: dict) -> tuple[str, ...]:
    """Each part of the toolchain identity (commit, flags, compiler, CPU features, llama-quantize's sha256) that
    differs between the one a receipt records and this one: `<part>: <here> here, <recorded> recorded`, or for a
    list the entries not in both, `<part>: only here: ..., only recorded: ...`."""
    out = []
    for name, read in IDENTITY_PARTS:
        here, then = read(current), read(recorded)
        if isinstance(here, list) and isinstance(then, list):
            only = [(f"only {where}: ", [x for x in a if x not in b]) for where, a, b in
                    (("here", here, then), ("recorded", then, here))]
            if any(items for _, items in only):
                out.append(f"{name}: " + ", ".join(w + " ".join(map(str, items)) for w, items in only if items))
        elif here != then:
            out.append(f"{name}: {'not known' if here is None else _shown(here)} here, "
                       + ("none recorded" if then is None else f"{_shown(then)} recorded"))
    return tuple(out)


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _find_source(run: RunDir, src: dict, quantize: list[dict], explicit: Path | None) -> Path:
    """The recorded source GGUF (first shard), checked against receipts/source.json by sha256."""
    name = src.get("file")
    files: dict = src.get("files") or {}
    candidates = _source_candidates(run, src, quantize, explicit)
    cache = dict(src.get("hash_cache") or {})
    for c in candidates:
        if not c.is_file():
            continue
        shards = [c.with_name(n) for n in files] if files else [c]
        if not all(p.is_file() for p in shards):
            continue
        got = {p.name: cached_sha256(p, cache) for p in shards}
        if got == files or (not files and next(iter(got.values())) == src.get("sha256")):
            return c.resolve()
        if explicit is not None and c == Path(explicit):
            raise VerifyError(f"{c}: sha256 {got} does not match receipts/source.json ({files})",
                              "give the source the run was built from")
    raise VerifyError(f"source {name}: not found (looked in {', '.join(sorted({str(c) for c in candidates})) or '-'})",
                      "pass the BF16 source with --source FILE")


def _source_candidates(run: RunDir, src: dict, quantize: list[dict], explicit: Path | None) -> list[Path]:
    """Where the source may be: the path given, the run's source/ folder, the recorded paths and commands."""
    name = src.get("file")
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(Path(explicit))
    if name:
        candidates += [run.root / "source" / name, run.root / name]
        if src.get("location"):
            candidates.append(Path(src["location"]))
        for q in quantize:
            candidates += [Path(a) for a in q.get("command", []) if Path(str(a)).name == name and Path(a).is_absolute()]
    return candidates


def _rebuild_one(run: RunDir, tc, tag: str, q: dict, source: Path, work: Path) -> RebuildResult:
    """llama-quantize with the recorded arguments, in a folder laid out like the run (same relative paths)."""
    where = f"receipts/quantize-{tag}.json"
    argv = [str(a) for a in need(q, "command", where)]
    if len(argv) < 5 or Path(argv[0]).name != "llama-quantize" or argv[-2] != q["type"] or not argv[-1].isdigit():
        raise VerifyError(f"{where}: the recorded command is not `llama-quantize [options] SOURCE OUT TYPE THREADS`")
    options, out_name = argv[1:-4], argv[-3]
    cwd = _lay_out(run, q, where, options, out_name, work)
    same = quantize_key(q["source_sha256"], q["type"], q["overrides"], q.get("imatrix_sha256"),
                        toolchain_key(tc)) == q.get("input_key")
    differences = toolchain_differences(q.get("toolchain") or {}, _identity(tc))
    started = time.monotonic()
    run_tool([tc.tool("llama-quantize"), *options, source, out_name, q["type"], argv[-1]], cwd=cwd,
             log_path=work / f"rebuild-{tag}.log")
    seconds = round(time.monotonic() - started, 3)
    rebuilt = Path(os.path.normpath(cwd / out_name))
    sha = sha256_file(rebuilt)
    original = run.root / q["file"]
    diff = None if sha == q["sha256"] else (_first_byte_difference(rebuilt, original) if original.is_file()
                                            else "unknown (the original is not here whole)")
    rebuilt.unlink(missing_ok=True)
    return RebuildResult(tag, q["file"], sha == q["sha256"], sha, seconds, same, diff, differences)


def _identity(tc) -> dict:
    """This toolchain's identity, with llama-quantize's sha256 taken from the file when the build did not record it
    (a llama.cpp that mtpquant did not build)."""
    ident = dict(tc.describe())
    if not ((ident.get("binaries") or {}).get("llama-quantize") or {}).get("sha256"):
        ident["binaries"] = {**(ident.get("binaries") or {}),
                             "llama-quantize": {"sha256": sha256_file(tc.tool("llama-quantize"))}}
    return ident


def _lay_out(run: RunDir, q: dict, where: str, options: list[str], out_name: str, work: Path) -> Path:
    """The folder to run in, with the imatrix and tensor-type file at the relative paths the command records."""
    # Every recorded relative path must resolve inside the folder: the imatrix path is written into the GGUF
    # (quantize.imatrix.file), so it must be given exactly as recorded, `../` and all.
    recorded = [v for o, v in itertools.pairwise(options) if o in ("--imatrix", "--tensor-type-file")]
    ups = max(_leading_ups(v) for v in [*recorded, out_name])
    cwd = work.joinpath(*(["cwd"] * ups))
    cwd.mkdir(parents=True)
    i = 0
    while i < len(options):
        opt = options[i]
        value = options[i + 1] if i + 1 < len(options) else None
        if opt == "--imatrix" and value is not None:
            _place_imatrix(run, q, where, value, cwd)
            i += 2
        elif opt == "--tensor-type-file" and value is not None:
            _write_overrides(q, where, value, cwd)
            i += 2
        else:
            i += 1
    return cwd


def _place_imatrix(run: RunDir, q: dict, where: str, value: str, cwd: Path) -> None:
    im = Path(value) if Path(value).is_absolute() else run.root / value
    if not im.is_file():
        raise VerifyError(f"{where}: imatrix {value} (relative to the run directory) not found",
                          "rebuild needs the imatrix the run used at the same relative path")
    if sha256_file(im) != q.get("imatrix_sha256"):
        raise VerifyError(f"{value}: sha256 differs from {where}'s imatrix_sha256 {q.get('imatrix_sha256')}")
    if not Path(value).is_absolute():
        _place(Path(os.path.normpath(cwd / value)), im.resolve())


def _write_overrides(q: dict, where: str, value: str, cwd: Path) -> None:
    # the receipt's overrides are the record; the file in work/ is only a copy of them
    target = Path(os.path.normpath(cwd / value))
    target.parent.mkdir(parents=True, exist_ok=True)
    overrides = need(q, "overrides", where)
    target.write_text("\n".join(overrides) + ("\n" if overrides else ""), encoding="utf-8")


def _leading_ups(value: str) -> int:
    parts = Path(os.path.normpath(value)).parts
    return next((i for i, p in enumerate(parts) if p != ".."), len(parts))


def _place(target: Path, original: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(original, target)
    except OSError:
        shutil.copy2(original, target)


def _first_byte_difference(a: Path, b: Path) -> str:
    """Where two files first differ, named by GGUF region (header/metadata or tensor) when possible."""
    offset = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(CHUNK), fb.read(CHUNK)
            if ca != cb:
                n = min(len(ca), len(cb))
                k = next((i for i in range(n) if ca[i] != cb[i]), n)
                offset += k
                break
            if not ca:
                return "none (same bytes)"
            offset += len(ca)
    return f"byte {offset} ({_region(b, offset)})"


def _region(path: Path, offset: int) -> str:
    try:
        reader = read_header(path)
    except GGUFReadError:
        return "unreadable layout"
    first = min((t.data_offset for t in reader.tensors), default=None)
    if first is None or offset < first:
        return "header and metadata"
    for t in reader.tensors:
        if t.data_offset <= offset < t.data_offset + int(t.n_bytes):
            return f"tensor {t.name}"
    return "padding or past the end"
