"""Deterministic synthetic Qwen3.5/3.6 checkpoints with a real NextN/MTP block, as BF16 GGUF or HF layout.

What running these against llama.cpp 515e855 (CPU build) taught (see also the module's tests):
- A GGUF from `write_gguf` loads in `llama-server -m X --spec-type draft-mtp`; without `--spec-type draft-mtp` the
  server ignores the `blk.N.*` MTP tensors. Random weights give 0 real acceptance: `--spec-synth-rates 1,1,1` forces
  `timings.draft_n > 0` for a plumbing check. `llama-quantize` (Q4_K_M, IQ4_XS) and `llama-imatrix --nextn` work on
  it; every quantizable row is a multiple of 256 so no K/IQ type falls back to a 32-block type.
- The HF layout from `write_hf` converts with the pinned `convert_hf_to_gguf.py` (MTP kept by default) only when its
  pre-tokenizer check is bypassed: it hashes a test encoding against a hard-coded list and a home-made tokenizer is
  "not recognized". Run it through a wrapper that sets
  `conversion.base.TextModel.get_vocab_base_pre = lambda self, tok: "qwen2"` and then `runpy`s the script. The
  converted tensors, shapes, types and the arch/tokenizer metadata equal `write_gguf`'s, values bit for bit.
- The converter adds 1 to every `*norm.weight` except `linear_attn.norm.weight`, reorders linear-attention V heads
  from grouped to tiled order when key and value head counts differ, and turns `A_log` into `ssm_a = -exp(A_log)`
  (in float32; `A_log = 0` keeps that exact). `write_hf` applies the inverse of each so both paths give one model.
- llama-server counts a draft of m tokens as `draft_n += m`, `draft_n_accepted += accepted prefix`, with
  m = min(--spec-draft-n-max, n_predict - n_generated - 1); qwen35/qwen35moe roll the recurrent state back without a
  checkpoint replay, so `designed_draft_counts` predicts both counters exactly for a designed model.
- Designed models: with random dense orthonormal embeddings, Q4_K rounding of token_embd alone flipped ~5% of the
  drafts at margin 0.01, whatever eh_proj's type. Hadamard-column embeddings and output rows are stored almost
  exactly by K-quants, and a logit-neutral part of eh_proj widens its quantization blocks, so eh_proj's type decides:
  at k=3, margin 0.01, acceptance is 0.39 with Q4_K_M's default eh_proj and 0.75 (= BF16) with eh_proj at Q8_0.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from mtpquant.core.errors import UsageError
from mtpquant.core.files import atomic_path, write_json_atomic

ARCHES = (gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN35MOE], gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN35])
LAYOUTS = ("blocks", "random")
QK_K = 256  # K- and IQ-quant super-block: rows that are not a multiple fall back to 32-block types

# PyPI gguf 0.19.0 has no constant for this key; llama.cpp's in-tree gguf-py calls it Keys.Attention.RECURRENT_LAYERS.
RECURRENT_LAYERS_KEY = getattr(gguf.Keys.Attention, "RECURRENT_LAYERS", "{arch}.attention.recurrent_layers")
ROPE_SECTIONS = (11, 11, 10, 0)  # what the converter writes when the config has no mrope_section
PARTIAL_ROTARY_FACTOR = 0.25

QWEN2_PRE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# words whose left-to-right merges make the BPE merge list (byte-level spelling: Ġ is a space, Ċ a newline)
_MERGE_WORDS = (
    "Ġt", "Ġa", "he", "in", "re", "on", "Ġthe", "er", "Ġs", "at", "Ġw", "Ġo", "en", "Ġc", "it", "is", "an", "or",
    "es", "Ġb", "ed", "Ġf", "ing", "Ġp", "ou", "Ġto", "Ġm", "Ġof", "Ġin", "Ġd", "Ġh", "Ġand", "ĠĠ", "ĠĠĠĠ", "ĊĊ",
    "ll", "Ġl", "Ġn", "Ġre", "ar", "al", "Ġe", "Ġis", "Ġy", "ion", "Ġg", "Ġu", "Ġit", "Ġfor", "Ġwh", "ro",
)
# printable non-space ASCII, readable order first: the tokens a designed model cycles through
CYCLE_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
MIN_CYCLE = 8
AUTO_CYCLE_RANGE = (32, len(CYCLE_CHARS))

_NORM_STD = 0.05
_TOP_LOGIT = 20.0  # designed models: logit of the intended next token
_ENTRY_NOISE = 0.5  # designed models: norm of a prompt token's embedding part outside the cycle subspace
_HEAD_NOISE = 0.1  # designed models: scale of output rows of tokens outside the cycle
_FREE_DIRS = 32  # designed models: directions that rows outside the cycle use
_EH_SPREAD = 4.0  # designed models: norm of eh_proj's logit-neutral part per cycle token (the signal's is ~1)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Designed:
    """A draft head that agrees with the main model on a chosen layout of cycle tokens."""

    alpha: float = 0.75  # target acceptance
    layout: str = "blocks"  # "blocks": K agreeing tokens then one disagreeing, mixed with lone disagreeing ones
    k: int = 3  # block length K; acceptance is alpha at draft length k == K
    margin: float = 0.5  # delta: the draft's runner-up logit sits at (1 - delta) of its top logit
    cycle_length: int | None = None  # None: the length in AUTO_CYCLE_RANGE that best fits alpha


# Real models' shapes, for stand-ins that plan exactly like them (sizes only; weights are random or absent).
PRESETS: dict[str, dict] = {
    "qwen3.6-35b-a3b": dict(
        arch="qwen35moe", hidden_size=2048, n_layer=40, full_attention_interval=4, n_head=16, n_head_kv=2,
        head_dim=256, linear_key_heads=16, linear_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, conv_kernel=4, n_expert=256, n_expert_used=8, expert_ff=512,
        shared_expert_ff=512, nextn_layers=1, vocab_size=248320, context_length=262144),
}


@dataclass(frozen=True)
class SynthSpec:
    """Sizes, seed and name of a synthetic model; defaults are tiny and every quantizable row is a multiple of 256."""

    arch: str = "qwen35moe"
    name: str = "synth-tiny"
    hidden_size: int = 256
    n_layer: int = 2  # main layers; the MTP block comes on top as blk.{n_layer}
    full_attention_interval: int = 2
    n_head: int = 4
    n_head_kv: int = 1
    head_dim: int = 64
    linear_key_heads: int = 2
    linear_value_heads: int = 4
    linear_key_head_dim: int = 64
    linear_value_head_dim: int = 64
    conv_kernel: int = 4
    n_expert: int = 4  # qwen35moe only
    n_expert_used: int = 2  # qwen35moe only
    expert_ff: int = 256  # qwen35moe only
    shared_expert_ff: int = 256  # qwen35moe only
    ff: int = 512  # qwen35 (dense) only
    nextn_layers: int = 1
    vocab_size: int | None = None  # None: exactly the tokenizer's size; more rows are padding tokens
    context_length: int = 4096
    rms_eps: float = 1e-6
    rope_theta: float = 10_000_000.0
    seed: int = 0
    designed: Designed | None = None

    def __post_init__(self):
        problems = _spec_problems(self)
        if problems:
            raise UsageError("\n".join(problems), "fix the synthetic model's settings")

    @property
    def is_moe(self) -> bool:
        return self.arch == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN35MOE]

    @property
    def block_count(self) -> int:
        return self.n_layer + self.nextn_layers

    @property
    def n_vocab(self) -> int:
        return self.vocab_size if self.vocab_size is not None else len(_tokenizer().tokens)

    def is_recurrent(self, il: int) -> bool:
        """Whether main layer `il` is a linear-attention (gated delta net) layer; MTP blocks never are."""
        return il < self.n_layer and (il + 1) % self.full_attention_interval != 0


def _spec_problems(s: SynthSpec) -> list[str]:
    out: list[str] = []

    def bad(field: str, need: str, got) -> None:
        out.append(f"synthetic model: {field} must be {need}, got {got!r}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def positive(field: str) -> bool:
        v = getattr(s, field)
        if not is_int(v) or v < 1:
            bad(field, "a positive integer", v)
            return False
        return True

    def row(field: str, value, what: str) -> None:
        if is_int(value) and value % QK_K != 0:
            out.append(f"synthetic model: {what} must be a multiple of {QK_K} so K- and IQ-quants apply, got {value}")

    if s.arch not in ARCHES:
        bad("arch", "one of " + ", ".join(ARCHES), s.arch)
    if not isinstance(s.name, str) or not s.name.strip():
        bad("name", "a non-empty string", s.name)
    for f in ("n_layer", "full_attention_interval", "n_head", "n_head_kv", "head_dim",
              "linear_key_heads", "linear_value_heads", "linear_key_head_dim", "linear_value_head_dim",
              "context_length"):
        positive(f)
    if positive("hidden_size"):
        row("hidden_size", s.hidden_size, "hidden_size")
    if is_int(s.n_head) and is_int(s.n_head_kv) and s.n_head >= 1 and s.n_head_kv >= 1 and s.n_head % s.n_head_kv:
        bad("n_head", f"a multiple of n_head_kv ({s.n_head_kv})", s.n_head)
    if is_int(s.head_dim) and s.head_dim >= 1:
        if s.head_dim % 8:
            bad("head_dim", "a multiple of 8 (a quarter of it is rotated, in pairs)", s.head_dim)
        if is_int(s.n_head) and s.n_head >= 1:
            row("n_head", s.n_head * s.head_dim, "n_head * head_dim")
    lk, lv = s.linear_key_heads, s.linear_value_heads
    if is_int(lk) and is_int(lv) and lk >= 1 and lv >= 1 and lv % lk:
        bad("linear_value_heads", f"a multiple of linear_key_heads ({lk})", lv)
    if is_int(s.linear_key_head_dim) and is_int(s.linear_value_head_dim) \
            and s.linear_value_head_dim != s.linear_key_head_dim:
        bad("linear_value_head_dim", f"equal to linear_key_head_dim ({s.linear_key_head_dim}) for llama.cpp",
            s.linear_value_head_dim)
    if is_int(lv) and is_int(s.linear_value_head_dim) and lv >= 1 and s.linear_value_head_dim >= 1:
        row("linear_value_heads", lv * s.linear_value_head_dim, "linear_value_heads * linear_value_head_dim")
    if not is_int(s.conv_kernel) or s.conv_kernel < 2:
        bad("conv_kernel", "an integer of at least 2", s.conv_kernel)
    if s.arch == ARCHES[0]:
        if positive("n_expert") and (not is_int(s.n_expert_used) or not 1 <= s.n_expert_used <= s.n_expert):
            bad("n_expert_used", f"between 1 and n_expert ({s.n_expert})", s.n_expert_used)
        for f in ("expert_ff", "shared_expert_ff"):
            if positive(f):
                row(f, getattr(s, f), f)
    elif s.arch == ARCHES[1] and positive("ff"):
        row("ff", s.ff, "ff")
    if s.nextn_layers != 1 or not is_int(s.nextn_layers):
        bad("nextn_layers", "1 (llama.cpp runs a single MTP block for qwen35/qwen35moe)", s.nextn_layers)
    n_tok = len(_tokenizer().tokens)
    if s.vocab_size is not None and (not is_int(s.vocab_size) or s.vocab_size < n_tok):
        bad("vocab_size", f"None or at least the tokenizer's {n_tok} tokens", s.vocab_size)
    if not isinstance(s.rms_eps, (int, float)) or isinstance(s.rms_eps, bool) or not 0 < s.rms_eps < 1:
        bad("rms_eps", "a number between 0 and 1", s.rms_eps)
    if not isinstance(s.rope_theta, (int, float)) or isinstance(s.rope_theta, bool) or s.rope_theta <= 0:
        bad("rope_theta", "a positive number", s.rope_theta)
    if not is_int(s.seed) or s.seed < 0:
        bad("seed", "a non-negative integer", s.seed)
    if s.designed is not None:
        out += _designed_problems(s.designed)
    return out


def _designed_problems(d: Designed) -> list[str]:
    out: list[str] = []

    def bad(field: str, need: str, got) -> None:
        out.append(f"synthetic model: designed.{field} must be {need}, got {got!r}")

    if not isinstance(d, Designed):
        return [f"synthetic model: designed must be a Designed or None, got {d!r}"]
    alpha_ok = isinstance(d.alpha, (int, float)) and not isinstance(d.alpha, bool) and 0 < d.alpha <= 1
    if not alpha_ok:
        bad("alpha", "a number in (0, 1]", d.alpha)
    if d.layout not in LAYOUTS:
        bad("layout", "one of " + ", ".join(LAYOUTS), d.layout)
    k_ok = isinstance(d.k, int) and not isinstance(d.k, bool) and d.k >= 1
    if not k_ok:
        bad("k", "a positive integer", d.k)
    if not isinstance(d.margin, (int, float)) or isinstance(d.margin, bool) or not 0 < d.margin <= 1:
        bad("margin", "a number in (0, 1]", d.margin)
    lo, hi = MIN_CYCLE, len(CYCLE_CHARS)
    if d.cycle_length is not None:
        if not isinstance(d.cycle_length, int) or isinstance(d.cycle_length, bool) or not lo <= d.cycle_length <= hi:
            bad("cycle_length", f"None or an integer from {lo} to {hi}", d.cycle_length)
        elif d.layout == "blocks" and k_ok and d.cycle_length < d.k + 1:
            bad("cycle_length", f"at least k + 1 ({d.k + 1}) for the blocks layout", d.cycle_length)
    if d.layout == "blocks" and k_ok and d.k + 1 > hi:
        bad("k", f"at most {hi - 1} for the blocks layout", d.k)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer


@dataclass(frozen=True)
class _Tokenizer:
    tokens: tuple[str, ...]  # byte-level spelling, id order
    merges: tuple[tuple[str, str], ...]
    special: dict[str, int]  # content -> id

    @property
    def n_normal(self) -> int:
        return len(self.tokens) - len(self.special)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in its id order (printable bytes first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@functools.lru_cache(maxsize=1)
def _tokenizer() -> _Tokenizer:
    tokens = list(_bytes_to_unicode().values())
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    for word in _MERGE_WORDS:
        left = word[0]
        for ch in word[1:]:
            if left + ch not in known:
                merges.append((left, ch))
                tokens.append(left + ch)
                known.add(left + ch)
            left += ch
    special = {}
    for s in SPECIAL_TOKENS:
        special[s] = len(tokens)
        tokens.append(s)
    return _Tokenizer(tuple(tokens), tuple(merges), special)


def token_id(text: str) -> int:
    """The id of a single token of the synthetic tokenizer (a special token or a byte-level token string)."""
    tok = _tokenizer()
    if text in tok.special:
        return tok.special[text]
    spelled = "".join(_bytes_to_unicode()[b] for b in text.encode("utf-8"))
    try:
        return tok.tokens.index(spelled)
    except ValueError:
        raise UsageError(f"synthetic tokenizer: {text!r} is not a single token") from None


# ---------------------------------------------------------------------------------------------------------------------
# designed acceptance


@dataclass(frozen=True)
class _Design:
    cycle: tuple[int, ...]  # token ids in cycle order; position 0 is the entry point
    agree: tuple[bool, ...]  # per position: does the draft head predict the same next token as the main model
    basis: np.ndarray  # (H, H) orthonormal columns; column i < L is cycle position i, L..2L-1 the spread subspace
    spread: np.ndarray  # (L, L) orthogonal: where eh_proj's spread part sends each cycle position


def _block_counts(alpha: float, k: int, length: int) -> tuple[int, int, float]:
    """(blocks, lone disagreeing tokens, error) for a cycle of exactly `length` tokens."""
    best = (0, 0, math.inf)
    for n_b in range(1, length // (k + 1) + 1):
        n_l = length - n_b * (k + 1)
        err = abs(n_b / (n_b + n_l) - alpha)
        if err < best[2] - 1e-12:
            best = (n_b, n_l, err)
    return best


def _layout(d: Designed, seed: int) -> tuple[bool, ...]:
    if d.layout == "random":
        length = d.cycle_length or 64
        n_agree = round(d.alpha * length)
        rng = _rng(seed, "designed.layout")
        agree = np.zeros(length, dtype=bool)
        agree[rng.permutation(length)[:n_agree]] = True
        return tuple(bool(a) for a in agree)
    if d.cycle_length is not None:
        n_b, n_l, _ = _block_counts(d.alpha, d.k, d.cycle_length)
    else:
        lo, hi = AUTO_CYCLE_RANGE
        cands = [(*_block_counts(d.alpha, d.k, n), n) for n in range(max(lo, d.k + 1), hi + 1)]
        n_b, n_l, _, _ = min(cands, key=lambda c: (round(c[2], 9), c[3]))
    seq: list[bool] = []
    for j in range(n_b):
        seq += [True] * d.k + [False]
        seq += [False] * ((j + 1) * n_l // n_b - j * n_l // n_b)  # lone disagreeing tokens, spread evenly
    return tuple(seq)


@functools.lru_cache(maxsize=4)
def _design(spec: SynthSpec) -> _Design:
    d = spec.designed
    assert d is not None
    agree = _layout(d, spec.seed)
    cycle = tuple(token_id(ch) for ch in CYCLE_CHARS[: len(agree)])
    # Hadamard columns: two-level rows (+-1/16 on one 256-block) that K-quants store almost exactly, so rounding
    # of token_embd and output moves no logit and only eh_proj's rounding can flip a draft
    had = np.ones((1, 1))
    while had.shape[0] < QK_K:
        had = np.block([[had, had], [had, -had]])
    rng = _rng(spec.seed, "designed.basis")
    q = np.kron(np.eye(spec.hidden_size // QK_K), had / math.sqrt(QK_K))
    q = q[:, rng.permutation(spec.hidden_size)] * rng.choice([-1.0, 1.0], spec.hidden_size)
    m, r = np.linalg.qr(_rng(spec.seed, "designed.spread").standard_normal((len(agree), len(agree))))
    return _Design(cycle, agree, q, m * np.sign(np.diag(r)))


def designed_cycle(spec: SynthSpec) -> tuple[int, ...]:
    """Token ids a designed model generates, in order; a prompt ending in a non-cycle token yields the first."""
    return _design(_need_designed(spec)).cycle


def designed_agreement(spec: SynthSpec) -> tuple[bool, ...]:
    """Per cycle position: whether the draft head drafts the main model's next token from that token."""
    return _design(_need_designed(spec)).agree


