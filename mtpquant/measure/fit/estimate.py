"""GPU memory of one model in llama-server, by part, estimated offline from its GGUF header.

What llama-server (515e855, defaults: all layers on the GPU, flash attention auto, unified KV, 4 slots) puts on
the GPU, and how each part is estimated here:

- weights: every tensor it loads except `token_embd` (the input layer always stays on the CPU; with tied embeddings
  the output copy does go to the GPU). The NextN block is loaded only with `--spec-type draft-mtp`.
  `--n-cpu-moe N` keeps the `*_exps` tensors of blocks 0..N-1 in host memory.
- KV cache: only the full-attention trunk layers (`<arch>.attention.recurrent_layers` false, or every
  `full_attention_interval`-th); ctx padded to 256 cells; K and V rows of `head_count_kv * key_length|value_length`
  in the KV type.
- recurrent state (linear-attention layers), F32: `(conv_kernel-1) * (inner_size + 2*group_count*state_size)`
  + `state_size * inner_size` values per row, `parallel * (1 + draft_n_max)` rows (with MTP the server keeps a
  rollback snapshot per draft position).
- MTP: a second context on the same weights, with its own KV cache for the NextN layer(s) at the same ctx and its
  own compute buffer.
- compute buffers: see `compute_bytes`; the coefficients were fitted to the CPU server's `compute buffer size`
  on 20 synthetic qwen35/qwen35moe shapes (hidden 256..4096, 1..8 experts used) with 1, 4 and 16 slots, MTP on
  and off: within -19%..+17% of each of those 70 buffers.

Cross-check against llama.cpp itself (tests/test_fit.py::test_estimate_matches_server_log): the CPU server's load
log, `llama-server -m M -c CTX --spec-type draft-mtp --no-repack -lv 4` (4 slots), summing its model, KV, RS and
compute buffer lines for the target and MTP contexts, against model + KV + recurrent + MTP KV + compute here:
  tiny Q4_K_M (default synth qwen35moe, 2+1 blocks)  -c 4096:   estimate 23.28 MiB vs server 21.65 MiB, +7.5%
                                                     -c 32768:  estimate 93.28 MiB vs server 91.65 MiB, +1.8%
                                                     -c 131072: estimate 333.28 MiB vs server 331.65 MiB, +0.5%
  35B-A3B-shaped synth (hidden 2048, 8 of 8 experts)  -c 4096:  estimate 570.1 MiB vs server 575.1 MiB, -0.9%
                                                     -c 32768:  estimate 738.1 MiB vs server 727.1 MiB, +1.5%
Weights, KV and recurrent state match the log exactly; the error is all in the compute buffers. (`llama-fit-params
-fitp on` prints whole MiB and does not take --spec-type, so it cannot check the draft context.) A CUDA build's
compute buffers differ somewhat from the CPU build's, which the 1 GiB reserve covers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import gguf

from mtpquant.measure.fit.hparams import Hparams, TensorSize
from mtpquant.modelfile.model import BLOCK_RE

MiB = 1 << 20
GiB = 1 << 30
# llama.cpp's LLM_FFN_EXPS_REGEX: the tensors --n-cpu-moe moves to host memory
EXPS_RE = re.compile(r"\.ffn_(up|down|gate|gate_up)_(ch|)exps")
KV_PAD = 256  # llama_context pads n_ctx to a multiple of 256


def mib(n: int) -> float:
    """Bytes as MiB, rounded to 2 decimals (as receipts show them)."""
    return round(n / MiB, 2)


@dataclass(frozen=True)
class ServerSettings:
    """The llama-server settings the estimate assumes (its defaults, except where noted)."""

    parallel: int = 4  # --parallel auto = 4 slots sharing one unified KV cache
    draft_n_max: int = 3  # --spec-draft-n-max
    n_ubatch: int = 512  # --ubatch-size
    reserve_mib: int = 1024  # left free on the card: CUDA context, other programs (llama.cpp's --fit-target default)

    def to_json(self) -> dict:
        return {"parallel": self.parallel, "draft_n_max": self.draft_n_max, "n_ubatch": self.n_ubatch,
                "reserve_mib": self.reserve_mib, "flash_attn": True, "kv_unified": True, "n_gpu_layers": "all"}


# ----------------------------------------------------------------------------------------------- sizes

def row_bytes(kv_type: str, n: int) -> int:
    """Bytes of one row of n values in a ggml type (ggml_row_size)."""
    qt = gguf.GGMLQuantizationType[kv_type.upper()]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    return math.ceil(n / block) * size


def padded_ctx(ctx: int) -> int:
    """ctx rounded up to the KV cells llama_context allocates."""
    return -(-ctx // KV_PAD) * KV_PAD


# Architectures with multi-head latent attention: llama.cpp 515e85511 caches the compressed latent as K and keeps no
# separate V cache for them.
MLA_ARCHES = frozenset({"deepseek2", "deepseek3", "glm4moe_mla", "kimi_k2", "minicpm3", "plm"})
DRAFT_KV_TYPE = "f16"  # llama-server's --spec-draft-type-k/-v default (-ctkd): the MTP context's KV cache type


def kv_bytes(hp: Hparams, layers: Iterable[int], ctx: int, kv_type: str) -> int:
    """K and V cache of the given layers for ctx cells (unified: shared by every slot)."""
    cells = padded_ctx(ctx)
    v_length = 0 if hp.arch in MLA_ARCHES else hp.value_length
    return sum(cells * (row_bytes(kv_type, hp.n_head_kv[il] * hp.key_length)
                        + row_bytes(kv_type, hp.n_head_kv[il] * v_length)) for il in layers)


def _recurrent_row(hp: Hparams) -> tuple[int, int]:
    """(conv, state) values per row of one linear-attention layer (llama_hparams::n_embd_r / n_embd_s)."""
    conv = max(0, hp.ssm_conv - 1) * (hp.ssm_inner + 2 * hp.ssm_group * hp.ssm_state)
    return conv, hp.ssm_state * hp.ssm_inner


def _rs_rows(settings: ServerSettings, mtp: bool) -> int:
    """One row per slot, plus one rollback snapshot per draft position with MTP (n_rs_seq = draft_n_max)."""
    return max(1, settings.parallel) * (1 + (settings.draft_n_max if mtp else 0))


def recurrent_bytes(hp: Hparams, settings: ServerSettings, mtp: bool) -> int:
    """F32 conv + SSM state of the linear-attention layers."""
    if not hp.recurrent_layers:
        return 0
    conv, state = _recurrent_row(hp)
    return len(hp.recurrent_layers) * _rs_rows(settings, mtp) * 4 * (conv + state)


def compute_bytes(hp: Hparams, ctx: int, settings: ServerSettings, mtp: bool, draft: bool = False) -> int:
    """Compute-buffer allowance of the target context (or of the MTP draft context), in bytes.

    4 B x max(n_ubatch x W, n_ubatch x 2H + n_outputs x n_vocab, R) + 2 B x n_ubatch x ctx (the F16 KQ mask), with
    H = n_embd, U = experts used (1 if dense), F = expert (or dense) FFN width, Q = head_count x key_length:
      target: W = max(4.2 H + 1.8 H U, 3.4 H + 3.4 F U, 2.2 H + 6 Q)
      draft:  W = max(2.2 H + 1.7 H U, 0.9 H + 3.2 F U, 1.3 H + 4.3 Q)
    R (target of a hybrid model only: one layer's gathered recurrent state) =
      (parallel + rows) x (conv + state values per row) + n_ubatch x (5 H + 2.4 x conv channels)
    n_outputs = parallel x (1 + draft_n_max) with MTP, else parallel (llama-server's output limits).
    """
    h, u, f, q = hp.n_embd, hp.n_expert_used, hp.ffn_width, hp.q_width
    ub = settings.n_ubatch
    if draft:
        width = max(2.2 * h + 1.7 * h * u, 0.9 * h + 3.2 * f * u, 1.3 * h + 4.3 * q)
    else:
        width = max(4.2 * h + 1.8 * h * u, 3.4 * h + 3.4 * f * u, 2.2 * h + 6 * q)
    n_outputs = settings.parallel * (1 + (settings.draft_n_max if mtp else 0))
    floats = max(ub * width, ub * 2 * h + n_outputs * hp.n_vocab)
    if not draft and hp.recurrent_layers:
        conv, state = _recurrent_row(hp)
        channels = hp.ssm_inner + 2 * hp.ssm_group * hp.ssm_state
        floats = max(floats, (settings.parallel + _rs_rows(settings, mtp)) * (conv + state)
                     + ub * (5 * h + 2.4 * channels))
    return int(4 * floats + 2 * ub * padded_ctx(ctx))


@dataclass(frozen=True)
class Weights:
    """Loaded weight bytes by placement: fixed on the GPU, fixed on the host, and movable experts per block."""

    gpu_fixed: int
    host_fixed: int
    experts: tuple[int, ...]  # per block index 0..n_blocks-1 (trunk, then NextN when loaded)
    embeddings: int
    output: int
    nextn: int  # the NextN block(s), experts included
    total: int

    def to_json(self) -> dict:
        return {"gpu_fixed_mib": mib(self.gpu_fixed), "host_fixed_mib": mib(self.host_fixed),
                "experts_mib": mib(sum(self.experts)), "experts_per_block_mib": [mib(e) for e in self.experts],
                "embeddings_mib": mib(self.embeddings), "output_mib": mib(self.output),
                "nextn_mib": mib(self.nextn), "total_mib": mib(self.total)}


def place_weights(hp: Hparams, tensors: Sequence[TensorSize], mtp: bool) -> Weights:
    """Split the tensors llama-server loads into GPU-resident, host-resident and per-block experts."""
    n_blocks = hp.n_layer + (len(hp.nextn_blocks) if mtp else 0)
    experts = [0] * n_blocks
    gpu = host = emb = out = nextn = total = 0
    names = {t.name for t in tensors}
    for t in tensors:
        m = BLOCK_RE.match(t.name)
        block = int(m.group(1)) if m else None
        if block is not None and block >= hp.n_layer:
            if not mtp:
                continue  # without --spec-type draft-mtp the server skips the NextN tensors
            nextn += t.bytes
        total += t.bytes
        if t.name.startswith("token_embd."):
            host += t.bytes
            emb += t.bytes
        elif block is not None and block < n_blocks and EXPS_RE.search(t.name):
            experts[block] += t.bytes
        else:
            gpu += t.bytes
            if t.name.startswith("output."):
                out += t.bytes
    if "output.weight" not in names and "token_embd.weight" in names:
        tied = next(t.bytes for t in tensors if t.name == "token_embd.weight")
        gpu += tied  # tied embeddings: llama.cpp loads a second copy for the output layer on the GPU
        out += tied
    return Weights(gpu, host, tuple(experts), emb, out, nextn, total)


# ----------------------------------------------------------------------------------------------- the need

@dataclass(frozen=True)
class Need:
    """GPU memory for one (ctx, KV type) with every layer on the GPU, by part, in bytes."""

    ctx: int
    kv_type: str
    weights: int  # GPU-resident non-expert weights
    host_weights: int  # weights that stay in host memory whatever the placement (token embeddings)
    experts: tuple[int, ...]
    kv: int
    recurrent: int
    mtp_kv: int
    compute: int
    mtp_compute: int

    def fixed(self) -> int:
        return self.weights + self.kv + self.recurrent + self.mtp_kv + self.compute + self.mtp_compute

    def gpu_bytes(self, n_cpu_moe: int) -> int:
        return self.fixed() + sum(self.experts[n_cpu_moe:])

    def to_json(self) -> dict:
        return {"ctx": self.ctx, "kv_type": self.kv_type, "weights_mib": mib(self.weights),
                "experts_mib": mib(sum(self.experts)), "kv_mib": mib(self.kv), "recurrent_mib": mib(self.recurrent),
                "mtp_kv_mib": mib(self.mtp_kv), "compute_mib": mib(self.compute),
                "mtp_compute_mib": mib(self.mtp_compute), "total_mib": mib(self.gpu_bytes(0))}


def needs(hp: Hparams, w: Weights, ctx: int, kv_type: str, mtp: bool, settings: ServerSettings) -> Need:
    """The GPU need of one (ctx, KV type), part by part."""
    return Need(ctx=ctx, kv_type=kv_type, weights=w.gpu_fixed, host_weights=w.host_fixed, experts=w.experts,
                kv=kv_bytes(hp, hp.attention_layers, ctx, kv_type),
                recurrent=recurrent_bytes(hp, settings, mtp),
                mtp_kv=kv_bytes(hp, hp.nextn_blocks, ctx, DRAFT_KV_TYPE) if mtp else 0,
                compute=compute_bytes(hp, ctx, settings, mtp),
                mtp_compute=compute_bytes(hp, ctx, settings, mtp, draft=True) if mtp else 0)
