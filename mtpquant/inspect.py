"""Read GGUF headers (models, split models, imatrix files) without loading tensor data."""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

from mtpquant.errors import GGUFReadError

SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
NEXTN_REQUIRED = ("nextn.eh_proj.weight", "nextn.enorm.weight", "nextn.hnorm.weight", "nextn.shared_head_norm.weight")
NEXTN_OPTIONAL = ("nextn.embed_tokens.weight", "nextn.shared_head_head.weight")
BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # ggml type name as gguf-py spells it: F32, BF16, Q4_K, IQ3_XXS, ...
    shape: tuple[int, ...]  # ggml order (ne0 first)
    n_elements: int
    n_bytes: int

    @property
    def block(self) -> int | None:
        m = BLOCK_RE.match(self.name)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class NextnInfo:
    """The draft block(s): where they are and whether every tensor llama.cpp loads is there."""

    layers: int  # <arch>.nextn_predict_layers
    blocks: tuple[int, ...]  # block indices n_layer .. block_count-1
    missing: tuple[str, ...]  # full tensor names expected but absent
    present: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return self.layers > 0 and not self.missing


@dataclass(frozen=True)
class ModelInfo:
    paths: tuple[Path, ...]
    arch: str
    name: str | None
    block_count: int
    n_layer: int  # main (trunk) layers
    nextn: NextnInfo
    file_type: int | None
    file_type_name: str | None
    kv: dict  # scalar and short-array metadata, for receipts and checks
    tensors: tuple[TensorInfo, ...]

    @property
    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / max(1, self.n_elements)

    def tensor(self, name: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)


@dataclass(frozen=True)
class ImatrixInfo:
    path: Path
    datasets: tuple[str, ...]
    chunk_count: int
    chunk_size: int
    n_layer_nextn: int | None
    entries: tuple[str, ...]  # weight names with statistics


