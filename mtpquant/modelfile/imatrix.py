"""An imatrix GGUF (llama-imatrix's output): datasets, chunks, and which weights have statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import GGUFReadError
from mtpquant.modelfile.header import field_int, field_value, read_header


@dataclass(frozen=True)
class ImatrixInfo:
    path: Path
    datasets: tuple[str, ...]
    chunk_count: int
    chunk_size: int
    n_layer_nextn: int | None
    entries: tuple[str, ...]  # weight names with statistics


def read_imatrix(path: Path) -> ImatrixInfo:
    """Header of an imatrix GGUF: datasets, chunks, and which weights have statistics."""
    path = Path(path)
    if path.is_file() and path.suffix == ".dat":
        raise GGUFReadError(f"{path}: legacy .dat imatrix files are not read",
                            "convert it: llama-imatrix --in-file FILE.dat -o FILE.gguf")
    reader = read_header(path)
    if field_value(reader, "general.type") != "imatrix":
        raise GGUFReadError(f"{path}: not an imatrix GGUF (general.type is not 'imatrix')",
                            "give the file written by llama-imatrix")
    entries = sorted(t.name.removesuffix(".in_sum2") for t in reader.tensors if t.name.endswith(".in_sum2"))
    datasets = field_value(reader, "imatrix.datasets") or []
    if isinstance(datasets, str):
        datasets = [datasets]
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise GGUFReadError(f"{path}: imatrix.datasets is not a list of strings",
                            "the file's metadata is damaged; regenerate it")
    nl = field_int(reader, "imatrix.n_layer_nextn", None, 0, 4096)
    return ImatrixInfo(path=path, datasets=tuple(datasets),
                       chunk_count=field_int(reader, "imatrix.chunk_count", 0, 0, 1 << 32),
                       chunk_size=field_int(reader, "imatrix.chunk_size", 0, 0, 1 << 32),
                       n_layer_nextn=nl, entries=tuple(entries))


def is_imatrix(path: Path) -> bool:
    reader = read_header(path)
    return field_value(reader, "general.type") == "imatrix"


