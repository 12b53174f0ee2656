"""Which file fits which GPU: memory per (GPU size, context, KV type), estimated offline from a GGUF header.

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
from pathlib import Path

import gguf

from mtpquant.core.errors import UsageError
from mtpquant.core.rundir import RunDir
from mtpquant.modelfile.header import field_value, read_header
from mtpquant.modelfile.model import BLOCK_RE, ModelInfo, read_model

MiB = 1 << 20
GiB = 1 << 30
KV_TYPES = ("f16", "bf16", "q8_0", "q4_0", "f32")
DEFAULT_VRAM_GB = (12, 16, 24, 32)
DEFAULT_CTX = (4096, 32768, 131072)
DEFAULT_KV = ("f16", "q8_0")
# llama.cpp's LLM_FFN_EXPS_REGEX: the tensors --n-cpu-moe moves to host memory
EXPS_RE = re.compile(r"\.ffn_(up|down|gate|gate_up)_(ch|)exps")
KV_PAD = 256  # llama_context pads n_ctx to a multiple of 256


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
class _Tensor:
    name: str
    shape: tuple[int, ...]
    bytes: int


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


def read_hparams(arch: str, kv: dict, tensors: Sequence[_Tensor]) -> Hparams:
    """Sizes from `<arch>.*` keys; hybrid layout from recurrent_layers or full_attention_interval if present."""
    block_count = int(_get(kv, arch, "block_count", 0))
    nextn = int(_get(kv, arch, "nextn_predict_layers", 0))
    n_layer = block_count - nextn
    if block_count <= 0 or n_layer <= 0:
        raise UsageError(f"{arch}: the GGUF has no usable {arch}.block_count", "is this a llama.cpp model file?")
    n_embd = int(_get(kv, arch, "embedding_length", 0))
    n_head = _max_int(_get(kv, arch, "attention.head_count"), 1)
    key_length = int(_get(kv, arch, "attention.key_length", n_embd // max(1, n_head)))
    value_length = int(_get(kv, arch, "attention.value_length", key_length))
    n_head_kv = _per_layer(_get(kv, arch, "attention.head_count_kv"), block_count, n_head)
    recurrent_flags = _get(kv, arch, "attention.recurrent_layers")
    interval = _get(kv, arch, "full_attention_interval")
    if isinstance(recurrent_flags, (list, tuple)) and recurrent_flags:
        flags = [bool(recurrent_flags[i]) if i < len(recurrent_flags) else False for i in range(n_layer)]
    elif interval:
        flags = [(il + 1) % int(interval) != 0 for il in range(n_layer)]
    else:
        flags = [False] * n_layer  # not hybrid: every layer attends
    by_name = {t.name: t for t in tensors}
    n_vocab = _get(kv, arch, "vocab_size")
    if n_vocab is None:
        emb = by_name.get("token_embd.weight") or by_name.get("output.weight")
        n_vocab = emb.shape[1] if emb and len(emb.shape) > 1 else 0
    n_expert = int(_get(kv, arch, "expert_count", 0) or 0)
    used = int(_get(kv, arch, "expert_used_count", 0) or 0) if n_expert else 0
    ffn = _max_int(_get(kv, arch, "expert_feed_forward_length")) if n_expert else 0
    if not ffn:
        ffn = _max_int(_get(kv, arch, "feed_forward_length"), 4 * n_embd)
    return Hparams(
        arch=arch, n_layer=n_layer, nextn_blocks=tuple(range(n_layer, block_count)), n_embd=n_embd,
        n_vocab=int(n_vocab), q_width=n_head * key_length, n_head_kv=n_head_kv, key_length=key_length,
        value_length=value_length, attention_layers=tuple(i for i, r in enumerate(flags) if not r),
        recurrent_layers=tuple(i for i, r in enumerate(flags) if r),
        ssm_conv=int(_get(kv, arch, "ssm.conv_kernel", 0) or 0), ssm_state=int(_get(kv, arch, "ssm.state_size", 0) or 0),
        ssm_group=int(_get(kv, arch, "ssm.group_count", 0) or 0), ssm_inner=int(_get(kv, arch, "ssm.inner_size", 0) or 0),
        n_expert_used=max(1, used), ffn_width=ffn)


# ----------------------------------------------------------------------------------------------- sizes

def row_bytes(kv_type: str, n: int) -> int:
    """Bytes of one row of n values in a ggml type (ggml_row_size)."""
    qt = gguf.GGMLQuantizationType[kv_type.upper()]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    return math.ceil(n / block) * size


def padded_ctx(ctx: int) -> int:
    return -(-ctx // KV_PAD) * KV_PAD


def kv_bytes(hp: Hparams, layers: Iterable[int], ctx: int, kv_type: str) -> int:
    """K and V cache of the given layers for ctx cells (unified: shared by every slot)."""
    cells = padded_ctx(ctx)
    return sum(cells * (row_bytes(kv_type, hp.n_head_kv[il] * hp.key_length)
                        + row_bytes(kv_type, hp.n_head_kv[il] * hp.value_length)) for il in layers)


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
        return {"gpu_fixed_mib": _mib(self.gpu_fixed), "host_fixed_mib": _mib(self.host_fixed),
                "experts_mib": _mib(sum(self.experts)), "experts_per_block_mib": [_mib(e) for e in self.experts],
                "embeddings_mib": _mib(self.embeddings), "output_mib": _mib(self.output),
                "nextn_mib": _mib(self.nextn), "total_mib": _mib(self.total)}


def place_weights(hp: Hparams, tensors: Sequence[_Tensor], mtp: bool) -> Weights:
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


# ----------------------------------------------------------------------------------------------- the table

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
        return {"ctx": self.ctx, "kv_type": self.kv_type, "weights_mib": _mib(self.weights),
                "experts_mib": _mib(sum(self.experts)), "kv_mib": _mib(self.kv), "recurrent_mib": _mib(self.recurrent),
                "mtp_kv_mib": _mib(self.mtp_kv), "compute_mib": _mib(self.compute),
                "mtp_compute_mib": _mib(self.mtp_compute), "total_mib": _mib(self.gpu_bytes(0))}


def needs(hp: Hparams, w: Weights, ctx: int, kv_type: str, mtp: bool, settings: ServerSettings) -> Need:
    return Need(ctx=ctx, kv_type=kv_type, weights=w.gpu_fixed, host_weights=w.host_fixed, experts=w.experts,
                kv=kv_bytes(hp, hp.attention_layers, ctx, kv_type),
                recurrent=recurrent_bytes(hp, settings, mtp),
                mtp_kv=kv_bytes(hp, hp.nextn_blocks, ctx, kv_type) if mtp else 0,
                compute=compute_bytes(hp, ctx, settings, mtp),
                mtp_compute=compute_bytes(hp, ctx, settings, mtp, draft=True) if mtp else 0)


def verdict(need: Need, vram_gb: float, settings: ServerSettings) -> dict:
    """`fits`, `fits with --n-cpu-moe N` (smallest N) or `does not fit` on a card of vram_gb GiB."""
    budget = int(vram_gb * GiB) - settings.reserve_mib * MiB
    n_max = len(need.experts) if any(need.experts) else 0
    chosen = next((n for n in range(n_max + 1) if need.gpu_bytes(n) <= budget), None)
    if chosen is None:
        kind, text = "no", "does not fit"
    elif chosen == 0:
        kind, text = "fits", "fits"
    else:
        kind, text = "n-cpu-moe", f"fits with --n-cpu-moe {chosen}"
    used = need.gpu_bytes(chosen if chosen is not None else n_max)
    return {"vram_gb": vram_gb, "ctx": need.ctx, "kv_type": need.kv_type, "fit": kind, "n_cpu_moe": chosen,
            "text": text, "gpu_mib": _mib(used),
            "budget_mib": _mib(budget), "host_weights_mib": _mib(need.host_weights + sum(need.experts[:chosen or 0]))}


def _tensors_of(items) -> list[_Tensor]:
    out = []
    for t in items:
        if isinstance(t, (tuple, list)):
            name, shape, _type, nbytes = t
        else:
            name, shape = t.name, t.shape
            nbytes = getattr(t, "n_bytes", None)
            if nbytes is None:
                nbytes = t.bytes
        out.append(_Tensor(str(name), tuple(int(x) for x in shape), int(nbytes)))
    return out


def fit_from_tensors(arch: str, kv: dict, tensors, vram_gb: Sequence[float] = DEFAULT_VRAM_GB,
                     ctx: Sequence[int] = DEFAULT_CTX, kv_types: Sequence[str] = DEFAULT_KV, mtp: bool = True,
                     settings: ServerSettings | None = None) -> dict:
    """The fit table from metadata plus (name, shape, type, bytes) per tensor; no file needed."""
    settings = settings or ServerSettings()
    for k in kv_types:
        if k not in KV_TYPES:
            raise UsageError(f"unknown KV cache type {k!r}", "use one of " + ", ".join(KV_TYPES))
    ts = _tensors_of(tensors)
    hp = read_hparams(arch, kv, ts)
    mtp = mtp and bool(hp.nextn_blocks)
    w = place_weights(hp, ts, mtp)
    need_list = [needs(hp, w, c, k, mtp, settings) for c in ctx for k in kv_types]
    rows = [verdict(n, g, settings) for n in need_list for g in vram_gb]
    return {"model": hp.to_json(), "mtp": mtp, "settings": settings.to_json(), "weights": w.to_json(),
            "needs": [n.to_json() for n in need_list], "rows": rows,
            "method": "offline estimate from the GGUF header (mtpquant.fit); compute buffers by formula"}


PER_LAYER_KEYS = ("attention.recurrent_layers", "attention.head_count_kv", "attention.head_count",
                  "feed_forward_length", "expert_feed_forward_length")


def model_kv(info: ModelInfo) -> dict:
    """info.kv plus per-layer arrays it leaves out for being long (models of more than 64 blocks)."""
    kv = dict(info.kv)
    missing = [f"{info.arch}.{k}" for k in PER_LAYER_KEYS if f"{info.arch}.{k}" not in kv]
    if missing and info.paths and Path(info.paths[0]).is_file():
        reader = read_header(Path(info.paths[0]))
        for key in missing:
            value = field_value(reader, key)
            if value is not None:
                kv[key] = value
    return kv


def fit_table(info: ModelInfo, vram_gb: Sequence[float] = DEFAULT_VRAM_GB, ctx: Sequence[int] = DEFAULT_CTX,
              kv_types: Sequence[str] = DEFAULT_KV, mtp: bool = True, settings: ServerSettings | None = None) -> dict:
    """Per (GPU GiB, ctx, KV type): fits / fits with --n-cpu-moe N / does not fit, from a model's header.

    Each row: vram_gb, ctx, kv_type, fit ("fits" | "n-cpu-moe" | "no"), n_cpu_moe (0, N or None), text (the
    verdict in words), gpu_mib (at that N), budget_mib, host_weights_mib; `needs` has the parts per (ctx, KV type).
    """
    table = fit_from_tensors(info.arch, model_kv(info), info.tensors, vram_gb, ctx, kv_types, mtp, settings)
    table["file"] = info.paths[0].name
    table["file_bytes"] = sum(p.stat().st_size for p in info.paths if p.exists())
    return table


def fit_from_plan(source: ModelInfo, tensors, vram_gb: Sequence[float] = DEFAULT_VRAM_GB,
                  ctx: Sequence[int] = DEFAULT_CTX, kv_types: Sequence[str] = DEFAULT_KV, mtp: bool = True,
                  settings: ServerSettings | None = None) -> dict:
    """The fit of a planned variant: the source's metadata with the plan's per-tensor bytes (TensorPlan or tuples)."""
    return fit_from_tensors(source.arch, model_kv(source), tensors, vram_gb, ctx, kv_types, mtp, settings)


# ----------------------------------------------------------------------------------------------- run directories

def fit_run(run_root: Path, vram_gb: Sequence[float] = DEFAULT_VRAM_GB, ctx: Sequence[int] = DEFAULT_CTX,
            kv_types: Sequence[str] = DEFAULT_KV, mtp: bool = True, settings: ServerSettings | None = None
            ) -> dict[str, dict]:
    """Fit every variant of a run directory and write receipts/fit-<variant>.json; returns {variant: table}."""

    run = RunDir(Path(run_root))
    out = {}
    for tag, path in [(a.variant, a.path) for a in run.artifacts()]:
        table = fit_table(read_model(path), vram_gb, ctx, kv_types, mtp, settings)
        run.write_receipt("fit", table, tag=tag)
        out[tag] = table
    return out


def _mib(n: int) -> float:
    return round(n / MiB, 2)


def format_table(table: dict) -> str:
    """Rows = (ctx, KV type), columns = GPU sizes; each cell `fits`, `--n-cpu-moe N` or `does not fit`."""
    sizes = sorted({r["vram_gb"] for r in table["rows"]})
    cells = {(r["ctx"], r["kv_type"], r["vram_gb"]): r for r in table["rows"]}
    keys = list(dict.fromkeys((r["ctx"], r["kv_type"]) for r in table["rows"]))
    needs_by = {(n["ctx"], n["kv_type"]): n for n in table["needs"]}

    def cell(r: dict) -> str:
        return {"fits": "fits", "no": "does not fit"}.get(r["fit"], f"--n-cpu-moe {r['n_cpu_moe']}")

    head = f"{'ctx':>7} {'KV':<5} {'need GiB':>9} " + " ".join(f"{_gb(g):>15}" for g in sizes)
    lines = [head]
    for c, k in keys:
        total = needs_by[(c, k)]["total_mib"] / 1024
        lines.append(f"{c:>7} {k:<5} {total:>9.2f} " + " ".join(f"{cell(cells[(c, k, g)]):>15}" for g in sizes))
    w = table["weights"]
    s = table["settings"]
    lines.append(f"weights {_size(w['total_mib'])} ({_size(w['experts_mib'])} experts, {_size(w['host_fixed_mib'])} "
                 f"token embeddings kept on the CPU); MTP {'on' if table['mtp'] else 'off'}; {s['parallel']} slots; "
                 f"{s['reserve_mib']} MiB left free")
    return "\n".join(lines)


def _size(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.2f} MiB"


def _gb(g: float) -> str:
    return f"{g:g} GB"