def designed_draft_counts(spec: SynthSpec, k: int, n_predict: int, start: int | None = None) -> tuple[int, int]:
    """(draft_n, draft_n_accepted) llama-server reports for greedy draft-mtp at draft length k over n_predict tokens.

    `start` is the first generated token (default: the cycle's entry, what a prompt ending in a non-cycle token gives).
    """
    des = _design(_need_designed(spec))
    _check_k(k)
    if not isinstance(n_predict, int) or isinstance(n_predict, bool) or n_predict < 1:
        raise UsageError(f"n_predict must be a positive integer, got {n_predict!r}")
    pos = 0 if start is None else _cycle_pos(des, start)
    n_gen, drafted, accepted = 1, 0, 0
    while n_gen < n_predict:
        m = min(k, n_predict - n_gen - 1)  # the server never drafts past the remaining budget
        if m <= 0:
            pos, n_gen = (pos + 1) % len(des.cycle), n_gen + 1
            continue
        a = _accepted(des, pos, m)
        drafted, accepted = drafted + m, accepted + a
        pos, n_gen = (pos + a + 1) % len(des.cycle), n_gen + a + 1
    return drafted, accepted


def designed_expected_acceptance(spec: SynthSpec, k: int, n_predict: int | None = None) -> float:
    """draft_n_accepted / draft_n at draft length k: over n_predict tokens, or in the long run when None."""
    if n_predict is not None:
        drafted, accepted = designed_draft_counts(spec, k, n_predict)
        return accepted / drafted if drafted else 0.0
    des = _design(_need_designed(spec))
    _check_k(k)
    seen: dict[int, int] = {}
    steps: list[int] = []
    pos = 0
    while pos not in seen:  # the draft start positions are eventually periodic; average over the period
        seen[pos] = len(steps)
        a = _accepted(des, pos, k)
        steps.append(a)
        pos = (pos + a + 1) % len(des.cycle)
    period = steps[seen[pos]:]
    return sum(period) / (k * len(period))


