"""`mtpquant verify`: re-check a run directory from its files alone.

Artifacts against SHA256SUMS and their quantize receipts; every GGUF header against its receipt and the source
receipt (architecture, layer counts, weight count, NextN block); each measurement receipt against the artifact it
measured, with its figures re-derived from its own raw data where the receipt holds them; the card against a fresh
rendering from the receipts. With `rebuild`, llama-quantize runs again from the recorded source, tensor-type
overrides and imatrix, and the bytes are compared.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mtpquant.core.errors import (
    CardError,
    GGUFReadError,
    MtpquantError,
    UsageError,
    VerifyError,
)
from mtpquant.core.files import sha256_file
from mtpquant.core.procs import run_tool
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.rundir import RunDir
from mtpquant.measure import fit as fitmod
from mtpquant.measure import kld as ev
from mtpquant.measure import smoke
from mtpquant.modelfile.header import read_header
from mtpquant.modelfile.model import read_model
from mtpquant.quant.keys import quantize_key, toolchain_key
from mtpquant.report import card as cardmod

READ_CHUNK = 8 << 20


@dataclass(frozen=True)
class RebuildResult:
    variant: str
    file: str
    bit_exact: bool
    sha256: str  # of the rebuilt file
    seconds: float
    same_toolchain: bool  # the recorded input key re-derives with this toolchain
    first_difference: str | None = None

    def to_json(self) -> dict:
        return {"variant": self.variant, "file": self.file, "bit_exact": self.bit_exact, "sha256": self.sha256,
                "seconds": self.seconds, "same_toolchain": self.same_toolchain,
                "first_difference": self.first_difference}


@dataclass(frozen=True)
class VerifyReport:
    root: Path
    artifacts: dict[str, str]  # file -> sha256, every file SHA256SUMS lists
    checks: tuple[str, ...]  # one line per check that held
    notes: tuple[str, ...] = ()  # what could not be checked here, and why
    rebuilt: tuple[RebuildResult, ...] = field(default=())

    def to_json(self) -> dict:
        return {"run_dir": str(self.root), "ok": True, "artifacts": self.artifacts, "checks": list(self.checks),
                "notes": list(self.notes), "rebuild": [r.to_json() for r in self.rebuilt]}


class _Audit:
    def __init__(self, run: RunDir, progress: ProgressFn):
        self.run = run
        self.progress = progress
        self.checks: list[str] = []
        self.notes: list[str] = []
        self.local: dict[str, Path] = {}  # artifact name -> the file to read its header from (first shard if split)
        self.split: dict[str, dict] = {}  # artifact name -> its publish.json entry, when only its shards are here

    def ok(self, line: str) -> None:
        self.checks.append(line)

    def note(self, line: str) -> None:
        self.notes.append(line)


# ----------------------------------------------------------------------------------------------- entry point

def verify_run(run_dir: Path, rebuild: bool = False, toolchain=None, source: Path | None = None,
               progress: ProgressFn | None = None) -> VerifyReport:
    """Check a run directory; return what held, or raise VerifyError naming the first file and value that differ."""
    progress = progress or no_progress
    root = Path(run_dir).resolve()
    if not (root / "receipts").is_dir():
        raise UsageError(f"{root}: not a run directory (no receipts/)", "give the folder `mtpquant build` wrote")
    run = RunDir(root)
    audit = _Audit(run, progress)
    sums = _check_sums(audit)
    receipts = _load(run)
    src = receipts.get("source.json")
    if src is None:
        raise VerifyError("receipts/source.json is missing", "the run is incomplete; rerun `mtpquant build`")
    quantize = {n[len("quantize-"):-len(".json")]: r for n, r in receipts.items() if n.startswith("quantize-")}
    _check_quantize_receipts(audit, sums, receipts, quantize)
    _check_headers(audit, src, quantize)
    _check_measurements(audit, receipts, quantize)
    _check_card(audit, receipts, src, quantize)
    rebuilt: tuple[RebuildResult, ...] = ()
    if rebuild:
        if toolchain is None:
            raise UsageError("--rebuild needs the llama.cpp toolchain", "pass --llama-cpp DIR or install it")
        rebuilt = tuple(rebuild_run(run, toolchain, source=source, progress=progress, receipts=receipts))
        audit.checks += [f"rebuild {r.variant}: bit-exact ({r.seconds:.1f} s)" for r in rebuilt]
    return VerifyReport(root, sums, tuple(audit.checks), tuple(audit.notes), rebuilt)


def _load(run: RunDir) -> dict[str, dict]:
    try:
        nodes = cardmod.load_receipts(run)
    except CardError as exc:
        raise VerifyError(exc.message, exc.hint) from None
    return {name: cardmod._plain(node) for name, node in nodes.items()}


# ----------------------------------------------------------------------------------------------- artifacts

def _check_sums(audit: _Audit) -> dict[str, str]:
    """Every file SHA256SUMS lists, whole; or, in a published copy, its shards as receipts/publish.json lists them."""
    run = audit.run
    sums = run.read_sha256sums()
    if not sums:
        raise VerifyError("SHA256SUMS: missing or empty", "the run is incomplete; rerun `mtpquant build`")
    published = (run.read_receipt("publish") or {}).get("artifacts") or {}
    todo: list[tuple[str, Path, str, str]] = []  # (artifact, file, sha256 wanted, where the sha256 comes from)
    for name, want in sums.items():
        path = run.root / name
        entry = published.get(name) or {}
        shards = entry.get("shards") or []
        if path.is_file():
            todo.append((name, path, want, "SHA256SUMS"))
            audit.local[name] = path
        elif shards and all((run.root / sh["path"]).is_file() for sh in shards):
            if entry.get("sha256") != want:
                raise VerifyError(f"receipts/publish.json: {name} sha256 is {entry.get('sha256')}, SHA256SUMS says "
                                  f"{want}")
            todo += [(name, run.root / sh["path"], sh["sha256"], "receipts/publish.json") for sh in shards]
            audit.local[name] = run.root / shards[0]["path"]
            audit.split[name] = entry
        else:
            raise VerifyError(f"{name}: listed in SHA256SUMS but missing", "restore the file or rebuild the run")
    total = sum(p.stat().st_size for _, p, _, _ in todo)
    done = 0
    for _, path, want, source in todo:

        def step(n: int) -> None:
            nonlocal done
            done += n
            audit.progress("sha256", done, total)

        got = sha256_file(path, step)
        if got != want:
            raise VerifyError(f"{path.relative_to(run.root).as_posix()}: sha256 is {got}, {source} says {want}",
                              "the file changed after it was built; restore it or rebuild the run")
    audit.progress("sha256", total, total)
    audit.ok(f"{len(sums)} file(s) match SHA256SUMS")
    if audit.split:
        audit.ok(f"{sum(len(e['shards']) for e in audit.split.values())} shard(s) of {len(audit.split)} split "
                 "file(s) match receipts/publish.json")
        audit.note("split files: the whole-file sha256 is checked through their shards' sha256s in "
                   "receipts/publish.json (each shard holds the whole file's metadata plus split.* keys and its tensor "
                   "bytes in order)")
    return sums


def _check_quantize_receipts(audit: _Audit, sums: dict[str, str], receipts: dict, quantize: dict) -> None:
    src = receipts["source.json"]
    im = receipts.get("imatrix.json")
    if not quantize:
        raise VerifyError("receipts/: no quantize receipt", "the run is incomplete; rerun `mtpquant build`")
    listed = {q.get("file") for q in quantize.values()}
    for name in sums:
        if name.endswith(".gguf") and name not in listed and not (im and name == im.get("file")):
            raise VerifyError(f"{name}: listed in SHA256SUMS but no receipt describes it",
                              "remove it from the run directory, or rebuild the run")
    for tag, q in quantize.items():
        where = f"receipts/quantize-{tag}.json"
        f = _need(q, "file", where)
        if f not in sums:
            raise VerifyError(f"{where}: describes {f}, which SHA256SUMS does not list",
                              "a stale receipt of an earlier recipe? remove it, or rebuild the run")
        if _need(q, "sha256", where) != sums[f]:
            raise VerifyError(f"{f}: sha256 in SHA256SUMS is {sums[f]}, {where} says {q['sha256']}")
        size = audit.split[f].get("size") if f in audit.split else (audit.run.root / f).stat().st_size
        if _need(q, "bytes", where) != size:
            raise VerifyError(f"{f}: {size} bytes, {where} says {q['bytes']}")
        if _need(q, "source_sha256", where) != _need(src, "sha256", "receipts/source.json"):
            raise VerifyError(f"{where}: made from source sha256 {q['source_sha256']}, receipts/source.json "
                              f"records {src['sha256']}", "the source changed after this variant was built")
        if im is not None and q.get("imatrix_sha256") not in (None, im.get("sha256")):
            raise VerifyError(f"{where}: used imatrix sha256 {q['imatrix_sha256']}, receipts/imatrix.json records "
                              f"{im.get('sha256')}", "rebuild the run")
    if im is not None and im.get("file") in sums and sums[im["file"]] != im.get("sha256"):
        raise VerifyError(f"{im['file']}: sha256 in SHA256SUMS is {sums[im['file']]}, receipts/imatrix.json says "
                          f"{im.get('sha256')}")
    audit.ok(f"{len(quantize)} quantize receipt(s) agree with SHA256SUMS, the source and the imatrix")


def _need(d: dict, key: str, where: str):
    if key not in d:
        raise VerifyError(f"{where}: no field '{key}'", "the receipt is incomplete; rerun the step that writes it")
    return d[key]


def _check_headers(audit: _Audit, src: dict, quantize: dict) -> None:
    """Each artifact's header against its receipt, and its shape against the source receipt."""

    want = {"architecture": src.get("architecture"), "main layers": src.get("main_layers"),
            "NextN layers": src.get("nextn_predict_layers"), "weights": src.get("n_elements")}
    for tag, q in quantize.items():
        where = f"receipts/quantize-{tag}.json"
        info = read_model(audit.local[q["file"]])
        got = {"architecture": info.arch, "main layers": info.n_layer, "NextN layers": info.nextn.layers,
               "weights": info.n_elements}
        for what, value in got.items():
            if want[what] is not None and value != want[what]:
                raise VerifyError(f"{q['file']}: header has {what} {value}, receipts/source.json records {want[what]}",
                                  "the artifact was not made from the recorded source")
        if info.nextn.layers and not info.nextn.complete:
            raise VerifyError(f"{q['file']}: NextN block incomplete, missing {', '.join(info.nextn.missing[:4])}")
        nextn_types = {t.name: t.type for t in info.tensors if t.block in info.nextn.blocks}
        counts: dict[str, int] = {}
        for t in info.tensors:
            counts[t.type] = counts.get(t.type, 0) + 1
        derived = {"nextn_types": nextn_types, "type_counts": dict(sorted(counts.items())),
                   "file_type": info.file_type, "tensor_bytes": info.total_bytes,
                   "bits_per_weight": round(info.bits_per_weight, 4), "nextn_blocks": list(info.nextn.blocks)}
        for key, value in derived.items():
            recorded = _need(q, key, where)
            if recorded != value:
                path_, a, b = _first_diff(recorded, value, key)
                raise VerifyError(f"{q['file']}: header gives {path_} = {json.dumps(b)}, {where} says {json.dumps(a)}")
    audit.ok(f"GGUF headers match their receipts and the source ({src.get('architecture')}, {src.get('main_layers')} "
             f"main + {src.get('nextn_predict_layers')} NextN, {src.get('n_elements')} weights)")


