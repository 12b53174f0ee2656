"""The tensor plan of a synthetic model (GGUF names and shapes; numpy shapes are ggml's ne reversed) and each
tensor's values as bf16 bit patterns."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import gguf
import numpy as np

from mtpquant.synth.designed import Design, design, designed_rows
from mtpquant.synth.spec import SynthSpec
from mtpquant.synth.values import BF16_MINUS_ONE, BF16_ONE, bf16_bits, random_bits, rng

_NORM_STD = 0.05
_CHUNK_ELEMS = 1 << 24  # part of the recipe: values depend on how draws are split into chunks

M = gguf.MODEL_TENSOR


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor of the plan: name, shape, storage and how its values are made."""

    name: str
    shape: tuple[int, ...]
    f32: bool  # stored as F32 even in a BF16 file (what the converter does)
    role: str  # how values are made, see tensor_bits
    bid: int | None = None


def tensor_name(t: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = ".weight") -> str:
    """The GGUF name of tensor kind `t` in block `bid`."""
    return gguf.TENSOR_NAMES[t].format(bid=bid) + suffix


def _t(il: int, kind: gguf.MODEL_TENSOR, shape, f32=False, role="weight", suffix=".weight") -> PlannedTensor:
    return PlannedTensor(tensor_name(kind, il, suffix), tuple(shape), f32, role, il)


def tensor_plan(s: SynthSpec) -> list[PlannedTensor]:
    """Every tensor of the model, in file order."""
    H, V = s.hidden_size, s.n_vocab
    out = [PlannedTensor(tensor_name(M.TOKEN_EMBD), (V, H), False, "embd")]
    for il in range(s.block_count):
        out += [_t(il, M.ATTN_NORM, (H,), True, "norm"), _t(il, M.ATTN_POST_NORM, (H,), True, "norm")]
        out += _linear_attention(s, il) if s.is_recurrent(il) else _attention(s, il)
        out += _moe_ffn(s, il) if s.is_moe else _dense_ffn(s, il)
        if il >= s.n_layer:
            out += _nextn(s, il)
    out.append(PlannedTensor(tensor_name(M.OUTPUT_NORM), (H,), True, "norm"))
    out.append(PlannedTensor(tensor_name(M.OUTPUT), (V, H), False, "output"))
    return out


def _linear_attention(s: SynthSpec, il: int) -> list[PlannedTensor]:
    H = s.hidden_size
    kd = s.linear_key_heads * s.linear_key_head_dim
    vd = s.linear_value_heads * s.linear_value_head_dim
    nv = s.linear_value_heads
    return [
        _t(il, M.ATTN_QKV, (2 * kd + vd, H)),
        _t(il, M.ATTN_GATE, (vd, H)),
        _t(il, M.SSM_CONV1D, (2 * kd + vd, s.conv_kernel), True),
        _t(il, M.SSM_DT, (nv,), True, "dt_bias", ".bias"),
        _t(il, M.SSM_A, (nv,), True, "ssm_a", ""),
        _t(il, M.SSM_BETA, (nv, H)),
        _t(il, M.SSM_ALPHA, (nv, H)),
        _t(il, M.SSM_NORM, (s.linear_value_head_dim,), True, "norm"),
        _t(il, M.SSM_OUT, (H, vd), role="residual"),
    ]


def _attention(s: SynthSpec, il: int) -> list[PlannedTensor]:
    H = s.hidden_size
    qd, kvd = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    return [
        _t(il, M.ATTN_Q, (2 * qd, H)),
        _t(il, M.ATTN_K, (kvd, H)),
        _t(il, M.ATTN_V, (kvd, H)),
        _t(il, M.ATTN_OUT, (H, qd), role="residual"),
        _t(il, M.ATTN_Q_NORM, (s.head_dim,), True, "norm"),
        _t(il, M.ATTN_K_NORM, (s.head_dim,), True, "norm"),
    ]


def _moe_ffn(s: SynthSpec, il: int) -> list[PlannedTensor]:
    H, E, eff, sff = s.hidden_size, s.n_expert, s.expert_ff, s.shared_expert_ff
    return [
        _t(il, M.FFN_GATE_INP, (E, H), True),
        _t(il, M.FFN_GATE_EXP, (E, eff, H)),
        _t(il, M.FFN_UP_EXP, (E, eff, H)),
        _t(il, M.FFN_DOWN_EXP, (E, H, eff), role="residual"),
        _t(il, M.FFN_GATE_INP_SHEXP, (1, H), True),  # 2-D {H, 1}, as the converter writes it
        _t(il, M.FFN_GATE_SHEXP, (sff, H)),
        _t(il, M.FFN_UP_SHEXP, (sff, H)),
        _t(il, M.FFN_DOWN_SHEXP, (H, sff), role="residual"),
    ]


def _dense_ffn(s: SynthSpec, il: int) -> list[PlannedTensor]:
    H = s.hidden_size
    return [
        _t(il, M.FFN_GATE, (s.ff, H)),
        _t(il, M.FFN_UP, (s.ff, H)),
        _t(il, M.FFN_DOWN, (H, s.ff), role="residual"),
    ]


def _nextn(s: SynthSpec, il: int) -> list[PlannedTensor]:
    H = s.hidden_size
    return [
        _t(il, M.NEXTN_EH_PROJ, (H, 2 * H), role="eh_proj"),
        _t(il, M.NEXTN_ENORM, (H,), True, "norm"),
        _t(il, M.NEXTN_HNORM, (H,), True, "norm"),
        _t(il, M.NEXTN_SHARED_HEAD_NORM, (H,), True, "norm"),
    ]


def tensor_bits(s: SynthSpec, t: PlannedTensor) -> Iterator[np.ndarray]:
    """bf16 bit patterns of a tensor in chunks along the first axis; deterministic per (seed, name).

    Every value is bf16-representable, also those stored as F32, so the HF layout can carry the same model.
    """
    g = rng(s.seed, t.name)
    row_elems = max(1, math.prod(t.shape[1:]))
    rows_per_chunk = max(1, _CHUNK_ELEMS // row_elems)
    des = design(s) if s.designed is not None else None
    for r0 in range(0, t.shape[0], rows_per_chunk):
        n = min(rows_per_chunk, t.shape[0] - r0)
        yield _chunk_bits(s, t, des, g, r0, n)


def _chunk_bits(s: SynthSpec, t: PlannedTensor, des: Design | None, g: np.random.Generator, r0: int,
                n: int) -> np.ndarray:
    shape = (n, *t.shape[1:])
    if des is not None and t.role in ("embd", "output", "eh_proj"):
        return bf16_bits(designed_rows(s, des, t.role, r0, n, g))
    if des is not None and t.role == "residual":
        return np.zeros(shape, dtype=np.uint16)  # nothing but the embedding reaches the residual stream
    if t.role == "norm":
        if des is not None:
            return np.full(shape, BF16_ONE, dtype=np.uint16)
        # 1 + k/128, |k| < 128: exact in bf16 both as stored (ssm_norm) and as the converter's w - 1
        k = np.clip(np.rint(g.standard_normal(shape) * (_NORM_STD * 128)), -127, 127)
        return bf16_bits(1 + k / 128)
    if t.role == "ssm_a":
        return np.full(shape, BF16_MINUS_ONE, dtype=np.uint16)  # -exp(A_log) with A_log = 0: exact on both paths
    if t.role == "dt_bias":
        return bf16_bits(g.standard_normal(shape) * 0.5)
    return random_bits(g, shape)
