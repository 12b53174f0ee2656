"""The one GGUF header reader: plain struct reads over an mmap (or a growing buffer of HTTP byte ranges).

gguf-py's reader decodes every vocabulary string into numpy views (about 20 s for a 248k-token vocabulary);
this one skips long arrays and never touches tensor data. Every value in a header is untrusted: lengths and
counts are checked against the bytes that exist before anything is allocated.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

from mtpquant.core.errors import GGUFReadError

VT = gguf.GGUFValueType
_SCALARS = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
            VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}
MAX_DECODED_STRINGS = 64
MAX_DECODED_NUMBERS = 4096
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 1 << 26  # a string value to decode (chat templates are kilobytes, embedded tokenizer.json MiBs)
MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses more
MAX_TENSOR_NAME = 63  # GGML_MAX_NAME is 64 with the terminating NUL: llama.cpp refuses longer names
MAX_COUNT = 10_000_000  # tensors, keys or array elements: far above any real model
MAX_DIM = (1 << 63) - 1  # llama.cpp reads dimensions as int64


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
    """A GGUF header: every key (long arrays as LongArray), the byte span of each value, every tensor's place."""

    path: Path
    fields: dict
    spans: dict  # key -> (start, end) of its type tag and value in the file
    tensors: tuple[RawTensor, ...]
    data_offset: int