# ----------------------------------------------------------------------------------------------- measurements

def _check_measurements(audit: _Audit, receipts: dict, quantize: dict) -> None:
    for tag, q in quantize.items():
        s = receipts.get(f"smoke-{tag}.json")
        if s is not None:
            _check_smoke(audit, tag, s, q)
        e = receipts.get(f"eval-{tag}.json")
        if e is not None:
            _check_eval(audit, tag, e, q)
        f = receipts.get(f"fit-{tag}.json")
        if f is not None:
            _check_fit(audit, tag, f, q)
    strays = [n for n in receipts if re.match(r"(smoke|eval|fit)-(.+)\.json$", n)
              and n.split("-", 1)[1][:-5] not in quantize]
    if strays:
        raise VerifyError(f"receipts/{strays[0]}: measures a variant this run has no quantize receipt for",
                          "remove the stale receipt")


def _check_smoke(audit: _Audit, tag: str, s: dict, q: dict) -> None:
    where = f"receipts/smoke-{tag}.json"
    model = _need(s, "model", where)
    if model.get("sha256") != q["sha256"] or model.get("file") != q["file"]:
        raise VerifyError(f"{where}: measured {model.get('file')} with sha256 {model.get('sha256')}, but {q['file']} "
                          f"is {q['sha256']}", "the measurement is stale; rerun `mtpquant smoke` on the run")

    settings = _need(s, "settings", where)
    results = _need(s, "results", where)
    derived = _jsonable(smoke.summarize(_need(s, "runs", where), settings["draft_n_max"], settings["seeds"],
                                        list(results)))
    path_, a, b = _first_diff(_shown_smoke(results), _shown_smoke(derived), "results")
    if path_ is not None:
        raise VerifyError(f"{where}: {path_} is {json.dumps(a)}, its own runs give {json.dumps(b)}",
                          "the receipt was edited or written by another version of mtpquant.smoke")
    best = derived["chat"]["best_k"] if "chat" in derived else None
    if s.get("best_k") != best:
        raise VerifyError(f"{where}: best_k is {s.get('best_k')}, its own runs give {best}")
    if best is not None:
        head = _need(s, "headline", where)
        g = derived["chat"]["k"][str(best)]["overall"]
        for key in SMOKE_SHOWN:
            if head.get(key) != g[key]:
                raise VerifyError(f"{where}: headline.{key} is {json.dumps(head.get(key))}, its own runs give "
                                  f"{json.dumps(g[key])}")
    audit.ok(f"smoke {tag}: measured this artifact; every figure re-derives from its {len(s['runs'])} recorded "
             f"responses")


