"""Read an output back, independently of the plan's code path, and compare it with the plan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

from mtpquant.core.errors import GGUFReadError, VerifyError
from mtpquant.modelfile.model import ModelInfo, read_model


@dataclass(frozen=True)
class Verified:
    info: ModelInfo
    checks: dict  # name -> True, for the receipt


def expected_file_type(variant_type: str) -> int:
    return int(gguf.LlamaFileType[f"MOSTLY_{variant_type}"])


def verify_output(path: Path, planned_types: dict[str, str], variant_type: str, source: ModelInfo,
                  planned_bytes: int) -> Verified:
    """Every tensor's type equals the plan; NextN block complete and kept; file type and size right."""
    try:
        info = read_model(path)
    except GGUFReadError as exc:  # the tool exited 0 and still left a short or damaged file
        raise VerifyError(f"{path.name}: not a whole GGUF: {exc.message.removeprefix(f'{path}: ')}",
                          "it was not kept; the tool exited 0 without finishing it, see its log") from None
    problems = []
    got = {t.name: t.type for t in info.tensors}
    missing = sorted(set(planned_types) - set(got))
    extra = sorted(set(got) - set(planned_types))
    if missing:
        problems.append(f"tensors missing: {', '.join(missing[:5])}")
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra[:5])}")
    wrong = [f"{n} is {got[n]}, planned {planned_types[n]}" for n in sorted(planned_types)
             if n in got and got[n] != planned_types[n]]
    if wrong:
        problems.append(f"{len(wrong)} tensor type(s) differ from the plan: " + "; ".join(wrong[:5]))
    if source.nextn.layers and info.nextn.layers != source.nextn.layers:
        problems.append(f"nextn_predict_layers is {info.nextn.layers}, the source has {source.nextn.layers}")
    if source.nextn.layers and not info.nextn.complete:
        problems.append(f"NextN block incomplete, missing {', '.join(info.nextn.missing[:5])}")
    want_ftype = expected_file_type(variant_type)
    if info.file_type != want_ftype:
        problems.append(f"general.file_type is {info.file_type} ({info.file_type_name}), expected {want_ftype} "
                        f"({variant_type})")
    if info.total_bytes != planned_bytes:
        problems.append(f"tensor data is {info.total_bytes} bytes, planned {planned_bytes}")
    if problems:
        raise VerifyError(f"{path.name}: " + "; ".join(problems), "the artifact was not kept")
    return Verified(info, {"tensor_types": True, "nextn_complete": bool(source.nextn.layers),
                           "nextn_predict_layers": info.nextn.layers, "file_type": True, "tensor_bytes": True})