def n_elements(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def type_bytes(shape: tuple[int, ...], ggml_type: str) -> int:
    """Bytes of a tensor of this shape stored as this ggml type."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    return n_elements(shape) // block * size


def ggml_type_name(tensor_type: int) -> str:
    """ggml's name of a tensor type number; ValueError for a number ggml does not define."""
    try:
        return gguf.GGMLQuantizationType(tensor_type).name
    except ValueError:
        raise ValueError(f"unknown tensor type {tensor_type}") from None


class Cursor:
    """Sequential reads of header fields from a buffer (an mmap, or a bytearray that `grow` extends)."""

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

    def string(self, limit: int | None = None) -> str:
        n = self.take("<Q")
        if n > (limit or MAX_STRING_BYTES):
            raise ValueError(f"a {n}-byte {'name' if limit else 'string'} at byte {self.pos - 8}")
        self.need(n)
        v = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return v

    def skip(self, n: int) -> None:
        self.need(n)
        self.pos += n

    def skip_strings(self, count: int) -> None:
        """Step over `count` length-prefixed strings (each at least 8 bytes: the bytes present bound the work)."""
        self.need(8 * count)  # a count the remaining bytes cannot hold fails here, before the loop
        buf, pos = self.buf, self.pos
        for _ in range(count):
            if pos + 8 > self.size:
                self.pos = pos
                self.need(8)
            n = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
            if pos + n > self.size:
                self.pos = pos
                self.need(n)
            pos += n
        self.pos = pos

    def value_type(self) -> VT:
        raw = self.take("<I")
        try:
            return VT(raw)
        except ValueError:
            raise ValueError(f"unknown metadata value type {raw} at byte {self.pos - 4}") from None

    def value(self, vtype: VT):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == VT.STRING:
            return self.string()
        etype, count = self.value_type(), self.take("<Q")
        if count > MAX_COUNT:
            raise ValueError(f"an array of {count} elements at byte {self.pos - 12}")
        if etype == VT.STRING:
            if count > MAX_DECODED_STRINGS:
                self.skip_strings(count)
                return LongArray(int(etype), count)
            return [self.string() for _ in range(count)]
        if etype not in _SCALARS:
            raise ValueError(f"unsupported array element type {etype.name}")
        width = struct.calcsize(_SCALARS[etype])
        self.need(width * count)
        if count > MAX_DECODED_NUMBERS:
            self.skip(width * count)
            return LongArray(int(etype), count)
        return [self.take(_SCALARS[etype]) for _ in range(count)]


def iter_metadata(c: Cursor):
    """n_tensors, then each (key, value, (start, end)) from the start of a header; stop whenever you have enough."""
    if c.take("<4s") != b"GGUF":
        raise ValueError("not a GGUF file")
    version = c.take("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = c.take("<Q"), c.take("<Q")
    if n_tensors > MAX_COUNT or n_kv > MAX_COUNT:
        raise ValueError(f"implausible tensor or key count ({n_tensors} tensors, {n_kv} keys)")
    yield n_tensors
    for i in range(n_kv):
        key = c.string(MAX_KEY_BYTES)
        if not key:
            raise ValueError(f"metadata key {i} is empty")
        start = c.pos
        value = c.value(c.value_type())
        yield key, value, (start, c.pos)


def read_header(path: Path) -> Header:
    """Parse a GGUF header; damaged, truncated or hostile files give one GGUFReadError."""
    path = Path(path)
    if not path.exists():
        raise GGUFReadError(f"{path}: no such file", "check the path")
    if not path.is_file():
        raise GGUFReadError(f"{path}: not a regular file", "give a .gguf file")
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise GGUFReadError(f"{path}: cannot open ({exc.strerror or exc})") from None
    with f:
        magic = f.read(4)
        if magic != b"GGUF":
            shown = magic.decode("latin-1") if magic else "empty file"
            raise GGUFReadError(f"{path}: not a GGUF file (starts with {shown!r}, expected 'GGUF')",
                                "give a .gguf model file")
        size = path.stat().st_size
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return parse(path, Cursor(buf, size), size)
            except (EOFError, ValueError, KeyError, struct.error, OverflowError) as exc:
                raise GGUFReadError(f"{path}: truncated or corrupt GGUF ({exc})",
                                    "download or regenerate the file") from None


def parse(path: Path, c: Cursor, size: int | None = None) -> Header:
    """Fields and tensor infos from a cursor at the start of a header; tensor extents checked against `size`."""
    items = iter_metadata(c)
    n_tensors = next(items)
    fields, spans = {}, {}
    for key, value, span in items:
        if key in fields:
            raise ValueError(f"metadata key {key!r} appears twice")
        fields[key], spans[key] = value, span
    infos, names = [], set()
    for i in range(n_tensors):
        name = c.string(MAX_KEY_BYTES)
        if not name or len(name.encode()) > MAX_TENSOR_NAME:
            raise ValueError(f"tensor {i} has a name of {len(name.encode())} bytes (llama.cpp takes 1 to "
                             f"{MAX_TENSOR_NAME})")
        if name in names:
            raise ValueError(f"tensor name {name!r} appears twice")
        names.add(name)
        n_dims = c.take("<I")
        if n_dims > MAX_DIMS:
            raise ValueError(f"tensor {name} has {n_dims} dimensions, llama.cpp takes at most {MAX_DIMS}")
        shape = tuple(c.take("<Q") for _ in range(n_dims))
        if any(d > MAX_DIM for d in shape) or n_elements(shape) > MAX_DIM:
            raise ValueError(f"tensor {name} has shape {list(shape)}, more elements than llama.cpp can count")
        infos.append((name, shape, c.take("<I"), c.take("<Q")))
    align = fields.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or not 1 <= align <= 1 << 20 or align & (align - 1):
        raise ValueError(f"general.alignment is {_shown(align)}, not a power of 2")
    data_offset = (c.pos + align - 1) // align * align
    tensors, expected = [], 0
    for name, shape, ttype, offset in infos:
        nbytes = _tensor_bytes(name, shape, ttype)
        if offset != expected:  # llama.cpp's own rule: in order, each at the padded end of the one before
            raise ValueError(f"tensor {name} has data offset {offset}, expected {expected}")
        expected += (nbytes + align - 1) // align * align
        start = data_offset + offset
        if size is not None and start + nbytes > size:
            raise EOFError(f"tensor {name} ends at byte {start + nbytes}, file has {size}")
        tensors.append(RawTensor(name, ttype, shape, n_elements(shape), nbytes, start))
    return Header(path, fields, spans, tuple(tensors), data_offset)


def _tensor_bytes(name: str, shape: tuple[int, ...], ttype: int) -> int:
    type_name = ggml_type_name(ttype)
    try:
        block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    except KeyError:
        raise ValueError(f"tensor {name} has type {type_name}, which has no known size") from None
    if shape and shape[0] % block:
        raise ValueError(f"tensor {name}: rows of {shape[0]} elements are not a multiple of the {type_name} block "
                         f"size {block}")
    return type_bytes(shape, type_name)


def field_value(header: Header, key: str):
    """A metadata value as a Python value (str, int, float, bool, list) or None if absent or too long to decode."""
    value = header.fields.get(key)
    return None if isinstance(value, LongArray) else value


def field_int(header: Header | dict, key: str, default: int | None = None, lo: int = 0,
              hi: int = 1 << 40, where: str | Path | None = None) -> int | None:
    """An integer key, refused in one line when it has another type or a value no model can have; `where` names
    the file when `header` is a plain dict of fields."""
    fields = header.fields if isinstance(header, Header) else header
    value = fields.get(key)
    if value is None:
        return default
    if where is None:
        where = header.path if isinstance(header, Header) else "GGUF"
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "array" if isinstance(value, (list, LongArray)) else type(value).__name__
        raise GGUFReadError(f"{where}: {key} is {kind} {_shown(value)}, expected an integer",
                            "the file's metadata is damaged; regenerate it")
    if not lo <= value <= hi:
        raise GGUFReadError(f"{where}: {key} is {value}, outside {lo}..{hi}",
                            "the file's metadata is damaged; regenerate it")
    return value


def raw_fields(path: Path, skip_prefix: str = "split.") -> dict[str, bytes]:
    """Every metadata key with its value's raw bytes (type tag included), less keys under `skip_prefix`."""
    header = read_header(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return {k: bytes(buf[a:b]) for k, (a, b) in header.spans.items() if not k.startswith(skip_prefix)}


def _shown(value) -> str:
    text = repr(value) if not isinstance(value, LongArray) else f"array of {value.count}"
    return text if len(text) <= 40 else text[:37] + "..."