SMOKE_SHOWN = ("units", "acceptance", "mean_accepted_length", "tok_s", "speedup", "differs_from_vanilla")


def _shown_smoke(results: dict) -> dict:
    """The smoke figures the card shows, per mode, k and group (other fields may change with mtpquant.smoke)."""
    out = {}
    for mode, m in results.items():
        out[mode] = {"best_k": m.get("best_k"), "vanilla": (m.get("vanilla") or {}).get("overall"), "k": {
            k: {group: ({name: {f: g.get(f) for f in SMOKE_SHOWN} for name, g in per.items()} if group != "overall"
                        else {f: per.get(f) for f in SMOKE_SHOWN})
                for group, per in kv.items()}
            for k, kv in (m.get("k") or {}).items()}}
    return out


def _check_eval(audit: _Audit, tag: str, e: dict, q: dict) -> None:
    where = f"receipts/eval-{tag}.json"
    if e.get("variant_sha256") != q["sha256"] or e.get("file") != q["file"]:
        raise VerifyError(f"{where}: evaluated {e.get('file')} with sha256 {e.get('variant_sha256')}, but "
                          f"{q['file']} is {q['sha256']}", "the evaluation is stale; rerun `mtpquant eval`")
    log = audit.run.logs / f"eval-{tag}.log"
    if not log.is_file() or e.get("runs", 1) != 1:
        audit.note(f"eval {tag}: figures taken as recorded (no single-run log to re-read)")
        audit.ok(f"eval {tag}: evaluated this artifact")
        return

    try:
        parsed = ev.parse_kld_output(log.read_text(encoding="utf-8", errors="replace"), log)
    except MtpquantError as exc:
        raise VerifyError(f"logs/eval-{tag}.log: {exc.message}") from None
    for key, value in parsed.items():
        if key in e and e[key] != value:
            raise VerifyError(f"{where}: {key} is {e[key]}, logs/eval-{tag}.log gives {value}")
    audit.ok(f"eval {tag}: evaluated this artifact; figures re-read from logs/eval-{tag}.log")