def _accepted(des: _Design, pos: int, m: int) -> int:
    a = 0
    while a < m and des.agree[(pos + a) % len(des.cycle)]:
        a += 1
    return a


def _cycle_pos(des: _Design, tok: int) -> int:
    try:
        return des.cycle.index(tok)
    except ValueError:
        raise UsageError(f"token {tok} is not in the designed model's cycle") from None


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise UsageError(f"draft length k must be a positive integer, got {k!r}")


def _need_designed(spec: SynthSpec) -> SynthSpec:
    if spec.designed is None:
        raise UsageError(f"synthetic model {spec.name!r} has no designed draft head (SynthSpec.designed is None)")
    return spec


# ---------------------------------------------------------------------------------------------------------------------
# tensor plan and values (GGUF layout; numpy shapes are ggml's ne reversed)


@dataclass(frozen=True)
class _T:
    name: str
    shape: tuple[int, ...]
    f32: bool  # stored as F32 even in a BF16 file (what the converter does)
    role: str  # how values are made, see _bits
    bid: int | None = None


def _tname(t: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = ".weight") -> str:
    return gguf.TENSOR_NAMES[t].format(bid=bid) + suffix


def _plan(s: SynthSpec) -> list[_T]:
    M = gguf.MODEL_TENSOR
    H, V = s.hidden_size, s.n_vocab
    out = [_T(_tname(M.TOKEN_EMBD), (V, H), False, "embd")]
    for il in range(s.block_count):
        mtp = il >= s.n_layer

        def t(kind: gguf.MODEL_TENSOR, shape, f32=False, role="weight", suffix=".weight", il=il):
            out.append(_T(_tname(kind, il, suffix), tuple(shape), f32, role, il))

        t(M.ATTN_NORM, (H,), True, "norm")
        t(M.ATTN_POST_NORM, (H,), True, "norm")
        if s.is_recurrent(il):
            kd = s.linear_key_heads * s.linear_key_head_dim
            vd = s.linear_value_heads * s.linear_value_head_dim
            nv = s.linear_value_heads
            t(M.ATTN_QKV, (2 * kd + vd, H))
            t(M.ATTN_GATE, (vd, H))
            t(M.SSM_CONV1D, (2 * kd + vd, s.conv_kernel), True)
            t(M.SSM_DT, (nv,), True, "dt_bias", ".bias")
            t(M.SSM_A, (nv,), True, "ssm_a", "")
            t(M.SSM_BETA, (nv, H))
            t(M.SSM_ALPHA, (nv, H))
            t(M.SSM_NORM, (s.linear_value_head_dim,), True, "norm")
            t(M.SSM_OUT, (H, vd), role="residual")
        else:
            qd, kvd = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
            t(M.ATTN_Q, (2 * qd, H))
            t(M.ATTN_K, (kvd, H))
            t(M.ATTN_V, (kvd, H))
            t(M.ATTN_OUT, (H, qd), role="residual")
            t(M.ATTN_Q_NORM, (s.head_dim,), True, "norm")
            t(M.ATTN_K_NORM, (s.head_dim,), True, "norm")
        if s.is_moe:
            E, eff, sff = s.n_expert, s.expert_ff, s.shared_expert_ff
            t(M.FFN_GATE_INP, (E, H), True)
            t(M.FFN_GATE_EXP, (E, eff, H))
            t(M.FFN_UP_EXP, (E, eff, H))
            t(M.FFN_DOWN_EXP, (E, H, eff), role="residual")
            t(M.FFN_GATE_INP_SHEXP, (1, H), True)  # 2-D {H, 1}, as the converter writes it
            t(M.FFN_GATE_SHEXP, (sff, H))
            t(M.FFN_UP_SHEXP, (sff, H))
            t(M.FFN_DOWN_SHEXP, (H, sff), role="residual")
        else:
            t(M.FFN_GATE, (s.ff, H))
            t(M.FFN_UP, (s.ff, H))
            t(M.FFN_DOWN, (H, s.ff), role="residual")
        if mtp:
            t(M.NEXTN_EH_PROJ, (H, 2 * H), role="eh_proj")
            t(M.NEXTN_ENORM, (H,), True, "norm")
            t(M.NEXTN_HNORM, (H,), True, "norm")
            t(M.NEXTN_SHARED_HEAD_NORM, (H,), True, "norm")
    out.append(_T(_tname(M.OUTPUT_NORM), (H,), True, "norm"))
    out.append(_T(_tname(M.OUTPUT), (V, H), False, "output"))
    return out


