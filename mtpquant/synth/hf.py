"""A synthetic model in HF layout (safetensors + config + tokenizer) for the convert_hf_to_gguf.py path.

What running these against llama.cpp 515e855 taught:
- The HF layout from `write_hf` converts with the pinned `convert_hf_to_gguf.py` (MTP kept by default) only when its
  pre-tokenizer check is bypassed: it hashes a test encoding against a hard-coded list and a home-made tokenizer is
  "not recognized". Run it through a wrapper that sets
  `conversion.base.TextModel.get_vocab_base_pre = lambda self, tok: "qwen2"` and then `runpy`s the script. The
  converted tensors, shapes, types and the arch/tokenizer metadata equal `write_gguf`'s, values bit for bit.
- The converter adds 1 to every `*norm.weight` except `linear_attn.norm.weight`, reorders linear-attention V heads
  from grouped to tiled order when key and value head counts differ, and turns `A_log` into `ssm_a = -exp(A_log)`
  (in float32; `A_log = 0` keeps that exact). `write_hf` applies the inverse of each so both paths give one model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np

from mtpquant.core.errors import UsageError
from mtpquant.core.files import atomic_path, write_json_atomic
from mtpquant.synth.spec import PARTIAL_ROTARY_FACTOR, SynthSpec
from mtpquant.synth.tensors import PlannedTensor, tensor_bits, tensor_name, tensor_plan
from mtpquant.synth.tokenizer import tokenizer_config, tokenizer_json
from mtpquant.synth.values import bf16_bits, from_bf16_bits

_TOP_NAMES = {
    tensor_name(gguf.MODEL_TENSOR.TOKEN_EMBD): "model.embed_tokens.weight",
    tensor_name(gguf.MODEL_TENSOR.OUTPUT_NORM): "model.norm.weight",
    tensor_name(gguf.MODEL_TENSOR.OUTPUT): "lm_head.weight",
}
# GGUF name within blk.N -> HF name within model.layers.N (main layers) or mtp.layers.M (the MTP block)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "post_attention_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight", "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight", "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_dt.bias": "linear_attn.dt_bias", "ssm_a": "linear_attn.A_log",
    "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight", "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
# the MTP block's own tensors sit outside mtp.layers
_NEXTN_NAMES = {
    "nextn.eh_proj.weight": "mtp.fc.weight", "nextn.enorm.weight": "mtp.pre_fc_norm_embedding.weight",
    "nextn.hnorm.weight": "mtp.pre_fc_norm_hidden.weight", "nextn.shared_head_norm.weight": "mtp.norm.weight",
}
# merged GGUF expert tensors -> one HF tensor per expert
_EXPERT_PARTS = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                 "ffn_down_exps.weight": "down_proj"}


def _hf_names(s: SynthSpec, t: PlannedTensor) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensors (name, shape) that the converter turns into GGUF tensor `t`."""
    if t.name in _TOP_NAMES:
        return [(_TOP_NAMES[t.name], t.shape)]
    il = t.bid
    p = f"model.layers.{il}." if il < s.n_layer else f"mtp.layers.{il - s.n_layer}."
    kind = t.name[len(f"blk.{il}."):]
    if kind in _NEXTN_NAMES:
        return [(_NEXTN_NAMES[kind], t.shape)]
    if kind == "ssm_conv1d.weight":
        return [(p + "linear_attn.conv1d.weight", (t.shape[0], 1, t.shape[1]))]
    if kind in _EXPERT_PARTS:
        return [(p + f"mlp.experts.{e}.{_EXPERT_PARTS[kind]}.weight", t.shape[1:]) for e in range(t.shape[0])]
    return [(p + _LAYER_NAMES[kind], t.shape)]