def _check_fit(audit: _Audit, tag: str, f: dict, q: dict) -> None:
    where = f"receipts/fit-{tag}.json"
    if f.get("file") != q["file"] or f.get("file_bytes") != q["bytes"]:
        raise VerifyError(f"{where}: estimated {f.get('file')} of {f.get('file_bytes')} bytes, but {q['file']} has "
                          f"{q['bytes']}", "the estimate is stale; rerun `mtpquant fit`")

    rows = _need(f, "rows", where)
    st = _need(f, "settings", where)
    settings = fitmod.ServerSettings(parallel=st["parallel"], draft_n_max=st["draft_n_max"], n_ubatch=st["n_ubatch"],
                                     reserve_mib=st["reserve_mib"])
    table = fitmod.fit_table(read_model(audit.local[q["file"]]),
                             vram_gb=list(dict.fromkeys(r["vram_gb"] for r in rows)),
                             ctx=list(dict.fromkeys(r["ctx"] for r in rows)),
                             kv_types=list(dict.fromkeys(r["kv_type"] for r in rows)), mtp=f.get("mtp", True),
                             settings=settings)
    shown = (lambda t: {"mtp": t.get("mtp"), "weights_total_mib": (t.get("weights") or {}).get("total_mib"),
                        "needs": [{k: n.get(k) for k in ("ctx", "kv_type", "total_mib")} for n in t.get("needs", [])],
                        "rows": [{k: r.get(k) for k in ("vram_gb", "ctx", "kv_type", "fit", "n_cpu_moe")}
                                 for r in t.get("rows", [])]})
    path_, a, b = _first_diff(shown(f), shown(_jsonable(table)), "fit")
    if path_ is not None:
        raise VerifyError(f"{where}: {path_.removeprefix('fit.')} is {json.dumps(a)}, the artifact's header gives "
                          f"{json.dumps(b)}", "the receipt was edited or written by another version of mtpquant.fit")
    audit.ok(f"fit {tag}: the estimate re-derives from the artifact's header")


