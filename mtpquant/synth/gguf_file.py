"""A synthetic model as a GGUF file, or as llama-gguf-split style shards.

What running these against llama.cpp 515e855 (CPU build) taught:
- A GGUF from `write_gguf` loads in `llama-server -m X --spec-type draft-mtp`; without `--spec-type draft-mtp` the
  server ignores the `blk.N.*` MTP tensors. Random weights give 0 real acceptance: `--spec-synth-rates 1,1,1` forces
  `timings.draft_n > 0` for a plumbing check. `llama-quantize` (Q4_K_M, IQ4_XS) and `llama-imatrix --nextn` work on
  it; every quantizable row is a multiple of 256 so no K/IQ type falls back to a 32-block type.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from mtpquant.core.errors import UsageError
from mtpquant.core.files import atomic_path
from mtpquant.synth.spec import PARTIAL_ROTARY_FACTOR, SynthSpec
from mtpquant.synth.tensors import PlannedTensor, tensor_bits, tensor_plan
from mtpquant.synth.tokenizer import add_gguf_tokenizer
from mtpquant.synth.values import from_bf16_bits

# PyPI gguf 0.19.0 has no constant for this key; llama.cpp's in-tree gguf-py calls it Keys.Attention.RECURRENT_LAYERS.
RECURRENT_LAYERS_KEY = getattr(gguf.Keys.Attention, "RECURRENT_LAYERS", "{arch}.attention.recurrent_layers")
ROPE_SECTIONS = (11, 11, 10, 0)  # what the converter writes when the config has no mrope_section

_DTYPES = {
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
}

Progress = Callable[[int, int], None]


def shard_paths(path: str | Path, n_shards: int) -> list[Path]:
    """llama.cpp's shard names for `path`: <prefix>-00001-of-0000N.gguf, the prefix being the name without .gguf."""
    path = Path(path)
    stem = path.name.removesuffix(".gguf")
    return [path.with_name(gguf.SHARD_NAME_FORMAT.format(stem, i + 1, n_shards)) for i in range(n_shards)]


def write_gguf(path: str | Path, spec: SynthSpec, *, dtype: str = "bf16", split_max_tensors: int | None = None,
               progress: Progress | None = None, overwrite: bool = False, sparse: bool = False) -> list[Path]:
    """Write the model as GGUF (one file, or llama-gguf-split style shards); return the paths written.

    `progress(done_bytes, total_bytes)` is called after each tensor. Existing outputs are an error unless `overwrite`.
    `sparse` writes the header only and leaves the data as a hole of the right size: a stand-in with a real model's
    exact tensor inventory, for planning (llama-quantize --dry-run reads no tensor data), never for running.
    """
    if dtype not in _DTYPES:
        raise UsageError(f"synthetic model: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    weight_type, ftype = _DTYPES[dtype]
    plan = tensor_plan(spec)
    groups, paths = _shards(path, plan, split_max_tensors)
    if not overwrite:
        for p in paths:
            if p.exists():
                raise UsageError(f"{p} already exists", "remove it or pass overwrite=True")
    sizes = {t.name: _nbytes(t, weight_type) for t in plan}
    total, done = sum(sizes.values()), 0
    split = len(groups) > 1 or split_max_tensors is not None
    with contextlib.ExitStack() as stack:
        for i, (group, final) in enumerate(zip(groups, paths, strict=True)):
            tmp = stack.enter_context(atomic_path(final))
            w = gguf.GGUFWriter(tmp, spec.arch)
            stack.callback(w.close)  # runs before the rename, also when writing fails
            _write_head(w, spec, ftype, i, (len(groups), len(plan)) if split else None)
            _write_tensor_infos(w, group, sizes, weight_type)
            if sparse:
                done += _leave_data_hole(w, group, sizes)
                w.close()
                continue
            for t in group:
                w.write_tensor_data(_materialize(spec, t, _tensor_type(t, weight_type)))
                done += sizes[t.name]
                if progress:
                    progress(done, total)
    return paths


def _shards(path: str | Path, plan: list[PlannedTensor],
            split_max_tensors: int | None) -> tuple[list[list[PlannedTensor]], list[Path]]:
    if split_max_tensors is None:
        return [plan], [Path(path)]
    if not isinstance(split_max_tensors, int) or isinstance(split_max_tensors, bool) or split_max_tensors < 1:
        raise UsageError(f"split_max_tensors must be a positive integer or None, got {split_max_tensors!r}")
    groups = [plan[i:i + split_max_tensors] for i in range(0, len(plan), split_max_tensors)]
    return groups, shard_paths(path, len(groups))


def _write_head(w: gguf.GGUFWriter, s: SynthSpec, ftype: gguf.LlamaFileType, shard: int,
                split: tuple[int, int] | None) -> None:
    """The key/value part: all metadata in the first shard, then the split keys when `split` is (shards, tensors)."""
    if shard == 0:
        _add_metadata(w, s, ftype)
    else:
        # llama-gguf-split puts only the split keys in later shards
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    if split is not None:
        w.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, shard)
        w.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, split[0])
        w.add_int32(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, split[1])