def _untile_v(a: np.ndarray, axis: int, n_k: int, n_v: int, head_dim: int) -> np.ndarray:
    """Inverse of the converter's V-head reorder: GGUF keeps V heads tiled by K head, HF groups them."""
    a = np.moveaxis(a, axis, 0)
    rest = a.shape[1:]
    a = a.reshape(n_v // n_k, n_k, head_dim, *rest).swapaxes(0, 1).reshape(n_v * head_dim, *rest)
    return np.moveaxis(a, 0, axis)


def _untile_linear_attention(s: SynthSpec, kind: str, data: np.ndarray) -> np.ndarray:
    n_k, n_v, hd = s.linear_key_heads, s.linear_value_heads, s.linear_value_head_dim
    kd2 = 2 * n_k * s.linear_key_head_dim
    if kind in ("attn_qkv.weight", "ssm_conv1d.weight"):
        return np.concatenate([data[:kd2], _untile_v(data[kd2:], 0, n_k, n_v, hd)], axis=0)
    if kind == "attn_gate.weight":
        return _untile_v(data, 0, n_k, n_v, hd)
    if kind in ("ssm_beta.weight", "ssm_alpha.weight", "ssm_dt.bias", "ssm_a"):
        return _untile_v(data, 0, n_k, n_v, 1)
    if kind == "ssm_out.weight":
        return _untile_v(data, 1, n_k, n_v, hd)
    return data


def _to_hf(s: SynthSpec, t: PlannedTensor, data: np.ndarray) -> list[np.ndarray]:
    """The values of `_hf_names(s, t)`, undoing each converter transform."""
    kind = t.name.split(".", 2)[-1] if t.bid is not None else t.name
    if kind.endswith("norm.weight") and kind != "ssm_norm.weight":
        data = data - np.float32(1)  # the converter adds 1 back (exactly: these are 1 + a bf16 value)
    if kind == "ssm_a":
        data = np.log(-data)
    if t.bid is not None and s.is_recurrent(t.bid) and s.linear_key_heads != s.linear_value_heads:
        data = _untile_linear_attention(s, kind, data)
    shapes = [shape for _, shape in _hf_names(s, t)]
    if len(shapes) > 1:
        return [data[e] for e in range(len(shapes))]
    return [data.reshape(shapes[0])]


def hf_config(spec: SynthSpec) -> dict:
    """config.json for the HF layout: every size explicit and no model_type, so no library defaults creep in."""
    s = spec
    cfg = {
        "architectures": ["Qwen3_5MoeForCausalLM" if s.is_moe else "Qwen3_5ForCausalLM"],
        "hidden_size": s.hidden_size,
        "num_hidden_layers": s.n_layer,
        "num_attention_heads": s.n_head,
        "num_key_value_heads": s.n_head_kv,
        "head_dim": s.head_dim,
        "rms_norm_eps": s.rms_eps,
        "max_position_embeddings": s.context_length,
        "vocab_size": s.n_vocab,
        "rope_theta": s.rope_theta,
        "partial_rotary_factor": PARTIAL_ROTARY_FACTOR,
        "linear_conv_kernel_dim": s.conv_kernel,
        "linear_key_head_dim": s.linear_key_head_dim,
        "linear_value_head_dim": s.linear_value_head_dim,
        "linear_num_key_heads": s.linear_key_heads,
        "linear_num_value_heads": s.linear_value_heads,
        "full_attention_interval": s.full_attention_interval,
        "layer_types": ["linear_attention" if s.is_recurrent(il) else "full_attention" for il in range(s.n_layer)],
        "mtp_num_hidden_layers": s.nextn_layers,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    if s.is_moe:
        cfg.update({"num_experts": s.n_expert, "num_experts_per_tok": s.n_expert_used,
                    "moe_intermediate_size": s.expert_ff, "shared_expert_intermediate_size": s.shared_expert_ff})
    else:
        cfg["intermediate_size"] = s.ff
    return cfg


def _safetensors_header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The length-prefixed JSON header of a safetensors file of bf16 tensors stored in `entries` order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
    return len(blob).to_bytes(8, "little") + blob


def write_hf(directory: str | Path, spec: SynthSpec, *, overwrite: bool = False) -> Path:
    """Write the model in HF layout (config, bf16 model.safetensors, tokenizer files) for convert_hf_to_gguf.py."""
    directory = Path(directory)
    names = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    if not overwrite:
        for n in names:
            if (directory / n).exists():
                raise UsageError(f"{directory / n} already exists", "remove it or pass overwrite=True")
    directory.mkdir(parents=True, exist_ok=True)
    plan = tensor_plan(spec)
    entries = [(name, shape) for t in plan for name, shape in _hf_names(spec, t)]
    with atomic_path(directory / "model.safetensors") as tmp, open(tmp, "wb") as f:
        f.write(_safetensors_header(entries))
        for t in plan:
            data = from_bf16_bits(np.concatenate(list(tensor_bits(spec, t)), axis=0))
            f.writelines(bf16_bits(arr).tobytes() for arr in _to_hf(spec, t, data))
    write_json_atomic(directory / "config.json", hf_config(spec))
    write_json_atomic(directory / "tokenizer.json", tokenizer_json())
    write_json_atomic(directory / "tokenizer_config.json", tokenizer_config(spec.context_length))
    return directory
