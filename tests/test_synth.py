"""The synthetic model generator: what it writes, and that llama.cpp runs it the way the design says."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from mtpquant import synth
from mtpquant.core.errors import UsageError
from mtpquant.core.files import sha256_file
from mtpquant.llamacpp.server import LlamaServer
from mtpquant.synth import Designed, SynthSpec

ARCHES = ["qwen35moe", "qwen35"]

# The MTP block of a qwen35moe model, as llama.cpp's converter names it (blk.N with N = main layers).
MTP_MOE = {
    "attn_norm.weight", "post_attention_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
    "attn_output.weight", "attn_q_norm.weight", "attn_k_norm.weight", "ffn_gate_inp.weight", "ffn_gate_exps.weight",
    "ffn_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_inp_shexp.weight", "ffn_gate_shexp.weight",
    "ffn_up_shexp.weight", "ffn_down_shexp.weight", "nextn.eh_proj.weight", "nextn.enorm.weight",
    "nextn.hnorm.weight", "nextn.shared_head_norm.weight",
}
MTP_DENSE = (MTP_MOE - {n for n in MTP_MOE if "exps" in n or "shexp" in n or "gate_inp" in n}) | {
    "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"}
LINEAR_ATTN = {"attn_qkv.weight", "attn_gate.weight", "ssm_conv1d.weight", "ssm_dt.bias", "ssm_a", "ssm_beta.weight",
               "ssm_alpha.weight", "ssm_norm.weight", "ssm_out.weight"}


def tiny(arch: str = "qwen35moe", **kw) -> SynthSpec:
    return SynthSpec(arch=arch, name=f"tiny-{arch}", **kw)


def fields(reader: gguf.GGUFReader) -> dict:
    return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}


def block(names: set[str], bid: int) -> set[str]:
    prefix = f"blk.{bid}."
    return {n[len(prefix):] for n in names if n.startswith(prefix)}


# --- determinism ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHES)
def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path, arch):
    a = synth.write_gguf(tmp_path / "a.gguf", tiny(arch))[0]
    b = synth.write_gguf(tmp_path / "b.gguf", tiny(arch))[0]
    c = synth.write_gguf(tmp_path / "c.gguf", tiny(arch, seed=1))[0]
    assert sha256_file(a) == sha256_file(b)
    assert sha256_file(a) != sha256_file(c)


def test_designed_model_is_deterministic_too(tmp_path):
    spec = tiny(designed=Designed(alpha=0.6, layout="random", margin=0.05))
    a = synth.write_gguf(tmp_path / "a.gguf", spec)[0]
    b = synth.write_gguf(tmp_path / "b.gguf", spec)[0]
    assert sha256_file(a) == sha256_file(b)


# --- inventory and metadata -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, mtp_block", [("qwen35moe", MTP_MOE), ("qwen35", MTP_DENSE)])
def test_tensor_inventory_has_a_complete_nextn_block(tmp_path, arch, mtp_block):
    spec = tiny(arch, n_layer=4, full_attention_interval=2)
    r = gguf.GGUFReader(synth.write_gguf(tmp_path / "m.gguf", spec)[0])
    names = {t.name for t in r.tensors}
    assert block(names, 4) == mtp_block
    assert LINEAR_ATTN <= block(names, 0) and LINEAR_ATTN <= block(names, 2)
    assert "attn_q.weight" in block(names, 1) and "attn_q.weight" in block(names, 3)
    assert not any(n.startswith("blk.5.") for n in names)
    assert {"token_embd.weight", "output_norm.weight", "output.weight"} <= names


@pytest.mark.parametrize("arch", ARCHES)
def test_metadata_matches_what_the_converter_writes(tmp_path, arch):
    spec = tiny(arch)
    r = gguf.GGUFReader(synth.write_gguf(tmp_path / "m.gguf", spec)[0])
    kv = fields(r)
    assert kv["general.architecture"] == arch
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    assert kv[f"{arch}.block_count"] == 3
    assert kv[f"{arch}.nextn_predict_layers"] == 1
    assert kv[f"{arch}.attention.recurrent_layers"] == [True, False, False]
    assert kv[f"{arch}.full_attention_interval"] == 2
    assert kv[f"{arch}.rope.dimension_sections"] == [11, 11, 10, 0]
    assert kv[f"{arch}.rope.dimension_count"] == 16
    assert kv[f"{arch}.ssm.state_size"] == 64 and kv[f"{arch}.ssm.inner_size"] == 256
    assert kv[f"{arch}.ssm.group_count"] == 2 and kv[f"{arch}.ssm.time_step_rank"] == 4
    if arch == "qwen35moe":
        assert kv[f"{arch}.expert_count"] == 4 and kv[f"{arch}.expert_used_count"] == 2
        assert f"{arch}.feed_forward_length" not in kv
    else:
        assert kv[f"{arch}.feed_forward_length"] == 512 and f"{arch}.expert_count" not in kv
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "qwen2"
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == spec.n_vocab == r.get_tensor(0).shape[1]
    assert tokens[kv["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>"} <= set(tokens)
    assert "<|im_start|>" in kv["tokenizer.chat_template"]
    assert len(kv["tokenizer.ggml.merges"]) > 20


def test_padded_vocabulary_keeps_the_tokenizer_and_marks_the_rest_unused(tmp_path):
    spec = tiny(vocab_size=1024)
    r = gguf.GGUFReader(synth.write_gguf(tmp_path / "m.gguf", spec)[0])
    kv = fields(r)
    assert len(kv["tokenizer.ggml.tokens"]) == 1024
    assert kv["tokenizer.ggml.tokens"][-1] == "[PAD1023]"
    assert kv["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED
    assert [int(x) for x in r.get_tensor(0).shape] == [256, 1024]


@pytest.mark.parametrize("arch", ARCHES)
def test_every_quantizable_row_is_a_multiple_of_256_and_small_tensors_stay_f32(tmp_path, arch):
    r = gguf.GGUFReader(synth.write_gguf(tmp_path / "m.gguf", tiny(arch))[0])
    for t in r.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            assert int(t.shape[0]) % 256 == 0, t.name
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            assert "norm" in t.name or "gate_inp" in t.name or "ssm_" in t.name, t.name


# --- split output -----------------------------------------------------------------------------------------------------

def test_split_output_uses_llama_cpp_names_and_split_keys(tmp_path):
    single = synth.write_gguf(tmp_path / "one.gguf", tiny())[0]
    paths = synth.write_gguf(tmp_path / "m.gguf", tiny(), split_max_tensors=20)
    assert [p.name for p in paths] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert not (tmp_path / "m.gguf").exists()
    whole = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(single).tensors}
    seen = {}
    for i, p in enumerate(paths):
        r = gguf.GGUFReader(p)
        kv = fields(r)
        assert kv["split.no"] == i and kv["split.count"] == 3 and kv["split.tensors.count"] == len(whole)
        if i == 0:
            assert kv["general.architecture"] == "qwen35moe" and "tokenizer.ggml.tokens" in kv
        else:
            assert set(kv) == {"split.no", "split.count", "split.tensors.count"}
        assert len(r.tensors) == (20 if i < 2 else len(whole) - 40)
        seen.update({t.name: np.asarray(t.data).tobytes() for t in r.tensors})
    assert seen == whole


# --- files and errors -------------------------------------------------------------------------------------------------

def test_existing_output_is_not_overwritten_unless_asked(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"keep me")
    with pytest.raises(UsageError) as e:
        synth.write_gguf(target, tiny())
    assert e.value.message == f"{target} already exists"
    assert target.read_bytes() == b"keep me"
    synth.write_gguf(target, tiny(), overwrite=True)
    assert target.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_progress_reports_bytes_up_to_the_total(tmp_path):
    calls = []
    synth.write_gguf(tmp_path / "m.gguf", tiny(), progress=lambda done, total: calls.append((done, total)))
    assert len(calls) == len(gguf.GGUFReader(tmp_path / "m.gguf").tensors)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[-1][0] == calls[-1][1]


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "llama"}, "synthetic model: arch must be one of qwen35moe, qwen35, got 'llama'"),
    ({"hidden_size": 320}, "synthetic model: hidden_size must be a multiple of 256 so K- and IQ-quants apply, got 320"),
    ({"hidden_size": 0}, "synthetic model: hidden_size must be a positive integer, got 0"),
    ({"n_layer": 0}, "synthetic model: n_layer must be a positive integer, got 0"),
    ({"n_head": 3}, "synthetic model: n_head * head_dim must be a multiple of 256 so K- and IQ-quants apply, got 192"),
    ({"n_head": 4, "n_head_kv": 3}, "synthetic model: n_head must be a multiple of n_head_kv (3), got 4"),
    ({"head_dim": 36, "n_head": 64},
     "synthetic model: head_dim must be a multiple of 8 (a quarter of it is rotated, in pairs), got 36"),
    ({"linear_key_heads": 3}, "synthetic model: linear_value_heads must be a multiple of linear_key_heads (3), got 4"),
    ({"linear_value_head_dim": 128},
     "synthetic model: linear_value_head_dim must be equal to linear_key_head_dim (64) for llama.cpp, got 128"),
    ({"linear_value_heads": 2, "linear_value_head_dim": 64},
     ("synthetic model: linear_value_heads * linear_value_head_dim must be a multiple of 256 so K- and IQ-quants "
      "apply, got 128")),
    ({"conv_kernel": 1}, "synthetic model: conv_kernel must be an integer of at least 2, got 1"),
    ({"n_expert_used": 5}, "synthetic model: n_expert_used must be between 1 and n_expert (4), got 5"),
    ({"expert_ff": 384}, "synthetic model: expert_ff must be a multiple of 256 so K- and IQ-quants apply, got 384"),
    ({"arch": "qwen35", "ff": 100}, "synthetic model: ff must be a multiple of 256 so K- and IQ-quants apply, got 100"),
    ({"nextn_layers": 2},
     "synthetic model: nextn_layers must be 1 (llama.cpp runs a single MTP block for qwen35/qwen35moe), got 2"),
    ({"vocab_size": 100}, "synthetic model: vocab_size must be None or at least the tokenizer's 317 tokens, got 100"),
    ({"rms_eps": 0}, "synthetic model: rms_eps must be a number between 0 and 1, got 0"),
    ({"seed": -1}, "synthetic model: seed must be a non-negative integer, got -1"),
    ({"name": " "}, "synthetic model: name must be a non-empty string, got ' '"),
    ({"designed": Designed(alpha=1.5)}, "synthetic model: designed.alpha must be a number in (0, 1], got 1.5"),
    ({"designed": Designed(layout="stripes")},
     "synthetic model: designed.layout must be one of blocks, random, got 'stripes'"),
    ({"designed": Designed(k=0)}, "synthetic model: designed.k must be a positive integer, got 0"),
    ({"designed": Designed(margin=0)}, "synthetic model: designed.margin must be a number in (0, 1], got 0"),
    ({"designed": Designed(cycle_length=200)},
     "synthetic model: designed.cycle_length must be None or an integer from 8 to 94, got 200"),
    ({"designed": Designed(k=12, cycle_length=10)},
     "synthetic model: designed.cycle_length must be at least k + 1 (13) for the blocks layout, got 10"),
])
def test_bad_settings_are_refused_with_one_clear_message(kwargs, message):
    with pytest.raises(UsageError) as e:
        SynthSpec(**kwargs)
    assert e.value.message == message


def test_every_bad_setting_is_reported_at_once():
    with pytest.raises(UsageError) as e:
        SynthSpec(hidden_size=320, seed=-1)
    assert e.value.message.splitlines() == [
        "synthetic model: hidden_size must be a multiple of 256 so K- and IQ-quants apply, got 320",
        "synthetic model: seed must be a non-negative integer, got -1",
    ]


def test_bad_dtype_and_split_are_refused_before_writing(tmp_path):
    with pytest.raises(UsageError, match=r"^synthetic model: dtype must be one of bf16, f16, f32, got 'q8_0'$"):
        synth.write_gguf(tmp_path / "m.gguf", tiny(), dtype="q8_0")
    with pytest.raises(UsageError, match=r"^split_max_tensors must be a positive integer or None, got 0$"):
        synth.write_gguf(tmp_path / "m.gguf", tiny(), split_max_tensors=0)
    assert list(tmp_path.iterdir()) == []


# --- HF layout --------------------------------------------------------------------------------------------------------

def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """bf16 tensors as float32, read by hand (numpy has no bfloat16)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "BF16"
        b, e = info["data_offsets"]
        bits = np.frombuffer(raw[8 + n + b:8 + n + e], dtype=np.uint16).astype(np.uint32) << 16
        out[name] = bits.view(np.float32).reshape(info["shape"])
    return out


