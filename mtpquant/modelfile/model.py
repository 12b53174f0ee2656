"""A model GGUF as mtpquant sees it: architecture, trunk and NextN blocks, tensors, file type (split models too)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import gguf

from mtpquant.core.errors import GGUFReadError
from mtpquant.core.files import SPLIT_RE
from mtpquant.modelfile.header import Header, LongArray, field_int, ggml_type_name, read_header

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
    return [TensorInfo(name=t.name, type=ggml_type_name(t.tensor_type), shape=t.shape,
                       n_elements=t.n_elements, n_bytes=t.n_bytes) for t in reader.tensors]


MAX_BLOCKS = 4096  # layers: far above any real model; a header claiming more is damaged or hostile


def read_model(path: Path) -> ModelInfo:
    """Header of a model GGUF (all shards when given the first), with its NextN block checked."""
    path = Path(path)
    paths = shard_paths(path)
    readers = [read_header(p) for p in paths]
    first = readers[0]
    kv = _small_kv(first)
    if kv.get("general.type") == "imatrix":
        raise GGUFReadError(f"{path}: this is an imatrix file, not a model", "give the model GGUF")
    arch = kv.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFReadError(f"{path}: GGUF has no general.architecture", "is this a llama.cpp model file?")
    tensors = [ti for r in readers for ti in _tensor_infos(r)]
    block_count = field_int(first, f"{arch}.block_count", 0, 0, MAX_BLOCKS)
    nextn_layers = field_int(first, f"{arch}.nextn_predict_layers", 0, 0, MAX_BLOCKS)
    if nextn_layers > block_count:
        raise GGUFReadError(f"{path}: {arch}.nextn_predict_layers is {nextn_layers}, more than "
                            f"{arch}.block_count {block_count}", "the file's metadata is damaged; regenerate it")
    n_layer = block_count - nextn_layers
    stray = next((t for t in tensors if t.block is not None and t.block >= block_count), None)
    if stray is not None:
        raise GGUFReadError(f"{path}: tensor {stray.name} is in block {stray.block}, but {arch}.block_count is "
                            f"{block_count}", "the file's metadata is damaged; regenerate it")
    ftype = field_int(first, "general.file_type", None, 0, 1 << 16)
    name = kv.get("general.name")
    return ModelInfo(paths=tuple(paths), arch=arch, name=name if isinstance(name, str) else None,
                     block_count=block_count, n_layer=n_layer, nextn=check_nextn(tensors, n_layer, nextn_layers),
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