def _write_tensor_infos(w: gguf.GGUFWriter, group: list[PlannedTensor], sizes: dict[str, int],
                        weight_type: gguf.GGMLQuantizationType) -> None:
    for t in group:
        qtype = _tensor_type(t, weight_type)
        np_dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else (
            np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.uint16)
        w.add_tensor_info(t.name, t.shape, np.dtype(np_dtype), sizes[t.name],
                          raw_dtype=None if np_dtype is not np.uint16 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()


def _leave_data_hole(w: gguf.GGUFWriter, group: list[PlannedTensor], sizes: dict[str, int]) -> int:
    """Extend the file to its full size without writing the data; return the data bytes skipped."""
    fout = w.fout[0]
    fout.flush()
    start = gguf.GGUFWriter.ggml_pad(fout.tell(), w.data_alignment)
    fout.truncate(start + sum(gguf.GGUFWriter.ggml_pad(sizes[t.name], w.data_alignment) for t in group))
    return sum(sizes[t.name] for t in group)


def _add_metadata(w: gguf.GGUFWriter, s: SynthSpec, ftype: gguf.LlamaFileType) -> None:
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(s.name)
    w.add_size_label(gguf.size_label(*_param_counts(s)))
    w.add_block_count(s.block_count)
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.hidden_size)
    if not s.is_moe:
        w.add_feed_forward_length(s.ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_rope_freq_base(float(s.rope_theta))
    w.add_layer_norm_rms_eps(float(s.rms_eps))
    if s.is_moe:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_file_type(ftype)
    if s.is_moe:
        w.add_expert_feed_forward_length(s.expert_ff)
        w.add_expert_shared_feed_forward_length(s.shared_expert_ff)
    w.add_nextn_predict_layers(s.nextn_layers)
    _add_ssm_and_rope_metadata(w, s)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_gguf_tokenizer(w, s.n_vocab)


def _add_ssm_and_rope_metadata(w: gguf.GGUFWriter, s: SynthSpec) -> None:
    w.add_ssm_conv_kernel(s.conv_kernel)
    w.add_ssm_state_size(s.linear_key_head_dim)
    w.add_ssm_group_count(s.linear_key_heads)
    w.add_ssm_time_step_rank(s.linear_value_heads)
    w.add_ssm_inner_size(s.linear_value_head_dim * s.linear_value_heads)
    w.add_array(RECURRENT_LAYERS_KEY.format(arch=s.arch), [s.is_recurrent(il) for il in range(s.block_count)])
    w.add_full_attention_interval(s.full_attention_interval)
    w.add_rope_dimension_count(int(s.head_dim * PARTIAL_ROTARY_FACTOR))
    w.add_rope_dimension_sections(list(ROPE_SECTIONS))


def _param_counts(s: SynthSpec) -> tuple[int, int, int, int]:
    """(total, shared, expert, expert count) as gguf's writer counts them, for general.size_label."""
    total = shared = expert = 0
    n_exp_tensors = exp_sum = 0
    for t in tensor_plan(s):
        size = math.prod(t.shape)
        total += size
        if "_exps." in t.name and len(t.shape) >= 3:
            expert += size // t.shape[-3]
            exp_sum += t.shape[-3]
            n_exp_tensors += 1
        else:
            shared += size
    return total, shared, expert, (exp_sum // n_exp_tensors if n_exp_tensors else 0)


def _tensor_type(t: PlannedTensor, weight_type: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType.F32 if t.f32 else weight_type


def _nbytes(t: PlannedTensor, weight_type: gguf.GGMLQuantizationType) -> int:
    return math.prod(t.shape) * (4 if _tensor_type(t, weight_type) == gguf.GGMLQuantizationType.F32 else 2)


def _encode(bits: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.BF16:
        return bits
    if qtype == gguf.GGMLQuantizationType.F16:
        return from_bf16_bits(bits).astype(np.float16)
    return from_bf16_bits(bits)


def _materialize(s: SynthSpec, t: PlannedTensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The whole tensor, encoded; built chunk by chunk so only the encoded copy is held at full size."""
    out: np.ndarray | None = None
    r = 0
    for chunk in tensor_bits(s, t):
        enc = _encode(chunk, qtype)
        if out is None:
            out = np.empty(t.shape, dtype=enc.dtype)
        out[r:r + chunk.shape[0]] = enc
        r += chunk.shape[0]
    assert out is not None
    return out
