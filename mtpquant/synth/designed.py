"""The designed draft head: a cycle of tokens the main model generates, and on which of them the draft head agrees.

What running these against llama.cpp 515e855 (CPU build) taught:
- llama-server counts a draft of m tokens as `draft_n += m`, `draft_n_accepted += accepted prefix`, with
  m = min(--spec-draft-n-max, n_predict - n_generated - 1); qwen35/qwen35moe roll the recurrent state back without a
  checkpoint replay, so `designed_draft_counts` predicts both counters exactly for a designed model.
- With random dense orthonormal embeddings, Q4_K rounding of token_embd alone flipped ~5% of the drafts at margin
  0.01, whatever eh_proj's type. Hadamard-column embeddings and output rows are stored almost exactly by K-quants,
  and a logit-neutral part of eh_proj widens its quantization blocks, so eh_proj's type decides: at k=3, margin
  0.01, acceptance is 0.39 with Q4_K_M's default eh_proj and 0.75 (= BF16) with eh_proj at Q8_0.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from mtpquant.core.errors import UsageError
from mtpquant.synth.spec import AUTO_CYCLE_RANGE, CYCLE_CHARS, QK_K, Designed, SynthSpec
from mtpquant.synth.tokenizer import token_id
from mtpquant.synth.values import rng

_TOP_LOGIT = 20.0  # logit of the intended next token
_ENTRY_NOISE = 0.5  # norm of a prompt token's embedding part outside the cycle subspace
_HEAD_NOISE = 0.1  # scale of output rows of tokens outside the cycle
_FREE_DIRS = 32  # directions that rows outside the cycle use
_EH_SPREAD = 4.0  # norm of eh_proj's logit-neutral part per cycle token (the signal's is ~1)


@dataclass(frozen=True)
class Design:
    """The cycle, the agreement per cycle position, and the directions that carry them."""

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


def _random_layout(d: Designed, seed: int) -> tuple[bool, ...]:
    length = d.cycle_length or 64
    n_agree = round(d.alpha * length)
    agree = np.zeros(length, dtype=bool)
    agree[rng(seed, "designed.layout").permutation(length)[:n_agree]] = True
    return tuple(bool(a) for a in agree)


def _blocks_layout(d: Designed) -> tuple[bool, ...]:
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
def design(spec: SynthSpec) -> Design:
    """The design of a model whose `designed` is set."""
    d = spec.designed
    assert d is not None
    agree = _random_layout(d, spec.seed) if d.layout == "random" else _blocks_layout(d)
    cycle = tuple(token_id(ch) for ch in CYCLE_CHARS[: len(agree)])
    # Hadamard columns: two-level rows (+-1/16 on one 256-block) that K-quants store almost exactly, so rounding
    # of token_embd and output moves no logit and only eh_proj's rounding can flip a draft
    had = np.ones((1, 1))
    while had.shape[0] < QK_K:
        had = np.block([[had, had], [had, -had]])
    g = rng(spec.seed, "designed.basis")
    q = np.kron(np.eye(spec.hidden_size // QK_K), had / math.sqrt(QK_K))
    q = q[:, g.permutation(spec.hidden_size)] * g.choice([-1.0, 1.0], spec.hidden_size)
    m, r = np.linalg.qr(rng(spec.seed, "designed.spread").standard_normal((len(agree), len(agree))))
    return Design(cycle, agree, q, m * np.sign(np.diag(r)))


def designed_cycle(spec: SynthSpec) -> tuple[int, ...]:
    """Token ids a designed model generates, in order; a prompt ending in a non-cycle token yields the first."""
    return design(_need_designed(spec)).cycle


def designed_agreement(spec: SynthSpec) -> tuple[bool, ...]:
    """Per cycle position: whether the draft head drafts the main model's next token from that token."""
    return design(_need_designed(spec)).agree


def designed_draft_counts(spec: SynthSpec, k: int, n_predict: int, start: int | None = None) -> tuple[int, int]:
    """(draft_n, draft_n_accepted) llama-server reports for greedy draft-mtp at draft length k over n_predict tokens.

    `start` is the first generated token (default: the cycle's entry, what a prompt ending in a non-cycle token gives).
    """
    des = design(_need_designed(spec))
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
    des = design(_need_designed(spec))
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


def _accepted(des: Design, pos: int, m: int) -> int:
    a = 0
    while a < m and des.agree[(pos + a) % len(des.cycle)]:
        a += 1
    return a


def _cycle_pos(des: Design, tok: int) -> int:
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
# the tensors that carry the design


def designed_rows(s: SynthSpec, des: Design, role: str, r0: int, n: int, g: np.random.Generator) -> np.ndarray:
    """Rows r0..r0+n of token_embd ("embd"), output ("output") or eh_proj ("eh_proj") of a designed model."""
    if role == "eh_proj":
        return _eh_proj(s, des)[r0:r0 + n]
    return _vocab_rows(s, des, role, r0, n, g)


def _eh_proj(s: SynthSpec, des: Design) -> np.ndarray:
    H, L = s.hidden_size, len(des.cycle)
    q = des.basis
    qc = q[:, :L]
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
    return full


def _vocab_rows(s: SynthSpec, des: Design, role: str, r0: int, n: int, g: np.random.Generator) -> np.ndarray:
    H, L = s.hidden_size, len(des.cycle)
    q = des.basis
    head = _TOP_LOGIT / math.sqrt(H)
    # rows outside the cycle: random in a few directions outside the cycle and spread subspaces, so they never move
    # a cycle logit; a few directions keep a 250k-token vocabulary cheap
    free = q[:, 2 * L:2 * L + _FREE_DIRS]
    noise = g.standard_normal((n, free.shape[1])) @ free.T
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    if role == "embd":
        rows = q[:, L - 1][None, :] + _ENTRY_NOISE * noise  # prompt tokens lead to the entry, the successor of L-1
    else:
        rows = head * _HEAD_NOISE * noise
    for i, tok in enumerate(des.cycle):
        if r0 <= tok < r0 + n:
            rows[tok - r0] = q[:, i] if role == "embd" else head * q[:, (i - 1) % L]  # output row of i: predecessor
    return rows
