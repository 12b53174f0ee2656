"""What the fit estimate needs from a model: sizes and hybrid layout from `<arch>.*` metadata, bytes per tensor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import GGUFReadError, UsageError
from mtpquant.modelfile.header import field_int, field_value, read_header
from mtpquant.modelfile.model import MAX_BLOCKS, ModelInfo

# Per-layer arrays ModelInfo.kv leaves out for being long (models of more than 64 blocks)
PER_LAYER_KEYS = ("attention.recurrent_layers", "attention.head_count_kv", "attention.head_count",
                  "feed_forward_length", "expert_feed_forward_length")
MAX_WIDTH = 1 << 24  # embedding, FFN, vocabulary and state sizes: far above any model
MAX_HEADS = 1 << 16  # heads and experts
# Every `<arch>.` integer the estimate reads, with the range a model can have: a header is untrusted, and a
# value of another type or far out of range is refused in one line before any arithmetic
INT_KEYS = {"block_count": MAX_BLOCKS, "nextn_predict_layers": MAX_BLOCKS, "embedding_length": MAX_WIDTH,
            "vocab_size": MAX_WIDTH, "attention.head_count": MAX_HEADS, "attention.head_count_kv": MAX_HEADS,
            "attention.key_length": MAX_WIDTH, "attention.value_length": MAX_WIDTH,
            "full_attention_interval": MAX_BLOCKS, "ssm.conv_kernel": MAX_WIDTH, "ssm.state_size": MAX_WIDTH,
            "ssm.group_count": MAX_HEADS, "ssm.inner_size": MAX_WIDTH, "expert_count": MAX_HEADS,
            "expert_used_count": MAX_HEADS, "feed_forward_length": MAX_WIDTH,
            "expert_feed_forward_length": MAX_WIDTH}
PER_LAYER_INTS = ("attention.head_count", "attention.head_count_kv", "feed_forward_length",
                  "expert_feed_forward_length")  # one integer, or one per block


@dataclass(frozen=True)
class Hparams:
    """What the estimate needs from the metadata, read by `<arch>.` prefix."""

    arch: str
    n_layer: int  # trunk layers
    nextn_blocks: tuple[int, ...]
    n_embd: int
    n_vocab: int
    q_width: int  # head_count * key_length
    n_head_kv: tuple[int, ...]  # per block (trunk and NextN)
    key_length: int
    value_length: int
    attention_layers: tuple[int, ...]  # trunk layers with a KV cache
    recurrent_layers: tuple[int, ...]  # trunk layers with recurrent state
    ssm_conv: int
    ssm_state: int
    ssm_group: int
    ssm_inner: int
    n_expert_used: int  # 1 for dense models
    ffn_width: int  # expert FFN width for MoE, else the dense FFN width

    def to_json(self) -> dict:
        return {"arch": self.arch, "n_layer": self.n_layer, "nextn_blocks": list(self.nextn_blocks),
                "n_embd": self.n_embd, "n_vocab": self.n_vocab, "attention_layers": len(self.attention_layers),
                "recurrent_layers": len(self.recurrent_layers), "n_expert_used": self.n_expert_used}


@dataclass(frozen=True)
class TensorSize:
    """A tensor's name, shape and stored bytes: all the estimate needs of it."""

    name: str
    shape: tuple[int, ...]
    bytes: int


def tensor_sizes(items) -> list[TensorSize]:
    """TensorSize of each (name, shape, type, bytes) tuple, or of each object with name, shape, n_bytes or bytes."""
    out = []
    for t in items:
        if isinstance(t, (tuple, list)):
            name, shape, _type, nbytes = t
        else:
            name, shape = t.name, t.shape
            nbytes = getattr(t, "n_bytes", None)
            if nbytes is None:
                nbytes = t.bytes
        out.append(TensorSize(str(name), tuple(int(x) for x in shape), int(nbytes)))
    return out


def model_kv(info: ModelInfo) -> dict:
    """info.kv plus per-layer arrays it leaves out for being long (models of more than 64 blocks), every value the
    estimate reads checked (GGUFReadError naming the file)."""
    kv = dict(info.kv)
    missing = [f"{info.arch}.{k}" for k in PER_LAYER_KEYS if f"{info.arch}.{k}" not in kv]
    if missing and info.paths and Path(info.paths[0]).is_file():
        reader = read_header(Path(info.paths[0]))
        for key in missing:
            value = field_value(reader, key)
            if value is not None:
                kv[key] = value
    check_kv(kv, info.arch, info.paths[0] if info.paths else None)
    return kv


def check_kv(kv: dict, arch: str, where: str | Path | None = None) -> None:
    """Every `<arch>.` value the estimate reads is an integer (or per-layer integers, or flags) in range."""
    where = where or f"{arch} metadata"
    for key, hi in INT_KEYS.items():
        full = f"{arch}.{key}"
        value = kv.get(full)
        if key in PER_LAYER_INTS and isinstance(value, (list, tuple)):
            _per_block_count(full, value, where)
            for i, v in enumerate(value):
                field_int({f"{full}[{i}]": v}, f"{full}[{i}]", None, 0, hi, where)
        else:
            field_int(kv, full, None, 0, hi, where)
    full = f"{arch}.attention.recurrent_layers"
    flags = kv.get(full)
    if flags is not None:
        if not isinstance(flags, (list, tuple)) or not all(isinstance(f, (bool, int)) and f in (0, 1) for f in flags):
            raise GGUFReadError(f"{where}: {full} is not an array of booleans",
                                "the file's metadata is damaged; regenerate it")
        _per_block_count(full, flags, where)


