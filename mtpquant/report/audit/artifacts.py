"""The artifacts of a run: their bytes against SHA256SUMS (or a published copy's shards against publish.json), the
quantize receipts against both, and each GGUF header against its receipt and the source receipt."""

from __future__ import annotations

import json
from pathlib import Path

from mtpquant.core.errors import VerifyError
from mtpquant.core.files import sha256_file
from mtpquant.core.receipts import PublishReceipt
from mtpquant.modelfile.model import ModelInfo, read_model
from mtpquant.report.audit.state import Audit, first_diff, need

OUTSIDE_HINT = "only files of the run directory may leave the machine: put the file itself there, not a link"


def check_inside(root: Path, path: Path) -> None:
    """A listed file must be a file of the run directory: a symbolic link (of it or of a folder on its way) that
    leads out of the run directory is refused in one line."""
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    try:
        real = path.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # a loop of links
        raise VerifyError(f"{rel}: a symbolic link that does not resolve ({exc})", OUTSIDE_HINT) from None
    if not real.is_relative_to(root.resolve()):
        what = "a symbolic link to" if path.is_symlink() else "leads to"
        raise VerifyError(f"{rel}: {what} {real}, outside the run directory", OUTSIDE_HINT)


def check_sums(audit: Audit) -> dict[str, str]:
    """Every file SHA256SUMS lists, whole; or, in a published copy, its shards as receipts/publish.json lists them."""
    sums = audit.run.read_sha256sums()
    if not sums:
        raise VerifyError("SHA256SUMS: missing or empty", "the run is incomplete; rerun `mtpquant build`")
    _hash_all(audit, _files_to_hash(audit, sums))
    audit.ok(f"{len(sums)} file(s) match SHA256SUMS")
    if audit.split:
        audit.ok(f"{sum(len(e['shards']) for e in audit.split.values())} shard(s) of {len(audit.split)} split "
                 "file(s) match receipts/publish.json")
        audit.note("split files: the whole-file sha256 is checked through their shards' sha256s in "
                   "receipts/publish.json (each shard holds the whole file's metadata plus split.* keys and its tensor "
                   "bytes in order)")
    return sums


def _files_to_hash(audit: Audit, sums: dict[str, str]) -> list[tuple[Path, str, str]]:
    """(file, sha256 wanted, where that sha256 comes from) for each file here; notes where headers are read."""
    run = audit.run
    receipt = run.read(PublishReceipt)
    published = receipt.artifacts if receipt else {}
    todo: list[tuple[Path, str, str]] = []
    for name, want in sums.items():
        path = run.root / name
        entry = published.get(name) or {}
        shards = entry.get("shards") or []
        for p in [path, *(run.root / sh["path"] for sh in shards)]:
            check_inside(run.root, p)
        if path.is_file():
            todo.append((path, want, "SHA256SUMS"))
            audit.local[name] = path
        elif shards and all((run.root / sh["path"]).is_file() for sh in shards):
            if entry.get("sha256") != want:
                raise VerifyError(f"receipts/publish.json: {name} sha256 is {entry.get('sha256')}, SHA256SUMS says "
                                  f"{want}")
            todo += [(run.root / sh["path"], sh["sha256"], "receipts/publish.json") for sh in shards]
            audit.local[name] = run.root / shards[0]["path"]
            audit.split[name] = entry
        else:
            raise VerifyError(f"{name}: listed in SHA256SUMS but missing", "restore the file or rebuild the run")
    return todo


def _hash_all(audit: Audit, todo: list[tuple[Path, str, str]]) -> None:
    total = sum(p.stat().st_size for p, _, _ in todo)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        audit.progress("sha256", done, total)

    for path, want, source in todo:
        got = sha256_file(path, step)
        if got != want:
            raise VerifyError(f"{path.relative_to(audit.run.root).as_posix()}: sha256 is {got}, {source} says {want}",
                              "the file changed after it was built; restore it or rebuild the run")
    audit.progress("sha256", total, total)


def check_quantize_receipts(audit: Audit, sums: dict[str, str], receipts: dict, quantize: dict) -> None:
    """Each quantize receipt describes a listed file with its sha256 and size, made from the recorded source."""
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
        _check_quantize(audit, sums, src, im, tag, q)
    if im is not None and im.get("file") in sums and sums[im["file"]] != im.get("sha256"):
        raise VerifyError(f"{im['file']}: sha256 in SHA256SUMS is {sums[im['file']]}, receipts/imatrix.json says "
                          f"{im.get('sha256')}")
    audit.ok(f"{len(quantize)} quantize receipt(s) agree with SHA256SUMS, the source and the imatrix")


def _check_quantize(audit: Audit, sums: dict[str, str], src: dict, im: dict | None, tag: str, q: dict) -> None:
    where = f"receipts/quantize-{tag}.json"
    f = need(q, "file", where)
    if f not in sums:
        raise VerifyError(f"{where}: describes {f}, which SHA256SUMS does not list",
                          "a stale receipt of an earlier recipe? remove it, or rebuild the run")
    if need(q, "sha256", where) != sums[f]:
        raise VerifyError(f"{f}: sha256 in SHA256SUMS is {sums[f]}, {where} says {q['sha256']}")
    size = audit.split[f].get("size") if f in audit.split else (audit.run.root / f).stat().st_size
    if need(q, "bytes", where) != size:
        raise VerifyError(f"{f}: {size} bytes, {where} says {q['bytes']}")
    if need(q, "source_sha256", where) != need(src, "sha256", "receipts/source.json"):
        raise VerifyError(f"{where}: made from source sha256 {q['source_sha256']}, receipts/source.json "
                          f"records {src['sha256']}", "the source changed after this variant was built")
    if im is not None and q.get("imatrix_sha256") not in (None, im.get("sha256")):
        raise VerifyError(f"{where}: used imatrix sha256 {q['imatrix_sha256']}, receipts/imatrix.json records "
                          f"{im.get('sha256')}", "rebuild the run")


def check_headers(audit: Audit, src: dict, quantize: dict) -> None:
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
        for key, value in _derived(info).items():
            recorded = need(q, key, where)
            if recorded != value:
                path_, a, b = first_diff(recorded, value, key)
                raise VerifyError(f"{q['file']}: header gives {path_} = {json.dumps(b)}, {where} says {json.dumps(a)}")
    audit.ok(f"GGUF headers match their receipts and the source ({src.get('architecture')}, {src.get('main_layers')} "
             f"main + {src.get('nextn_predict_layers')} NextN, {src.get('n_elements')} weights)")


def _derived(info: ModelInfo) -> dict:
    """What a quantize receipt records that the header gives again."""
    nextn_types = {t.name: t.type for t in info.tensors if t.block in info.nextn.blocks}
    counts: dict[str, int] = {}
    for t in info.tensors:
        counts[t.type] = counts.get(t.type, 0) + 1
    return {"nextn_types": nextn_types, "type_counts": dict(sorted(counts.items())), "file_type": info.file_type,
            "tensor_bytes": info.total_bytes, "bits_per_weight": round(info.bits_per_weight, 4),
            "nextn_blocks": list(info.nextn.blocks)}
