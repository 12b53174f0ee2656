"""What a synthetic model is: its sizes, seed and optional designed draft head, and the checks on them."""

from __future__ import annotations

import string
from dataclasses import dataclass

import gguf

from mtpquant.core.errors import UsageError
from mtpquant.synth.tokenizer import TOKENIZER

ARCHES = (gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN35MOE], gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN35])
LAYOUTS = ("blocks", "random")
QK_K = 256  # K- and IQ-quant super-block: rows that are not a multiple fall back to 32-block types
PARTIAL_ROTARY_FACTOR = 0.25  # share of head_dim that rope rotates in these architectures

# printable non-space ASCII, readable order first: the tokens a designed model cycles through
CYCLE_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
MIN_CYCLE = 8
AUTO_CYCLE_RANGE = (32, len(CYCLE_CHARS))


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
    # Qwen3.6-27B (dense, arch qwen35): 64 layers + the NextN block as blk.64, 3 linear-attention layers per
    # full-attention one (config.json: hidden_size 5120, intermediate_size 17408, 24/4 heads of 256, linear
    # attention 16 key / 48 value heads of 128, conv kernel 4, vocab 248320, 262144 positions)
    "qwen3.6-27b": dict(
        arch="qwen35", hidden_size=5120, n_layer=64, full_attention_interval=4, n_head=24, n_head_kv=4,
        head_dim=256, linear_key_heads=16, linear_value_heads=48, linear_key_head_dim=128,
        linear_value_head_dim=128, conv_kernel=4, ff=17408, nextn_layers=1, vocab_size=248320,
        context_length=262144),
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
    context_length: int = 262144  # Qwen3.6's trained context, so a context sweep to 128k can run
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
        return self.vocab_size if self.vocab_size is not None else len(TOKENIZER.tokens)

    def is_recurrent(self, il: int) -> bool:
        """Whether main layer `il` is a linear-attention (gated delta net) layer; MTP blocks never are."""
        return il < self.n_layer and (il + 1) % self.full_attention_interval != 0


# ---------------------------------------------------------------------------------------------------------------------
# checks: every problem is reported at once, one line each, in field order


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Problems:
    """The lines reporting bad settings of `obj`, in the order they were checked."""

    def __init__(self, obj, prefix: str):
        self.obj, self.prefix, self.lines = obj, prefix, []

    def bad(self, field: str, need: str, got) -> None:
        self.lines.append(f"{self.prefix}{field} must be {need}, got {got!r}")

    def positive(self, field: str) -> bool:
        v = getattr(self.obj, field)
        if not _is_int(v) or v < 1:
            self.bad(field, "a positive integer", v)
            return False
        return True

    def row(self, value, what: str) -> None:
        if _is_int(value) and value % QK_K != 0:
            self.lines.append(
                f"{self.prefix}{what} must be a multiple of {QK_K} so K- and IQ-quants apply, got {value}")


def _spec_problems(s: SynthSpec) -> list[str]:
    p = _Problems(s, "synthetic model: ")
    if s.arch not in ARCHES:
        p.bad("arch", "one of " + ", ".join(ARCHES), s.arch)
    if not isinstance(s.name, str) or not s.name.strip():
        p.bad("name", "a non-empty string", s.name)
    for f in ("n_layer", "full_attention_interval", "n_head", "n_head_kv", "head_dim",
              "linear_key_heads", "linear_value_heads", "linear_key_head_dim", "linear_value_head_dim",
              "context_length"):
        p.positive(f)
    _check_attention(s, p)
    _check_linear_attention(s, p)
    _check_ffn(s, p)
    _check_scalars(s, p)
    if s.designed is not None:
        p.lines += _designed_problems(s.designed)
    return p.lines


def _check_attention(s: SynthSpec, p: _Problems) -> None:
    if p.positive("hidden_size"):
        p.row(s.hidden_size, "hidden_size")
    if _is_int(s.n_head) and _is_int(s.n_head_kv) and s.n_head >= 1 and s.n_head_kv >= 1 and s.n_head % s.n_head_kv:
        p.bad("n_head", f"a multiple of n_head_kv ({s.n_head_kv})", s.n_head)
    if _is_int(s.head_dim) and s.head_dim >= 1:
        if s.head_dim % 8:
            p.bad("head_dim", "a multiple of 8 (a quarter of it is rotated, in pairs)", s.head_dim)
        if _is_int(s.n_head) and s.n_head >= 1:
            p.row(s.n_head * s.head_dim, "n_head * head_dim")