def _per_block_count(key: str, values, where) -> None:
    if len(values) > MAX_BLOCKS:
        raise GGUFReadError(f"{where}: {key} has {len(values)} entries, more than {MAX_BLOCKS} blocks",
                            "the file's metadata is damaged; regenerate it")


# ----------------------------------------------------------------------------------------------- metadata

def _get(kv: dict, arch: str, key: str, default=None):
    value = kv.get(f"{arch}.{key}")
    return default if value is None else value


def _per_layer(value, n: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * n
    if isinstance(value, (list, tuple)):
        vals = [int(v) for v in value] or [default]
        return tuple(vals[i] if i < len(vals) else vals[-1] for i in range(n))
    return (int(value),) * n


def _max_int(value, default: int = 0) -> int:
    if isinstance(value, (list, tuple)):
        return max((int(v) for v in value), default=default)
    return default if value is None else int(value)


def _recurrent_flags(kv: dict, arch: str, n_layer: int) -> list[bool]:
    """Per trunk layer: True for linear attention (recurrent state), False for full attention (KV cache)."""
    recurrent_flags = _get(kv, arch, "attention.recurrent_layers")
    interval = _get(kv, arch, "full_attention_interval")
    if isinstance(recurrent_flags, (list, tuple)) and recurrent_flags:
        return [bool(recurrent_flags[i]) if i < len(recurrent_flags) else False for i in range(n_layer)]
    if interval:
        return [(il + 1) % int(interval) != 0 for il in range(n_layer)]
    return [False] * n_layer  # not hybrid: every layer attends


def _n_vocab(kv: dict, arch: str, tensors: Sequence[TensorSize]) -> int:
    n_vocab = _get(kv, arch, "vocab_size")
    if n_vocab is None:
        by_name = {t.name: t for t in tensors}
        emb = by_name.get("token_embd.weight") or by_name.get("output.weight")
        n_vocab = emb.shape[1] if emb and len(emb.shape) > 1 else 0
    return int(n_vocab)


def _experts(kv: dict, arch: str, n_embd: int) -> tuple[int, int]:
    """(experts used per token, 1 for dense models; expert FFN width for MoE, else the dense FFN width)."""
    n_expert = int(_get(kv, arch, "expert_count", 0) or 0)
    used = int(_get(kv, arch, "expert_used_count", 0) or 0) if n_expert else 0
    ffn = _max_int(_get(kv, arch, "expert_feed_forward_length")) if n_expert else 0
    if not ffn:
        ffn = _max_int(_get(kv, arch, "feed_forward_length"), 4 * n_embd)
    return max(1, used), ffn


def read_hparams(arch: str, kv: dict, tensors: Sequence[TensorSize]) -> Hparams:
    """Sizes from `<arch>.*` keys; hybrid layout from recurrent_layers or full_attention_interval if present."""
    check_kv(kv, arch)
    block_count = int(_get(kv, arch, "block_count", 0))
    nextn = int(_get(kv, arch, "nextn_predict_layers", 0))
    n_layer = block_count - nextn
    if block_count <= 0 or n_layer <= 0:
        raise UsageError(f"{arch}: the GGUF has no usable {arch}.block_count", "is this a llama.cpp model file?")
    n_embd = int(_get(kv, arch, "embedding_length", 0))
    n_head = _max_int(_get(kv, arch, "attention.head_count"), 1)
    key_length = int(_get(kv, arch, "attention.key_length", n_embd // max(1, n_head)))
    flags = _recurrent_flags(kv, arch, n_layer)
    used, ffn = _experts(kv, arch, n_embd)
    return Hparams(
        arch=arch, n_layer=n_layer, nextn_blocks=tuple(range(n_layer, block_count)), n_embd=n_embd,
        n_vocab=_n_vocab(kv, arch, tensors), q_width=n_head * key_length,
        n_head_kv=_per_layer(_get(kv, arch, "attention.head_count_kv"), block_count, n_head), key_length=key_length,
        value_length=int(_get(kv, arch, "attention.value_length", key_length)),
        attention_layers=tuple(i for i, r in enumerate(flags) if not r),
        recurrent_layers=tuple(i for i, r in enumerate(flags) if r),
        ssm_conv=int(_get(kv, arch, "ssm.conv_kernel", 0) or 0),
        ssm_state=int(_get(kv, arch, "ssm.state_size", 0) or 0),
        ssm_group=int(_get(kv, arch, "ssm.group_count", 0) or 0),
        ssm_inner=int(_get(kv, arch, "ssm.inner_size", 0) or 0),
        n_expert_used=used, ffn_width=ffn)