def gguf_f32(r: gguf.GGUFReader, name: str) -> np.ndarray:
    t = next(t for t in r.tensors if t.name == name)
    data = np.asarray(t.data)
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return data.reshape([int(x) for x in reversed(t.shape)])


def tile_v(a: np.ndarray, n_k: int, n_v: int, head_dim: int) -> np.ndarray:
    """What convert_hf_to_gguf.py does to linear-attention V rows when key and value head counts differ."""
    rest = a.shape[1:]
    return a.reshape(n_k, n_v // n_k, head_dim, *rest).swapaxes(0, 1).reshape(n_v * head_dim, *rest)


@pytest.mark.parametrize("designed", [None, Designed(margin=0.01)])
def test_hf_layout_is_the_same_model_once_the_converter_transforms_are_applied(tmp_path, designed):
    spec = tiny(designed=designed)
    r = gguf.GGUFReader(synth.write_gguf(tmp_path / "m.gguf", spec)[0])
    synth.write_hf(tmp_path / "hf", spec)
    hf = read_safetensors(tmp_path / "hf" / "model.safetensors")
    assert np.array_equal(hf["model.embed_tokens.weight"], gguf_f32(r, "token_embd.weight"))
    assert np.array_equal(hf["mtp.fc.weight"], gguf_f32(r, "blk.2.nextn.eh_proj.weight"))
    for hf_name, g_name in [("model.norm.weight", "output_norm.weight"),
                            ("mtp.pre_fc_norm_embedding.weight", "blk.2.nextn.enorm.weight"),
                            ("mtp.layers.0.self_attn.q_norm.weight", "blk.2.attn_q_norm.weight"),
                            ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight")]:
        assert np.array_equal(hf[hf_name] + 1, gguf_f32(r, g_name)), hf_name
    assert np.array_equal(hf["model.layers.0.linear_attn.norm.weight"], gguf_f32(r, "blk.0.ssm_norm.weight"))
    assert np.array_equal(-np.exp(hf["model.layers.0.linear_attn.A_log"]), gguf_f32(r, "blk.0.ssm_a"))
    assert np.array_equal(tile_v(hf["model.layers.0.linear_attn.in_proj_z.weight"], 2, 4, 64),
                          gguf_f32(r, "blk.0.attn_gate.weight"))
    assert np.array_equal(hf["mtp.layers.0.mlp.experts.3.down_proj.weight"],
                          gguf_f32(r, "blk.2.ffn_down_exps.weight")[3])
    assert np.array_equal(hf["model.layers.1.mlp.shared_expert_gate.weight"],
                          gguf_f32(r, "blk.1.ffn_gate_inp_shexp.weight"))


def test_hf_config_and_tokenizer_files(tmp_path):
    synth.write_hf(tmp_path, tiny("qwen35"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3_5ForCausalLM"] and "model_type" not in cfg
    assert cfg["intermediate_size"] == 512 and cfg["mtp_num_hidden_layers"] == 1
    assert cfg["layer_types"] == ["linear_attention", "full_attention"]
    tok = json.loads((tmp_path / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE" and len(tok["model"]["vocab"]) + len(tok["added_tokens"]) == 317
    split, byte_level = tok["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"]["Regex"] == synth.QWEN2_PRE_REGEX and byte_level["use_regex"] is False
    tcfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "<|im_start|>" in tcfg["chat_template"]
    hf = read_safetensors(tmp_path / "model.safetensors")
    assert "mtp.layers.0.mlp.gate_proj.weight" in hf and "mtp.pre_fc_norm_hidden.weight" in hf


# --- designed acceptance (arithmetic) ---------------------------------------------------------------------------------

def test_blocks_layout_gives_alpha_at_k_equal_to_the_block_length():
    spec = tiny(designed=Designed(alpha=0.75, layout="blocks", k=3))
    agree = synth.designed_agreement(spec)
    assert "".join("A" if a else "d" for a in agree[:9]) == "AAAdAAAdA"
    assert synth.designed_expected_acceptance(spec, 3) == 0.75
    assert synth.designed_draft_counts(spec, 3, 200) == (183, 138)
    assert synth.designed_expected_acceptance(spec, 6) == 0.375


def test_alternating_layout_accepts_everything_at_k1():
    spec = tiny(designed=Designed(alpha=1.0, layout="blocks", k=1, cycle_length=40))
    assert synth.designed_agreement(spec) == (True, False) * 20
    assert synth.designed_expected_acceptance(spec, 1) == 1.0
    assert synth.designed_expected_acceptance(spec, 2) == 0.5


def test_random_layout_agrees_on_a_fraction_alpha_of_the_cycle():
    spec = tiny(designed=Designed(alpha=0.75, layout="random", cycle_length=64))
    assert sum(synth.designed_agreement(spec)) == 48
    assert 0.5 < synth.designed_expected_acceptance(spec, 3) < 0.7


def test_the_cycle_is_readable_text_and_counts_start_where_asked():
    spec = tiny(designed=Designed())
    cycle = synth.designed_cycle(spec)
    assert cycle[:3] == (synth.token_id("a"), synth.token_id("b"), synth.token_id("c"))
    assert synth.designed_draft_counts(spec, 3, 10, start=synth.token_id("b")) == (7, 6)
    with pytest.raises(UsageError, match="is not in the designed model's cycle"):
        synth.designed_draft_counts(spec, 3, 10, start=synth.token_id("<|im_end|>"))
    with pytest.raises(UsageError, match="has no designed draft head"):
        synth.designed_expected_acceptance(tiny(), 3)


# --- the real llama.cpp (slow) ----------------------------------------------------------------------------------------

@pytest.fixture
def llama_bin(toolchain):
    return toolchain.tool


@contextlib.contextmanager
def llama_server(tc, model: Path, log: Path, *args: str):
    """The project's own server lifecycle (free loopback port, health, terminate -> wait -> kill)."""
    with LlamaServer(tc, model, log, ctx=512, extra_args=list(args)) as srv:
        yield srv


def complete(srv, n_predict: int, prompt: str = "Once upon a time\n") -> dict:
    return srv.post("/completion", {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "top_k": 1,
                                    "return_tokens": True, "cache_prompt": False})


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_server_drafts_with_the_mtp_block(tmp_path, arch, toolchain):
    model = synth.write_gguf(tmp_path / "m.gguf", tiny(arch))[0]
    args = ("--spec-type", "draft-mtp", "--spec-synth-rates", "1,1,1")
    with llama_server(toolchain, model, tmp_path / "server.log", *args) as srv:
        timings = complete(srv, 16)["timings"]
        chat = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    assert timings["draft_n"] > 0
    assert chat["timings"]["draft_n"] > 0
    assert "creating MTP draft context" in (tmp_path / "server.log").read_text()


@pytest.mark.slow
def test_quantize_and_imatrix_with_nextn(tmp_path, llama_bin):
    model = synth.write_gguf(tmp_path / "m.gguf", tiny())[0]
    for qtype in ("Q4_K_M", "IQ4_XS"):
        out = tmp_path / f"m-{qtype}.gguf"
        subprocess.run([llama_bin("llama-quantize"), model, out, qtype], check=True, capture_output=True)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
        assert types["blk.2.nextn.eh_proj.weight"] == {"Q4_K_M": "Q4_K", "IQ4_XS": "IQ4_XS"}[qtype]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 100))
    imatrix = tmp_path / "imatrix.gguf"
    subprocess.run([llama_bin("llama-imatrix"), "-m", model, "-f", corpus, "--nextn", "-c", "128", "-b", "128",
                    "--chunks", "2", "-o", imatrix], check=True, capture_output=True)
    entries = {t.name for t in gguf.GGUFReader(imatrix).tensors}
    assert "blk.2.nextn.eh_proj.weight.in_sum2" in entries


@pytest.mark.slow
@pytest.mark.parametrize("arch, k", [("qwen35moe", 1), ("qwen35moe", 3), ("qwen35", 3)])
def test_server_acceptance_is_what_the_design_predicts(tmp_path, arch, k, toolchain):
    spec = tiny(arch, designed=Designed(alpha=0.75, layout="blocks", k=3))
    model = synth.write_gguf(tmp_path / "m.gguf", spec)[0]
    with llama_server(toolchain, model, tmp_path / "server.log", "--spec-type", "draft-mtp",
                      "--spec-draft-n-max", str(k)) as srv:
        res = complete(srv, 120)
    cycle = synth.designed_cycle(spec)
    assert res["tokens"] == [cycle[i % len(cycle)] for i in range(120)]
    t = res["timings"]
    assert (t["draft_n"], t["draft_n_accepted"]) == synth.designed_draft_counts(spec, k, 120)


@pytest.mark.slow
def test_small_margin_shows_what_keeping_eh_proj_at_q8_0_is_worth(tmp_path, llama_bin, toolchain):
    spec = tiny(designed=Designed(alpha=0.75, layout="blocks", k=3, margin=0.01))
    model = synth.write_gguf(tmp_path / "m.gguf", spec)[0]
    quantize = llama_bin("llama-quantize")
    default, kept = tmp_path / "q4km.gguf", tmp_path / "q4km-eh8.gguf"
    subprocess.run([quantize, model, default, "Q4_K_M"], check=True, capture_output=True)
    subprocess.run([quantize, "--tensor-type", r"nextn\.eh_proj=q8_0", model, kept, "Q4_K_M"], check=True,
                   capture_output=True)
    rates = {}
    for path in (default, kept):
        with llama_server(toolchain, path, tmp_path / "server.log", "--spec-type", "draft-mtp",
                          "--spec-draft-n-max", "3") as srv:
            t = complete(srv, 120)["timings"]
        rates[path.name] = t["draft_n_accepted"] / t["draft_n"]
    drafted, accepted = synth.designed_draft_counts(spec, 3, 120)
    assert rates["q4km-eh8.gguf"] == accepted / drafted
    assert rates["q4km.gguf"] < rates["q4km-eh8.gguf"] - 0.2