def file_type_name(ftype: int | None) -> str | None:
    """llama_ftype number -> 'Q4_K_M', 'BF16', 'F32', ..."""
    if ftype is None:
        return None
    try:
        name = gguf.LlamaFileType(ftype).name
    except ValueError:
        return f"unknown({ftype})"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def shard_paths(first: Path) -> list[Path]:
    """All shards of a split GGUF given its first shard (a single file gives itself)."""
    m = SPLIT_RE.match(first.name)
    if not m:
        return [first]
    if m.group("i") != "00001":
        raise GGUFReadError(f"{first}: this is shard {int(m.group('i'))} of a split GGUF",
                            f"give the first shard, {m.group('prefix')}-00001-of-{m.group('n')}.gguf")
    n = int(m.group("n"))
    paths = [first.with_name(f"{m.group('prefix')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise GGUFReadError(f"{first}: split GGUF is missing shard(s) {', '.join(missing)}",
                            "download every shard into the same folder")
    return paths


@dataclass(frozen=True)
class RawTensor:
    name: str
    tensor_type: int
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute, in the file


@dataclass(frozen=True)
class LongArray:
    """A metadata array too long to be worth decoding (vocabularies, merges): only its type and length."""

    type: int
    count: int


@dataclass(frozen=True)
class Header:
    """A GGUF header read directly: every key (long arrays as LongArray) and every tensor's place."""

    path: Path
    fields: dict
    tensors: tuple[RawTensor, ...]
    data_offset: int


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_DECODED_STRINGS = 64
MAX_DECODED_NUMBERS = 4096


def n_elements(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def type_bytes(shape: tuple[int, ...], ggml_type: str) -> int:
    """Bytes of a tensor of this shape stored as this ggml type."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    return n_elements(shape) // block * size


class Cursor:
    """Sequential reads of GGUF header fields from a buffer (an mmap, or a bytearray that `grow` extends, e.g. with
    HTTP byte ranges)."""

    def __init__(self, buf, size: int, grow=None):
        self.buf, self.pos, self.size, self.grow = buf, 0, size, grow

    def need(self, n: int) -> None:
        while self.pos + n > self.size:
            if self.grow is None or not self.grow(self.pos + n):
                raise EOFError(f"header ends early at byte {self.size}")

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        self.need(n)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self) -> str:
        n = self.take("<Q")
        self.need(n)
        v = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return v

    def skip(self, n: int) -> None:
        self.need(n)
        self.pos += n

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype == _STRING:
                if count > MAX_DECODED_STRINGS:
                    for _ in range(count):
                        self.skip(self.take("<Q"))
                    return LongArray(etype, count)
                return [self.string() for _ in range(count)]
            if etype not in _SCALARS:
                raise ValueError(f"unsupported array element type {etype}")
            width = struct.calcsize(_SCALARS[etype])
            if count > MAX_DECODED_NUMBERS:
                self.skip(width * count)
                return LongArray(etype, count)
            self.need(width * count)
            return [self.take(_SCALARS[etype]) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")


def iter_metadata(c: Cursor):
    """(n_tensors, then each (key, value)) from the start of a GGUF header; stop whenever you have enough."""
    if c.take("<4s") != b"GGUF":
        raise ValueError("not a GGUF file")
    version = c.take("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = c.take("<Q"), c.take("<Q")
    if n_tensors > 10_000_000 or n_kv > 10_000_000:
        raise ValueError("implausible tensor or key count")
    yield n_tensors
    for _ in range(n_kv):
        key = c.string()
        yield key, c.value(c.take("<I"))


def read_header(path: Path) -> Header:
    """Parse a GGUF header with plain struct reads over mmap (gguf-py's reader decodes every vocabulary string into
    numpy views, about 20 s for a 248k-token vocabulary); damaged files give one GGUFReadError."""
    path = Path(path)
    if not path.is_file():
        raise GGUFReadError(f"{path}: no such file", "check the path")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            shown = magic.decode("latin-1") if magic else "empty file"
            raise GGUFReadError(f"{path}: not a GGUF file (starts with {shown!r}, expected 'GGUF')",
                                "give a .gguf model file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse(path, buf, size)
            except (EOFError, ValueError, KeyError, struct.error) as exc:
                raise GGUFReadError(f"{path}: truncated or corrupt GGUF ({exc})",
                                    "download or regenerate the file") from None


def _parse(path: Path, buf, size: int) -> Header:
    c = Cursor(buf, size)
    items = iter_metadata(c)
    n_tensors = next(items)
    fields = dict(items)
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.take("<I")
        if n_dims > 8:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        shape = tuple(c.take("<Q") for _ in range(n_dims))
        infos.append((name, shape, c.take("<I"), c.take("<Q")))
    align = int(fields.get("general.alignment", 32) or 32)
    data_offset = (c.pos + align - 1) // align * align
    tensors = []
    for name, shape, ttype, offset in infos:
        n = n_elements(shape)
        nbytes = type_bytes(shape, gguf.GGMLQuantizationType(ttype).name)
        start = data_offset + offset
        if start + nbytes > size:
            raise EOFError(f"tensor {name} ends at byte {start + nbytes}, file has {size}")
        tensors.append(RawTensor(name, ttype, shape, n, nbytes, start))
    return Header(path, fields, tuple(tensors), data_offset)


def open_reader(path: Path) -> Header:
    """The header of a GGUF file (see read_header)."""
    return read_header(path)


def field_value(reader: Header, key: str):
    """A metadata value as a Python value (str, int, float, bool, list) or None if absent or too long to decode."""
    value = reader.fields.get(key)
    return None if isinstance(value, LongArray) else value


def _small_kv(reader: Header) -> dict:
    kv = {}
    for key, value in reader.fields.items():
        if isinstance(value, LongArray) or key.startswith("tokenizer.ggml.") and key not in (
                "tokenizer.ggml.model", "tokenizer.ggml.pre"):
            continue
        if isinstance(value, str) and len(value) > 4096:
            continue
        kv[key] = value
    return kv


def _tensor_infos(reader: Header) -> list[TensorInfo]:
    return [TensorInfo(name=t.name, type=gguf.GGMLQuantizationType(t.tensor_type).name, shape=t.shape,
                       n_elements=t.n_elements, n_bytes=t.n_bytes) for t in reader.tensors]


def read_model(path: Path) -> ModelInfo:
    """Header of a model GGUF (all shards when given the first), with its NextN block checked."""
    path = Path(path)
    paths = shard_paths(path)
    readers = [open_reader(p) for p in paths]
    first = readers[0]
    kv = _small_kv(first)
    if kv.get("general.type") == "imatrix":
        raise GGUFReadError(f"{path}: this is an imatrix file, not a model", "give the model GGUF")
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFReadError(f"{path}: GGUF has no general.architecture", "is this a llama.cpp model file?")
    tensors = [ti for r in readers for ti in _tensor_infos(r)]
    block_count = int(kv.get(f"{arch}.block_count") or 0)
    nextn_layers = int(kv.get(f"{arch}.nextn_predict_layers") or 0)
    n_layer = block_count - nextn_layers
    ftype = kv.get("general.file_type")
    return ModelInfo(paths=tuple(paths), arch=arch, name=kv.get("general.name"), block_count=block_count,
                     n_layer=n_layer, nextn=check_nextn(tensors, n_layer, nextn_layers),
                     file_type=ftype, file_type_name=file_type_name(ftype), kv=kv, tensors=tuple(tensors))


def check_nextn(tensors: list[TensorInfo] | tuple[TensorInfo, ...], n_layer: int, nextn_layers: int) -> NextnInfo:
    """Which NextN tensors exist and which are missing.

    The draft block must hold the nextn.* projections and norms plus the body of a full-attention trunk
    layer (same tensor kinds as the last trunk layer that has attn_k): no architecture is hard-coded.
    """
    by_block: dict[int, set[str]] = {}
    for t in tensors:
        if m := BLOCK_RE.match(t.name):
            by_block.setdefault(int(m.group(1)), set()).add(m.group(2))
    blocks = tuple(range(n_layer, n_layer + nextn_layers))
    if not nextn_layers:
        stray = sorted(t.name for t in tensors if ".nextn." in t.name)
        return NextnInfo(0, (), (), tuple(stray))
    body: set[str] = set()
    for i in range(n_layer - 1, -1, -1):
        suffixes = by_block.get(i, set())
        if any(s.startswith("attn_k") for s in suffixes):
            body = {s for s in suffixes if not s.startswith("nextn.")}
            break
    missing, present = [], []
    for b in blocks:
        have = by_block.get(b, set())
        for s in sorted(set(NEXTN_REQUIRED) | body):
            (present if s in have else missing).append(f"blk.{b}.{s}")
        present.extend(f"blk.{b}.{s}" for s in sorted(have - set(NEXTN_REQUIRED) - body))
    return NextnInfo(nextn_layers, blocks, tuple(missing), tuple(present))


def read_imatrix(path: Path) -> ImatrixInfo:
    """Header of an imatrix GGUF: datasets, chunks, and which weights have statistics."""
    path = Path(path)
    if path.is_file() and path.suffix == ".dat":
        raise GGUFReadError(f"{path}: legacy .dat imatrix files are not read",
                            "convert it: llama-imatrix --in-file FILE.dat -o FILE.gguf")
    reader = open_reader(path)
    if field_value(reader, "general.type") != "imatrix":
        raise GGUFReadError(f"{path}: not an imatrix GGUF (general.type is not 'imatrix')",
                            "give the file written by llama-imatrix")
    entries = sorted(t.name.removesuffix(".in_sum2") for t in reader.tensors if t.name.endswith(".in_sum2"))
    datasets = field_value(reader, "imatrix.datasets") or []
    if isinstance(datasets, str):
        datasets = [datasets]
    nl = field_value(reader, "imatrix.n_layer_nextn")
    return ImatrixInfo(path=path, datasets=tuple(datasets), chunk_count=int(field_value(reader, "imatrix.chunk_count") or 0),
                       chunk_size=int(field_value(reader, "imatrix.chunk_size") or 0),
                       n_layer_nextn=None if nl is None else int(nl), entries=tuple(entries))


def is_imatrix(path: Path) -> bool:
    reader = open_reader(path)
    return field_value(reader, "general.type") == "imatrix"


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
