"""JSON-able summaries of model and imatrix files, for `mtpquant inspect` and receipts."""

from __future__ import annotations

from mtpquant.modelfile.imatrix import ImatrixInfo
from mtpquant.modelfile.model import BLOCK_RE, ModelInfo


def model_summary(info: ModelInfo, with_tensors: bool = True) -> dict:
    """A JSON-able summary for `inspect --json` and receipts."""
    out = {
        "kind": "model",
        "paths": [str(p) for p in info.paths],
        "architecture": info.arch,
        "name": info.name,
        "block_count": info.block_count,
        "main_layers": info.n_layer,
        "nextn_predict_layers": info.nextn.layers,
        "nextn_blocks": list(info.nextn.blocks),
        "nextn_complete": info.nextn.complete,
        "nextn_missing": list(info.nextn.missing),
        "file_type": info.file_type,
        "file_type_name": info.file_type_name,
        "n_tensors": len(info.tensors),
        "n_elements": info.n_elements,
        "bytes": info.total_bytes,
        "bits_per_weight": round(info.bits_per_weight, 4),
        "quantize_imatrix": {k.removeprefix("quantize.imatrix."): v for k, v in info.kv.items()
                             if k.startswith("quantize.imatrix.")},
        "type_counts": _type_counts(info.tensors),
    }
    if with_tensors:
        out["tensors"] = [{"name": t.name, "type": t.type, "shape": list(t.shape), "bytes": t.n_bytes}
                          for t in info.tensors]
    return out


def imatrix_summary(info: ImatrixInfo, nextn_blocks: tuple[int, ...] | None = None) -> dict:
    blocks = sorted({int(m.group(1)) for e in info.entries if (m := BLOCK_RE.match(e))})
    nextn_entries = [e for e in info.entries if nextn_blocks and BLOCK_RE.match(e)
                     and int(BLOCK_RE.match(e).group(1)) in nextn_blocks]
    return {
        "kind": "imatrix",
        "path": str(info.path),
        "datasets": list(info.datasets),
        "chunk_count": info.chunk_count,
        "chunk_size": info.chunk_size,
        "n_layer_nextn": info.n_layer_nextn,
        "entries": len(info.entries),
        "blocks_covered": blocks,
        "nextn_collected": bool(info.n_layer_nextn),
        "nextn_entries": nextn_entries if nextn_blocks else None,
        "entry_names": list(info.entries),
    }


def _type_counts(tensors) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.type] = counts.get(t.type, 0) + 1
    return dict(sorted(counts.items()))