def _check_linear_attention(s: SynthSpec, p: _Problems) -> None:
    lk, lv = s.linear_key_heads, s.linear_value_heads
    if _is_int(lk) and _is_int(lv) and lk >= 1 and lv >= 1 and lv % lk:
        p.bad("linear_value_heads", f"a multiple of linear_key_heads ({lk})", lv)
    if _is_int(s.linear_key_head_dim) and _is_int(s.linear_value_head_dim) \
            and s.linear_value_head_dim != s.linear_key_head_dim:
        p.bad("linear_value_head_dim", f"equal to linear_key_head_dim ({s.linear_key_head_dim}) for llama.cpp",
              s.linear_value_head_dim)
    if _is_int(lv) and _is_int(s.linear_value_head_dim) and lv >= 1 and s.linear_value_head_dim >= 1:
        p.row(lv * s.linear_value_head_dim, "linear_value_heads * linear_value_head_dim")
    if not _is_int(s.conv_kernel) or s.conv_kernel < 2:
        p.bad("conv_kernel", "an integer of at least 2", s.conv_kernel)


def _check_ffn(s: SynthSpec, p: _Problems) -> None:
    if s.arch == ARCHES[0]:
        if p.positive("n_expert") and (not _is_int(s.n_expert_used) or not 1 <= s.n_expert_used <= s.n_expert):
            p.bad("n_expert_used", f"between 1 and n_expert ({s.n_expert})", s.n_expert_used)
        for f in ("expert_ff", "shared_expert_ff"):
            if p.positive(f):
                p.row(getattr(s, f), f)
    elif s.arch == ARCHES[1] and p.positive("ff"):
        p.row(s.ff, "ff")
    if s.nextn_layers != 1 or not _is_int(s.nextn_layers):
        p.bad("nextn_layers", "1 (llama.cpp runs a single MTP block for qwen35/qwen35moe)", s.nextn_layers)


def _check_scalars(s: SynthSpec, p: _Problems) -> None:
    n_tok = len(TOKENIZER.tokens)
    if s.vocab_size is not None and (not _is_int(s.vocab_size) or s.vocab_size < n_tok):
        p.bad("vocab_size", f"None or at least the tokenizer's {n_tok} tokens", s.vocab_size)
    if not _is_number(s.rms_eps) or not 0 < s.rms_eps < 1:
        p.bad("rms_eps", "a number between 0 and 1", s.rms_eps)
    if not _is_number(s.rope_theta) or s.rope_theta <= 0:
        p.bad("rope_theta", "a positive number", s.rope_theta)
    if not _is_int(s.seed) or s.seed < 0:
        p.bad("seed", "a non-negative integer", s.seed)


def _designed_problems(d: Designed) -> list[str]:
    if not isinstance(d, Designed):
        return [f"synthetic model: designed must be a Designed or None, got {d!r}"]
    p = _Problems(d, "synthetic model: designed.")
    if not _is_number(d.alpha) or not 0 < d.alpha <= 1:
        p.bad("alpha", "a number in (0, 1]", d.alpha)
    if d.layout not in LAYOUTS:
        p.bad("layout", "one of " + ", ".join(LAYOUTS), d.layout)
    k_ok = _is_int(d.k) and d.k >= 1
    if not k_ok:
        p.bad("k", "a positive integer", d.k)
    if not _is_number(d.margin) or not 0 < d.margin <= 1:
        p.bad("margin", "a number in (0, 1]", d.margin)
    lo, hi = MIN_CYCLE, len(CYCLE_CHARS)
    if d.cycle_length is not None:
        if not _is_int(d.cycle_length) or not lo <= d.cycle_length <= hi:
            p.bad("cycle_length", f"None or an integer from {lo} to {hi}", d.cycle_length)
        elif d.layout == "blocks" and k_ok and d.cycle_length < d.k + 1:
            p.bad("cycle_length", f"at least k + 1 ({d.k + 1}) for the blocks layout", d.cycle_length)
    if d.layout == "blocks" and k_ok and d.k + 1 > hi:
        p.bad("k", f"at most {hi - 1} for the blocks layout", d.k)
    return p.lines
