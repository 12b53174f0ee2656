"""GGUF headers taken apart for the hostile-input tests, by a walker of their own (not mtpquant's reader, which is
what they test): where every count, length, type and offset lies, and files put back together with a value changed
(the data section moved to the new alignment)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf

VT = gguf.GGUFValueType
SCALAR_FMT = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
              VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}


@dataclass(frozen=True)
class Spot:
    """One integer field of a header: what it is, whose it is, and where it lies."""

    what: str  # n_tensors n_kv key_len value_type str_len array_type array_count n_dims dim tensor_type offset
    owner: str  # the key or tensor it belongs to ("" for the counts)
    offset: int
    fmt: str


@dataclass
class Parts:
    """A GGUF as its pieces: each key with its raw value (type tag included), each tensor info, the data."""

    version: int
    kv: dict[str, bytes]
    tensors: list[tuple[str, bytes]]  # name, raw info after the name (n_dims, dims, type, offset)
    data: bytes
    spots: list[Spot] = field(default_factory=list)


class _Walk:
    def __init__(self, raw: bytes):
        self.raw, self.pos, self.spots = raw, 0, []

    def take(self, fmt: str, what: str = "", owner: str = ""):
        if what:
            self.spots.append(Spot(what, owner, self.pos, fmt))
        v = struct.unpack_from(fmt, self.raw, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self, what: str, owner: str = "") -> str:
        n = self.take("<Q", what, owner)
        s = self.raw[self.pos:self.pos + n].decode()
        self.pos += n
        return s

    def value(self, vt: int, owner: str) -> None:
        if vt in SCALAR_FMT:
            self.take(SCALAR_FMT[VT(vt)])
        elif vt == VT.STRING:
            self.string("str_len", owner)
        else:
            et, n = self.take("<I", "array_type", owner), self.take("<Q", "array_count", owner)
            for _ in range(n):
                self.value(et, owner)


def parts(path: Path) -> Parts:
    """Take a well-formed GGUF apart."""
    raw = Path(path).read_bytes()
    w = _Walk(raw)
    assert w.take("<4s") == b"GGUF"
    version = w.take("<I")
    n_tensors, n_kv = w.take("<Q", "n_tensors"), w.take("<Q", "n_kv")
    kv = {}
    for _ in range(n_kv):
        key = w.string("key_len")
        start = w.pos
        w.value(w.take("<I", "value_type", key), key)
        kv[key] = raw[start:w.pos]
    tensors = []
    for _ in range(n_tensors):
        name = w.string("name_len", "")
        start = w.pos
        n_dims = w.take("<I", "n_dims", name)
        for _ in range(n_dims):
            w.take("<Q", "dim", name)
        w.take("<I", "tensor_type", name)
        w.take("<Q", "offset", name)
        tensors.append((name, raw[start:w.pos]))
    align = struct.unpack_from("<I", kv["general.alignment"], 4)[0] if "general.alignment" in kv else 32
    data_start = (w.pos + align - 1) // align * align
    return Parts(version, kv, tensors, raw[data_start:], w.spots)


def join(p: Parts, align: int = 32) -> bytes:
    """Put a GGUF together again (the alignment given is only for placing the data; the keys say what they say)."""
    out = bytearray(struct.pack("<4sIQQ", b"GGUF", p.version, len(p.tensors), len(p.kv)))
    for key, value in p.kv.items():
        out += struct.pack("<Q", len(key.encode())) + key.encode() + value
    for name, info in p.tensors:
        out += struct.pack("<Q", len(name.encode())) + name.encode() + info
    out += b"\0" * ((-len(out)) % align)
    return bytes(out + p.data)


def string_value(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<IQ", int(VT.STRING), len(b)) + b


def scalar_value(vt: VT, v) -> bytes:
    return struct.pack("<I", int(vt)) + struct.pack(SCALAR_FMT[vt], v)


def array_value(et: VT, values: list) -> bytes:
    body = b"".join(string_value(v)[4:] if et == VT.STRING else struct.pack(SCALAR_FMT[et], v) for v in values)
    return struct.pack("<IIQ", int(VT.ARRAY), int(et), len(values)) + body


def with_kv(src: Path, dst: Path, **values: bytes) -> Path:
    """A copy of `src` with the raw values (type tag included) of some keys replaced; dots in keys as '__'."""
    p = parts(src)
    for key, raw in values.items():
        p.kv[key.replace("__", ".")] = raw
    dst.write_bytes(join(p))
    return dst


def with_string(src: Path, dst: Path, key: str, value: str) -> Path:
    """A copy of `src` whose string key `key` holds `value`."""
    p = parts(src)
    p.kv[key] = string_value(value)
    dst.write_bytes(join(p))
    return dst


def poke(src: Path, dst: Path, spot: Spot, value: int) -> Path:
    """A copy of `src` with one integer field overwritten in place (masked to its width)."""
    raw = bytearray(Path(src).read_bytes())
    struct.pack_into(spot.fmt, raw, spot.offset, value & ((1 << (8 * struct.calcsize(spot.fmt))) - 1))
    dst.write_bytes(bytes(raw))
    return dst