# ----------------------------------------------------------------------------------------------- the card

def _check_card(audit: _Audit, receipts: dict, src: dict, quantize: dict) -> None:
    run = audit.run
    readme = run.root / cardmod.CARD_FILE
    if not readme.is_file():
        raise VerifyError(f"{cardmod.CARD_FILE}: missing", "run `mtpquant card RUN_DIR`")
    text = readme.read_text(encoding="utf-8")
    card_in = receipts.get(f"{cardmod.CARD_STEP}.json")
    if card_in is not None:
        _check_card_gguf_text(audit, card_in, quantize)
    try:
        ctx = cardmod.card_context(run)
        expected = cardmod.render_card(run)
    except CardError as exc:
        raise VerifyError(f"{cardmod.CARD_FILE}: cannot be re-rendered from the receipts: {exc.message}",
                          exc.hint) from None
    meta = _front_matter(text)
    if meta.get("base_model") != ctx["base_model"]:
        want = ctx["base_model"] or "no base_model"
        raise VerifyError(f"{cardmod.CARD_FILE}: base_model is {meta.get('base_model') or 'absent'}, receipts/source.json "
                          f"gives {want} ({src.get('kind')} source, {src.get('architecture')}, "
                          f"{src.get('main_layers')} main + {src.get('nextn_predict_layers')} NextN layers)",
                          "regenerate the card with `mtpquant card RUN_DIR`")
    listed = dict(re.findall(r"^\| `receipts/([^`|]+\.json)` \|.*\| `([0-9a-f]{64})` \|$", text, re.MULTILINE))
    actual = cardmod.receipt_sha256s(run)
    for name, sha in actual.items():
        if name not in listed:
            raise VerifyError(f"{cardmod.CARD_FILE}: does not list receipts/{name}",
                              "the card is older than the receipt; run `mtpquant card RUN_DIR`")
        if listed[name] != sha:
            raise VerifyError(f"receipts/{name}: sha256 is {sha}, {cardmod.CARD_FILE} lists {listed[name]}",
                              "the receipt changed after the card was written; run `mtpquant card RUN_DIR`")
    for name in listed:
        if name not in actual:
            raise VerifyError(f"{cardmod.CARD_FILE}: lists receipts/{name}, which is missing")
    if text != expected:
        raise VerifyError(_card_difference(text, expected), "regenerate it with `mtpquant card RUN_DIR`")
    audit.ok(f"{cardmod.CARD_FILE}: identical to a fresh rendering from {len(actual)} receipt(s)")