def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(name.encode()).digest()
    return np.random.default_rng([seed, *np.frombuffer(digest[:16], dtype=np.uint32).tolist()])


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns, round to nearest even (no NaN/inf here)."""
    u = np.array(a, dtype=np.float32, copy=True).view(np.uint32)
    odd = (u >> np.uint32(16)) & np.uint32(1)
    odd += np.uint32(0x7FFF)
    u += odd
    u >>= np.uint32(16)
    return u.astype(np.uint16)


def _from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _random_bits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random weights as bf16 bits: random sign and mantissa, magnitude in [2^-8, 2^-4) (std ~0.027).

    Built from integers because this is ~7x faster than drawing normals and rounding them, which matters for
    multi-GB models; the distribution only has to look like weights to the quantizer.
    """
    u = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    exp = (u >> np.uint16(7)) & np.uint16(3)
    exp += np.uint16(127 - 8)
    exp <<= np.uint16(7)
    u &= np.uint16(0x807F)
    u |= exp
    return u


_CHUNK_ELEMS = 1 << 24  # part of the recipe: values depend on how draws are split into chunks
_ONE, _MINUS_ONE = 0x3F80, 0xBF80  # bf16 bits of 1.0 and -1.0


def _bits(s: SynthSpec, t: _T) -> Iterator[np.ndarray]:
    """bf16 bit patterns of a tensor in chunks along the first axis; deterministic per (seed, name).

    Every value is bf16-representable, also those stored as F32, so the HF layout can carry the same model.
    """
    rng = _rng(s.seed, t.name)
    row_elems = max(1, math.prod(t.shape[1:]))
    rows_per_chunk = max(1, _CHUNK_ELEMS // row_elems)
    des = _design(s) if s.designed is not None else None
    for r0 in range(0, t.shape[0], rows_per_chunk):
        n = min(rows_per_chunk, t.shape[0] - r0)
        shape = (n, *t.shape[1:])
        if des is not None and t.role in ("embd", "output", "eh_proj"):
            yield _bf16_bits(_designed_rows(s, des, t.role, r0, n, rng))
        elif des is not None and t.role == "residual":
            yield np.zeros(shape, dtype=np.uint16)  # nothing but the embedding reaches the residual stream
        elif t.role == "norm":
            if des is not None:
                yield np.full(shape, _ONE, dtype=np.uint16)
            else:
                # 1 + k/128, |k| < 128: exact in bf16 both as stored (ssm_norm) and as the converter's w - 1
                k = np.clip(np.rint(rng.standard_normal(shape) * (_NORM_STD * 128)), -127, 127)
                yield _bf16_bits(1 + k / 128)
        elif t.role == "ssm_a":
            yield np.full(shape, _MINUS_ONE, dtype=np.uint16)  # -exp(A_log) with A_log = 0: exact on both paths
        elif t.role == "dt_bias":
            yield _bf16_bits(rng.standard_normal(shape) * 0.5)
        else:
            yield _random_bits(rng, shape)


def _designed_rows(s: SynthSpec, des: _Design, role: str, r0: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Rows r0..r0+n of token_embd, output or eh_proj of a designed model."""
    H, L = s.hidden_size, len(des.cycle)
    q = des.basis
    qc = q[:, :L]
    head = _TOP_LOGIT / math.sqrt(H)
    if role == "eh_proj":
        # only the embedding half is used: cycle position i -> itself (agree) or half a cycle away (disagree), and a
        # runner-up one position ahead at (1 - margin) of the top logit
        mix = np.zeros((L, L))
        for i in range(L):
            mix[i if des.agree[i] else (i + L // 2) % L, i] += 1.0
            mix[(i + 1) % L, i] += 1.0 - s.designed.margin
        # a larger part goes into a subspace no output row reads: it changes no logit, but it widens the range of
        # every quantization block of eh_proj, so eh_proj's own rounding decides whether a small margin survives
        spread = q[:, L:2 * L] @ des.spread @ qc.T
        full = np.zeros((H, 2 * H))
        full[:, :H] = qc @ mix @ qc.T + _EH_SPREAD * spread
        return full[r0:r0 + n]
    # rows outside the cycle: random in a few directions outside the cycle and spread subspaces, so they never move
    # a cycle logit; a few directions keep a 250k-token vocabulary cheap
    free = q[:, 2 * L:2 * L + _FREE_DIRS]
    g = rng.standard_normal((n, free.shape[1])) @ free.T
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    if role == "embd":
        rows = q[:, L - 1][None, :] + _ENTRY_NOISE * g  # prompt tokens lead to the entry, the successor of L-1
    else:
        rows = head * _HEAD_NOISE * g
    for i, tok in enumerate(des.cycle):
        if r0 <= tok < r0 + n:
            rows[tok - r0] = q[:, i] if role == "embd" else head * q[:, (i - 1) % L]  # output row of i: predecessor
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# GGUF


_DTYPES = {
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
}


def _encode(bits: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.BF16:
        return bits
    if qtype == gguf.GGMLQuantizationType.F16:
        return _from_bf16_bits(bits).astype(np.float16)
    return _from_bf16_bits(bits)


def _tensor_type(t: _T, weight_type: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType.F32 if t.f32 else weight_type


def _add_metadata(w: gguf.GGUFWriter, s: SynthSpec, ftype: gguf.LlamaFileType) -> None:
    arch = s.arch
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
    w.add_ssm_conv_kernel(s.conv_kernel)
    w.add_ssm_state_size(s.linear_key_head_dim)
    w.add_ssm_group_count(s.linear_key_heads)
    w.add_ssm_time_step_rank(s.linear_value_heads)
    w.add_ssm_inner_size(s.linear_value_head_dim * s.linear_value_heads)
    w.add_array(RECURRENT_LAYERS_KEY.format(arch=arch), [s.is_recurrent(il) for il in range(s.block_count)])
    w.add_full_attention_interval(s.full_attention_interval)
    w.add_rope_dimension_count(int(s.head_dim * PARTIAL_ROTARY_FACTOR))
    w.add_rope_dimension_sections(list(ROPE_SECTIONS))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok = _tokenizer()
    tokens = list(tok.tokens) + [f"[PAD{i}]" for i in range(len(tok.tokens), s.n_vocab)]
    types = [gguf.TokenType.NORMAL] * tok.n_normal + [gguf.TokenType.CONTROL] * len(tok.special)
    types += [gguf.TokenType.UNUSED] * (s.n_vocab - len(tok.tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges([f"{a} {b}" for a, b in tok.merges])
    w.add_eos_token_id(tok.special["<|im_end|>"])
    w.add_pad_token_id(tok.special["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)


def _param_counts(s: SynthSpec) -> tuple[int, int, int, int]:
    """(total, shared, expert, expert count) as gguf's writer counts them, for general.size_label."""
    total = shared = expert = 0
    n_exp_tensors = exp_sum = 0
    for t in _plan(s):
        size = math.prod(t.shape)
        total += size
        if "_exps." in t.name and len(t.shape) >= 3:
            expert += size // t.shape[-3]
            exp_sum += t.shape[-3]
            n_exp_tensors += 1
        else:
            shared += size
    return total, shared, expert, (exp_sum // n_exp_tensors if n_exp_tensors else 0)


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
    plan = _plan(spec)
    if split_max_tensors is not None:
        if not isinstance(split_max_tensors, int) or isinstance(split_max_tensors, bool) or split_max_tensors < 1:
            raise UsageError(f"split_max_tensors must be a positive integer or None, got {split_max_tensors!r}")
        groups = [plan[i:i + split_max_tensors] for i in range(0, len(plan), split_max_tensors)]
        paths = shard_paths(path, len(groups))
    else:
        groups, paths = [plan], [Path(path)]
    if not overwrite:
        for p in paths:
            if p.exists():
                raise UsageError(f"{p} already exists", "remove it or pass overwrite=True")
    sizes = {t.name: _nbytes(t, weight_type) for t in plan}
    total, done = sum(sizes.values()), 0
    with contextlib.ExitStack() as stack:
        for i, (group, final) in enumerate(zip(groups, paths, strict=True)):
            tmp = stack.enter_context(atomic_path(final))
            w = gguf.GGUFWriter(tmp, spec.arch)
            stack.callback(w.close)  # runs before the rename, also when writing fails
            if i == 0:
                _add_metadata(w, spec, ftype)
            else:
                # llama-gguf-split puts only the split keys in later shards
                w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
            if len(groups) > 1 or split_max_tensors is not None:
                w.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, i)
                w.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, len(groups))
                w.add_int32(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, len(plan))
            for t in group:
                qtype = _tensor_type(t, weight_type)
                np_dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else (
                    np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.uint16)
                w.add_tensor_info(t.name, t.shape, np.dtype(np_dtype), sizes[t.name],
                                  raw_dtype=None if np_dtype is not np.uint16 else qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            if sparse:
                fout = w.fout[0]
                fout.flush()
                start = gguf.GGUFWriter.ggml_pad(fout.tell(), w.data_alignment)
                fout.truncate(start + sum(gguf.GGUFWriter.ggml_pad(sizes[t.name], w.data_alignment) for t in group))
                done += sum(sizes[t.name] for t in group)
                w.close()
                continue
            for t in group:
                w.write_tensor_data(_materialize(spec, t, _tensor_type(t, weight_type)))
                done += sizes[t.name]
                if progress:
                    progress(done, total)
    return paths


def _nbytes(t: _T, weight_type: gguf.GGMLQuantizationType) -> int:
    return math.prod(t.shape) * (4 if _tensor_type(t, weight_type) == gguf.GGMLQuantizationType.F32 else 2)


def _materialize(s: SynthSpec, t: _T, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The whole tensor, encoded; built chunk by chunk so only the encoded copy is held at full size."""
    out: np.ndarray | None = None
    r = 0
    for chunk in _bits(s, t):
        enc = _encode(chunk, qtype)
        if out is None:
            out = np.empty(t.shape, dtype=enc.dtype)
        out[r:r + chunk.shape[0]] = enc
        r += chunk.shape[0]
    assert out is not None
    return out


# ---------------------------------------------------------------------------------------------------------------------
# HF layout (safetensors + config + tokenizer) for the convert_hf_to_gguf.py path


def _untile_v(a: np.ndarray, axis: int, n_k: int, n_v: int, head_dim: int) -> np.ndarray:
    """Inverse of the converter's V-head reorder: GGUF keeps V heads tiled by K head, HF groups them."""
    a = np.moveaxis(a, axis, 0)
    rest = a.shape[1:]
    a = a.reshape(n_v // n_k, n_k, head_dim, *rest).swapaxes(0, 1).reshape(n_v * head_dim, *rest)
    return np.moveaxis(a, 0, axis)


def _hf_names(s: SynthSpec, t: _T) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensors (name, shape) that the converter turns into GGUF tensor `t`."""
    M = gguf.MODEL_TENSOR
    top = {_tname(M.TOKEN_EMBD): "model.embed_tokens.weight", _tname(M.OUTPUT_NORM): "model.norm.weight",
           _tname(M.OUTPUT): "lm_head.weight"}
    if t.name in top:
        return [(top[t.name], t.shape)]
    il = t.bid
    p = f"model.layers.{il}." if il < s.n_layer else f"mtp.layers.{il - s.n_layer}."
    kind = t.name[len(f"blk.{il}."):]
    simple = {
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
    }
    nextn = {"nextn.eh_proj.weight": "mtp.fc.weight", "nextn.enorm.weight": "mtp.pre_fc_norm_embedding.weight",
             "nextn.hnorm.weight": "mtp.pre_fc_norm_hidden.weight", "nextn.shared_head_norm.weight": "mtp.norm.weight"}
    if kind in nextn:
        return [(nextn[kind], t.shape)]
    if kind == "ssm_conv1d.weight":
        return [(p + "linear_attn.conv1d.weight", (t.shape[0], 1, t.shape[1]))]
    if kind == "ffn_gate_inp_shexp.weight":
        return [(p + "mlp.shared_expert_gate.weight", t.shape)]
    exps = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj", "ffn_down_exps.weight": "down_proj"}
    if kind in exps:
        return [(p + f"mlp.experts.{e}.{exps[kind]}.weight", t.shape[1:]) for e in range(t.shape[0])]
    return [(p + simple[kind], t.shape)]


def _to_hf(s: SynthSpec, t: _T, data: np.ndarray) -> list[np.ndarray]:
    """The values of `_hf_names(s, t)`, undoing each converter transform."""
    kind = t.name.split(".", 2)[-1] if t.bid is not None else t.name
    if kind.endswith("norm.weight") and kind != "ssm_norm.weight":
        data = data - np.float32(1)  # the converter adds 1 back (exactly: these are 1 + a bf16 value)
    if kind == "ssm_a":
        data = np.log(-data)
    if t.bid is not None and s.is_recurrent(t.bid) and s.linear_key_heads != s.linear_value_heads:
        n_k, n_v, hd = s.linear_key_heads, s.linear_value_heads, s.linear_value_head_dim
        kd2 = 2 * n_k * s.linear_key_head_dim
        if kind in ("attn_qkv.weight", "ssm_conv1d.weight"):
            data = np.concatenate([data[:kd2], _untile_v(data[kd2:], 0, n_k, n_v, hd)], axis=0)
        elif kind == "attn_gate.weight":
            data = _untile_v(data, 0, n_k, n_v, hd)
        elif kind in ("ssm_beta.weight", "ssm_alpha.weight", "ssm_dt.bias", "ssm_a"):
            data = _untile_v(data, 0, n_k, n_v, 1)
        elif kind == "ssm_out.weight":
            data = _untile_v(data, 1, n_k, n_v, hd)
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


def _tokenizer_json() -> dict:
    tok = _tokenizer()
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for c, i in tok.special.items()],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PRE_REGEX}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tok.tokens[: tok.n_normal])},
                  "merges": [f"{a} {b}" for a, b in tok.merges]},
    }


def _tokenizer_config(spec: SynthSpec) -> dict:
    tok = _tokenizer()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": spec.context_length,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for c, i in tok.special.items()},
        "chat_template": CHATML_TEMPLATE,
    }


def write_hf(directory: str | Path, spec: SynthSpec, *, overwrite: bool = False) -> Path:
    """Write the model in HF layout (config, bf16 model.safetensors, tokenizer files) for convert_hf_to_gguf.py."""
    directory = Path(directory)
    names = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    if not overwrite:
        for n in names:
            if (directory / n).exists():
                raise UsageError(f"{directory / n} already exists", "remove it or pass overwrite=True")
    directory.mkdir(parents=True, exist_ok=True)
    plan = _plan(spec)
    entries = [(name, shape) for t in plan for name, shape in _hf_names(spec, t)]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
    with atomic_path(directory / "model.safetensors") as tmp, open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in plan:
            data = _from_bf16_bits(np.concatenate(list(_bits(spec, t)), axis=0))
            f.writelines(_bf16_bits(arr).tobytes() for arr in _to_hf(spec, t, data))
    write_json_atomic(directory / "config.json", hf_config(spec))
    write_json_atomic(directory / "tokenizer.json", _tokenizer_json())
    write_json_atomic(directory / "tokenizer_config.json", _tokenizer_config(spec))
    return directory