def _check_card_gguf_text(audit: _Audit, card_in: dict, quantize: dict) -> None:
    gg = card_in.get("gguf") or {}
    want = gg.get("chat_template_sha256")
    for q in quantize.values():
        got = cardmod.gguf_text(audit.local[q["file"]])
        if got["chat_template_sha256"] != want:
            raise VerifyError(f"{q['file']}: tokenizer.chat_template sha256 is {got['chat_template_sha256']}, "
                              f"receipts/card.json records {want}", "run `mtpquant card RUN_DIR`")


def _front_matter(text: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
    if not m:
        raise VerifyError(f"{cardmod.CARD_FILE}: no YAML front matter", "run `mtpquant card RUN_DIR`")
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as exc:
        raise VerifyError(f"{cardmod.CARD_FILE}: front matter is not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise VerifyError(f"{cardmod.CARD_FILE}: front matter is not a mapping")
    return data


_TOKEN_RE = re.compile(r"`[^`]*`|[^\s|]+")


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
            return f"{cardmod.CARD_FILE} ends at line {i} ({section}); the receipts give more: {b[:120]!r}"
        if b is None:
            return f"{cardmod.CARD_FILE} line {i + 1} ({section}): {a[:120]!r} is not in a rendering from the receipts"
        ta, tb = _TOKEN_RE.findall(a), _TOKEN_RE.findall(b)
        j = next((j for j in range(max(len(ta), len(tb))) if (ta[j] if j < len(ta) else None)
                  != (tb[j] if j < len(tb) else None)), None)
        if j is not None:
            shown = ta[j] if j < len(ta) else "(nothing)"
            given = tb[j] if j < len(tb) else "(nothing)"
            return f"{cardmod.CARD_FILE} line {i + 1} ({section}): shows {shown!r}, the receipts give {given!r}"
        return f"{cardmod.CARD_FILE} line {i + 1} ({section}): spacing differs from a rendering from the receipts"
    return f"{cardmod.CARD_FILE}: differs from a rendering from the receipts (line endings)"


def _first_diff(a, b, path: str = ""):
    """(path, a_value, b_value) of the first difference between two JSON values, or (None, None, None)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{path}.{k}", a.get(k), b.get(k)
            r = _first_diff(a[k], b[k], f"{path}.{k}")
            if r[0] is not None:
                return r
        return None, None, None
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            r = _first_diff(x, y, f"{path}[{i}]")
            if r[0] is not None:
                return r
        if len(a) != len(b):
            return f"{path} length", len(a), len(b)
        return None, None, None
    if a != b or type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        return path, a, b
    return None, None, None


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------------------------- rebuild

def rebuild_run(run: RunDir, tc, source: Path | None = None, progress: ProgressFn = no_progress,
                receipts: dict | None = None, workdir: Path | None = None) -> list[RebuildResult]:
    """Quantize every variant again from its receipt into a temporary folder and compare the bytes.

    Raises VerifyError naming every variant whose bytes differ (after all were tried).
    """
    receipts = receipts if receipts is not None else _load(run)
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
            results.append(_rebuild_one(run, tc, tag, q, receipts, source_path, Path(tmp) / tag))
        progress("rebuild", len(quantize), len(quantize))
    bad = [r for r in results if not r.bit_exact]
    if bad:
        why = "; ".join(f"{r.file}: rebuilt sha256 {r.sha256}, first difference {r.first_difference}"
                        + ("" if r.same_toolchain else " (this toolchain is not the recorded one)") for r in bad)
        raise VerifyError(f"rebuild differs: {why}",
                          "with the recorded toolchain the bytes should be identical; check the toolchain and source")
    return results


def _find_source(run: RunDir, src: dict, quantize: list[dict], explicit: Path | None) -> Path:
    """The recorded source GGUF (first shard), checked against receipts/source.json by sha256."""
    name = src.get("file")
    files: dict = src.get("files") or {}
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(Path(explicit))
    if name:
        candidates += [run.root / "source" / name, run.root / name]
        if src.get("path"):
            candidates.append(Path(src["path"]))
        if src.get("local_dir"):
            candidates.append(Path(src["local_dir"]) / name)
        for q in quantize:
            candidates += [Path(a) for a in q.get("command", []) if Path(str(a)).name == name and Path(a).is_absolute()]
    cache = src.get("hash_cache") or {}
    for c in candidates:
        if not c.is_file():
            continue
        shards = [c.with_name(n) for n in files] if files else [c]
        if not all(p.is_file() for p in shards):
            continue
        got = {p.name: _cached_sha(p, cache) for p in shards}
        if got == files or (not files and next(iter(got.values())) == src.get("sha256")):
            return c.resolve()
        if explicit is not None and c == Path(explicit):
            raise VerifyError(f"{c}: sha256 {got} does not match receipts/source.json ({files})",
                              "give the source the run was built from")
    raise VerifyError(f"source {name}: not found (looked in {', '.join(sorted({str(c) for c in candidates})) or '-'})",
                      "pass the BF16 source with --source FILE")


def _cached_sha(p: Path, cache: dict) -> str:
    st = p.stat()
    key = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return cache.get(key) or sha256_file(p)


def _rebuild_one(run: RunDir, tc, tag: str, q: dict, receipts: dict, source: Path, work: Path) -> RebuildResult:
    """llama-quantize with the recorded arguments, in a folder laid out like the run (same relative paths)."""

    where = f"receipts/quantize-{tag}.json"
    argv = [str(a) for a in _need(q, "command", where)]
    if len(argv) < 5 or Path(argv[0]).name != "llama-quantize" or argv[-2] != q["type"] or not argv[-1].isdigit():
        raise VerifyError(f"{where}: the recorded command is not `llama-quantize [options] SOURCE OUT TYPE THREADS`")
    options, out_name = argv[1:-4], argv[-3]
    # Lay the folder out so every recorded relative path resolves inside it: the imatrix path is written into the
    # GGUF (quantize.imatrix.file), so it must be given exactly as recorded, `../` and all.
    recorded = [v for o, v in itertools.pairwise(options) if o in ("--imatrix", "--tensor-type-file")]
    ups = max(_leading_ups(v) for v in [*recorded, out_name])
    cwd = work.joinpath(*(["cwd"] * ups))
    cwd.mkdir(parents=True)
    i = 0
    while i < len(options):
        opt = options[i]
        value = options[i + 1] if i + 1 < len(options) else None
        if opt == "--imatrix" and value is not None:
            im = Path(value) if Path(value).is_absolute() else run.root / value
            if not im.is_file():
                raise VerifyError(f"{where}: imatrix {value} (relative to the run directory) not found",
                                  "rebuild needs the imatrix the run used at the same relative path")
            if sha256_file(im) != q.get("imatrix_sha256"):
                raise VerifyError(f"{value}: sha256 differs from {where}'s imatrix_sha256 {q.get('imatrix_sha256')}")
            if not Path(value).is_absolute():
                _place(Path(os.path.normpath(cwd / value)), im.resolve())
            i += 2
        elif opt == "--tensor-type-file" and value is not None:
            # the receipt's overrides are the record; the file in work/ is only a copy of them
            target = Path(os.path.normpath(cwd / value))
            target.parent.mkdir(parents=True, exist_ok=True)
            overrides = _need(q, "overrides", where)
            target.write_text("\n".join(overrides) + ("\n" if overrides else ""), encoding="utf-8")
            i += 2
        else:
            i += 1
    same = quantize_key(q["source_sha256"], q["type"], q["overrides"], q.get("imatrix_sha256"),
                        toolchain_key(tc)) == q.get("input_key")
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
    return RebuildResult(tag, q["file"], sha == q["sha256"], sha, seconds, same, diff)


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
            ca, cb = fa.read(READ_CHUNK), fb.read(READ_CHUNK)
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
