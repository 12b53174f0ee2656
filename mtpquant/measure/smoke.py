"""MTP smoke run: one GGUF in llama-server, speculation off vs draft-mtp at each k, prompt suite x seeds.

Figures (per category and overall, each with a 95% bootstrap CI that resamples prompts, all seeds of a prompt
together):
  acceptance   = sum(draft_n_accepted) / sum(draft_n)   (a response without draft_n made 0 drafts)
  mean accepted length = sum(draft_n_accepted) / sum(verification steps)   (steps from /metrics deltas)
  tok/s        = mean of timings.predicted_per_second
  speedup      = geometric mean over units of MTP tok/s / vanilla tok/s for the same prompt and seed
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtpquant.core.errors import GateError, ServerError, UsageError
from mtpquant.core.files import sha256_bytes, sha256_file
from mtpquant.core.paths import DATA_DIR
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.rundir import Artifact, RunDir
from mtpquant.llamacpp.server import LlamaServer
from mtpquant.llamacpp.toolchain import Toolchain
from mtpquant.recipe import model as rcp
from mtpquant.recipe.model import Gates, SmokeSpec

DATA = DATA_DIR
SUITE_PATH = DATA / "prompts" / "suite-v1.jsonl"
LONG_TEXT_PATH = DATA / "long" / "long-context-v1.txt"
CATEGORIES = ("code", "math", "general")
CHAT = "/v1/chat/completions"
RAW = "/completion"
MODES = {"chat": CHAT, "raw": RAW}
SAMPLING = {"temperature": 0.0, "top_k": 1}  # greedy: MTP output must equal vanilla output up to numerics
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20260529
LEVEL = 0.95
WARMUP_TOKENS = 8
LONG_RESERVE = 48  # tokens left for the chat template and the instruction after a long prompt
LONG_INSTRUCTION = "\n\nSummarize the text above in one sentence."
SPEC_TYPE = "draft-mtp"

NOTES = (
    ("Sampling is greedy (temperature 0, top_k 1): the seed does not change the output, so seeds repeat each "
     "measurement and the per-seed spread is timing noise."),
    ("Per-request speculative fields are never sent: this llama-server ignores them. Every speculative setting is "
     "on the server command line recorded under 'servers'."),
    "speedup = geometric mean over prompt x seed units of (MTP tok/s / vanilla tok/s) for the same prompt and seed.",
    "95% CIs: percentile bootstrap resampling prompts (all seeds of a prompt together: at temperature 0 they are "
    "replicates, not independent draws), with numpy.",
    "Each server first answers one warm-up request that is not counted.",
)


# ----------------------------------------------------------------------------------------------- prompt suite

@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    messages: tuple[tuple[str, str], ...]  # (role, content)
    prompt: str  # the raw text for /completion

    def messages_json(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def to_json(self) -> dict:
        return {"id": self.id, "category": self.category, "messages": self.messages_json(), "prompt": self.prompt}


def load_suite(path: Path | None = None) -> list[Prompt]:
    """Read a JSONL prompt suite ({"id", "category", "messages", "prompt"} per line); every problem at once."""
    path = Path(path) if path is not None else SUITE_PATH
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read prompt suite ({exc.strerror or exc})") from None
    problems: list[str] = []
    out: list[Prompt] = []
    seen: set[str] = set()
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            d = json.loads(line)
        except ValueError as exc:
            problems.append(f"{where}: not JSON ({exc.msg})")
            continue
        p = _prompt(d, where, problems)
        if p is None:
            continue
        if p.id in seen:
            problems.append(f"{where}: duplicate id {p.id!r}")
            continue
        seen.add(p.id)
        out.append(p)
    if not out and not problems:
        problems.append(f"{path}: the prompt suite is empty")
    if problems:
        raise UsageError("\n".join(problems))
    return out


def _prompt(d, where: str, problems: list[str]) -> Prompt | None:
    if not isinstance(d, dict):
        problems.append(f"{where}: expected a JSON object")
        return None
    bad = len(problems)
    unknown = sorted(set(d) - {"id", "category", "messages", "prompt"})
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(unknown)}")
    pid, cat, msgs, raw = d.get("id"), d.get("category"), d.get("messages"), d.get("prompt")
    if not isinstance(pid, str) or not pid:
        problems.append(f"{where}: id must be a non-empty string")
    if cat not in CATEGORIES:
        problems.append(f"{where}: category must be one of {', '.join(CATEGORIES)}, got {cat!r}")
    if not isinstance(raw, str) or not raw.strip():
        problems.append(f"{where}: prompt must be a non-empty string")
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
            and isinstance(m["content"], str) for m in msgs):
        problems.append(f"{where}: messages must be a non-empty list of {{role: system|user|assistant, content}}")
    if len(problems) > bad:
        return None
    return Prompt(pid, cat, tuple((m["role"], m["content"]) for m in msgs), raw)


def select_prompts(suite: Sequence[Prompt], n: int | None) -> list[Prompt]:
    """The first n prompts in category-interleaved order (code, math, general, code, ...), so every category shows."""
    if n is None or n >= len(suite):
        return list(suite)
    by_cat: dict[str, list[Prompt]] = {}
    for p in suite:
        by_cat.setdefault(p.category, []).append(p)
    order: list[Prompt] = []
    for i in range(max(len(v) for v in by_cat.values())):
        order += [v[i] for v in by_cat.values() if i < len(v)]
    return order[:n]


def chat_body(p: Prompt, seed: int, max_tokens: int) -> dict:
    return {"messages": p.messages_json(), "max_tokens": max_tokens, **SAMPLING, "seed": seed,
            "cache_prompt": False, "stream": False}


def raw_body(p: Prompt, seed: int, max_tokens: int) -> dict:
    return {"prompt": p.prompt, "n_predict": max_tokens, **SAMPLING, "seed": seed, "cache_prompt": False,
            "stream": False}


# ----------------------------------------------------------------------------------------------- statistics

Stat = Callable[..., np.ndarray]
# Bumped whenever the figures derived from the same requests change (2: bootstrap over prompts); an older receipt is
# re-measured by `build`, never shown as if this version had computed it.
METHOD = 2


def ratio_of_sums(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """sum(num)/sum(den) along the last axis; nan where the denominator is 0."""
    n, d = np.sum(num, axis=-1), np.sum(den, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, n / np.where(d > 0, d, 1), np.nan)


def mean(x: np.ndarray) -> np.ndarray:
    return np.mean(x, axis=-1)


def geomean_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Geometric mean of num/den along the last axis."""
    return np.exp(np.mean(np.log(num) - np.log(den), axis=-1))


def _geomean(x: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(x))))


# How each statistic folds the units of one cluster (one prompt's seeds) into one unit without changing its value
# when clusters are the same size: sums stay sums, means become means, geometric means geometric means.
_COLLAPSE = {ratio_of_sums: np.sum, mean: np.mean, geomean_ratio: _geomean}


def by_cluster(stat: Stat, arrays: Sequence[np.ndarray], clusters: Sequence) -> list[np.ndarray]:
    """The arrays with the units of each cluster folded into one (for a bootstrap over clusters)."""
    fold = _COLLAPSE[stat]
    keys = list(dict.fromkeys(clusters))
    where = {k: [i for i, c in enumerate(clusters) if c == k] for k in keys}
    return [np.array([fold(np.asarray(a, dtype=float)[where[k]]) for k in keys]) for a in arrays]


def bootstrap_ci(stat: Stat, arrays: Sequence[np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile bootstrap CI of stat(*arrays), resampling the units (the last axis) jointly with replacement.

    `stat` must accept arrays with a leading resample axis. None when no resample gives a finite value.
    """
    arrs = [np.asarray(a, dtype=float) for a in arrays]
    n = arrs[0].shape[-1]
    if n == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    values = np.asarray(stat(*[a[idx] for a in arrs]), dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def figure(stat: Stat, arrays: Sequence[np.ndarray], digits: int = 4, clusters: Sequence | None = None) -> dict:
    """{"value", "ci95"}: the statistic on all units and its bootstrap CI (None where undefined).

    With `clusters` (the prompt of each unit) the bootstrap resamples whole clusters: at temperature 0 a prompt's
    seeds are replicates, not independent draws, and treating them as such would narrow the CI.
    """
    arrs = [np.asarray(a, dtype=float) for a in arrays]
    if arrs[0].size == 0:
        return {"value": None, "ci95": None}
    v = float(stat(*arrs))
    ci = bootstrap_ci(stat, by_cluster(stat, arrs, clusters) if clusters is not None else arrs)
    return {"value": _r(v, digits), "ci95": [_r(ci[0], digits), _r(ci[1], digits)] if ci else None}


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


# ----------------------------------------------------------------------------------------------- one request

@dataclass(frozen=True)
class _Request:
    id: str
    mode: str
    prompt: Prompt
    seed: int
    body: dict

    @property
    def endpoint(self) -> str:
        return MODES[self.mode]


def _requests(prompts: Sequence[Prompt], seeds: Sequence[int], max_tokens: int, raw: bool) -> list[_Request]:
    out = []
    for mode in ("chat", "raw") if raw else ("chat",):
        make = chat_body if mode == "chat" else raw_body
        for p in prompts:
            for s in seeds:
                out.append(_Request(f"{mode}/{p.id}/{s}", mode, p, s, make(p, s, max_tokens)))
    return out


def _text(mode: str, resp: dict) -> tuple[str, str | None]:
    if mode == "chat":
        choice = (resp.get("choices") or [{}])[0]
        msg = choice.get("message") or {}
        text = (msg.get("reasoning_content") or "") + (msg.get("content") or "")
        return text, choice.get("finish_reason")
    return str(resp.get("content", "")), resp.get("stop_type")


def _per_pos(m: dict) -> dict[int, float]:
    out = {}
    for key, v in m.items():
        if key.startswith("spec_decode_num_accepted_tokens_per_pos_total{"):
            out[int(key.split('"')[1])] = v
    return out


def _send(srv: LlamaServer, req: _Request, server_label: str, before: dict) -> tuple[dict, dict]:
    started = time.monotonic()
    resp = srv.post(req.endpoint, req.body)
    wall = time.monotonic() - started
    after = srv.metrics() if srv.speculative else before
    timings = resp.get("timings") if isinstance(resp, dict) else None
    if not isinstance(timings, dict) or "predicted_per_second" not in timings:
        raise ServerError(f"{req.endpoint} returned no timings for request {req.id}; log: {srv.log_path}")
    text, finish = _text(req.mode, resp)
    draft_n = int(timings.get("draft_n", 0))
    accepted = int(timings.get("draft_n_accepted", 0))
    steps = per_pos = None
    if srv.speculative:
        d_tok = after.get("spec_decode_num_draft_tokens_total", 0) - before.get("spec_decode_num_draft_tokens_total", 0)
        d_acc = after.get("spec_decode_num_accepted_tokens_total", 0) - before.get(
            "spec_decode_num_accepted_tokens_total", 0)
        if int(d_tok) == draft_n and int(d_acc) == accepted:  # the counters belong to this request alone
            steps = int(after.get("spec_decode_num_drafts_total", 0) - before.get("spec_decode_num_drafts_total", 0))
            pa, pb = _per_pos(after), _per_pos(before)
            per_pos = [int(pa[i] - pb.get(i, 0)) for i in sorted(pa)]
    rec = {"server": server_label, "request": req.id, "mode": req.mode, "prompt": req.prompt.id,
           "category": req.prompt.category, "seed": req.seed, "timings": timings, "draft_n": draft_n,
           "draft_n_accepted": accepted, "draft_steps": steps, "accepted_per_position": per_pos,
           "finish_reason": finish, "text": text, "wall_seconds": round(wall, 4)}
    return rec, after


# ----------------------------------------------------------------------------------------------- aggregation

def _arr(recs: Sequence[dict], key: str) -> np.ndarray:
    return np.array([r[key] for r in recs], dtype=float)


def _tps(recs: Sequence[dict]) -> np.ndarray:
    return np.array([max(float(r["timings"]["predicted_per_second"]), 1e-9) for r in recs], dtype=float)


def _mtp_group(pairs: Sequence[tuple[dict, dict]]) -> dict:
    van = [v for v, _ in pairs]
    mtp = [m for _, m in pairs]
    d, a = _arr(mtp, "draft_n"), _arr(mtp, "draft_n_accepted")
    steps_known = all(m["draft_steps"] is not None for m in mtp)
    differs = sum(1 for v, m in pairs if v["text"] != m["text"])
    prompts = [m["prompt"] for m in mtp]
    out = {
        "units": len(pairs),
        "prompts": len(set(prompts)),
        "draft_n": int(d.sum()), "draft_n_accepted": int(a.sum()),
        "draft_steps": int(sum(m["draft_steps"] for m in mtp)) if steps_known else None,
        "acceptance": figure(ratio_of_sums, (a, d), clusters=prompts),
        "mean_accepted_length": figure(ratio_of_sums, (a, _arr(mtp, "draft_steps")), clusters=prompts)
        if steps_known else {"value": None, "ci95": None},
        "tok_s": figure(mean, (_tps(mtp),), 2, clusters=prompts),
        "vanilla_tok_s": figure(mean, (_tps(van),), 2, clusters=prompts),
        "speedup": figure(geomean_ratio, (_tps(mtp), _tps(van)), clusters=prompts),
        "differs_from_vanilla": {"count": differs, "of": len(pairs), "share": _r(differs / len(pairs)) if pairs
                                 else None},
    }
    if steps_known and out["draft_steps"]:
        width = max(len(m["accepted_per_position"] or []) for m in mtp)
        sums = np.zeros(width)
        for m in mtp:
            pos = m["accepted_per_position"] or []
            sums[:len(pos)] += pos
        # share of verification steps whose draft was accepted up to and including position i
        out["acceptance_per_position"] = [_r(s / out["draft_steps"]) for s in sums]
    return out


def _groups(pairs: Sequence[tuple[dict, dict]], seeds: Sequence[int]) -> dict:
    cats = [c for c in CATEGORIES if any(m["category"] == c for _, m in pairs)]
    cats += sorted({m["category"] for _, m in pairs} - set(cats))
    return {
        "overall": _mtp_group(pairs),
        "per_category": {c: _mtp_group([p for p in pairs if p[1]["category"] == c]) for c in cats},
        "per_seed": {str(s): _mtp_group([p for p in pairs if p[1]["seed"] == s]) for s in seeds},
    }


def _vanilla_group(recs: Sequence[dict]) -> dict:
    return {"units": len(recs), "tok_s": figure(mean, (_tps(recs),), 2, clusters=[r["prompt"] for r in recs])}


def summarize(runs: Sequence[dict], ks: Sequence[int], seeds: Sequence[int], modes: Sequence[str]) -> dict:
    """Per mode: vanilla tok/s and, per k, the figures overall / per category / per seed; plus the best k."""
    out: dict = {}
    for mode in modes:
        van = {(r["prompt"], r["seed"]): r for r in runs if r["server"] == "vanilla" and r["mode"] == mode}
        vrecs = list(van.values())
        cats = [c for c in CATEGORIES if any(r["category"] == c for r in vrecs)]
        per_k = {}
        for k in ks:
            mtp = [r for r in runs if r["server"] == f"k{k}" and r["mode"] == mode]
            per_k[str(k)] = _groups([(van[(m["prompt"], m["seed"])], m) for m in mtp], seeds)
        out[mode] = {
            "vanilla": {"overall": _vanilla_group(vrecs),
                        "per_category": {c: _vanilla_group([r for r in vrecs if r["category"] == c]) for c in cats},
                        "per_seed": {str(s): _vanilla_group([r for r in vrecs if r["seed"] == s]) for s in seeds}},
            "k": per_k,
            "best_k": best_k(per_k),
        }
    return out


def best_k(per_k: dict) -> int | None:
    """The k with the highest overall speedup (the smaller k on a tie)."""
    scored = [(g["overall"]["speedup"]["value"], -int(k)) for k, g in per_k.items()
              if g["overall"]["speedup"]["value"] is not None]
    return -max(scored)[1] if scored else None


# ----------------------------------------------------------------------------------------------- the run

def smoke_model(tc: Toolchain, gguf: Path, spec: SmokeSpec, log_dir: Path, progress: ProgressFn = no_progress,
                suite: Sequence[Prompt] | None = None, *, log_prefix: str | None = None,
                server_args: Sequence[str] = (), mtp_args: Sequence[str] = (), model_sha256: str | None = None,
                spec_source: str | None = None, start_timeout: float = 300.0, request_timeout: float = 600.0) -> dict:
    """Measure one GGUF: a vanilla server, then one draft-mtp server per k; return the receipt body.

    `server_args` go to every server, `mtp_args` only to the draft-mtp ones (e.g. --spec-synth-rates for tests).
    """
    gguf = Path(gguf)
    if not gguf.is_file():
        raise UsageError(f"{gguf}: no such GGUF file")
    started = time.monotonic()
    suite_info, full = _suite_info(suite)
    prompts = select_prompts(full, spec.prompts)
    seeds = list(spec.seeds)
    ks = list(spec.draft_n_max)
    modes = ["chat", "raw"] if spec.raw else ["chat"]
    reqs = _requests(prompts, seeds, spec.max_tokens, spec.raw)
    prefix = log_prefix or f"smoke-{gguf.stem}"
    servers = [("vanilla", None)] + [(f"k{k}", k) for k in ks]
    total = len(reqs) * len(servers) + 2 * len(spec.context_sweep)
    label = f"smoke {gguf.name}"
    done = 0
    progress(label, done, total)

    def make(name: str, k: int | None, ctx: int) -> LlamaServer:
        return LlamaServer(tc, gguf, Path(log_dir) / f"{prefix}-{name}.log", spec_type=SPEC_TYPE if k else None,
                           draft_n_max=k, ctx=ctx, threads=spec.threads, gpu_layers=spec.gpu_layers,
                           extra_args=[*server_args, *(mtp_args if k else ())], start_timeout=start_timeout,
                           request_timeout=request_timeout)

    server_recs: list[dict] = []
    runs: list[dict] = []
    warm = chat_body(prompts[0], seeds[0], WARMUP_TOKENS)
    for name, k in servers:
        with make(name, k, spec.ctx) as srv:
            server_recs.append(_server_rec(srv, name, k))
            srv.post(CHAT, warm)
            before = srv.metrics()
            for req in reqs:
                rec, before = _send(srv, req, name, before)
                runs.append(rec)
                done += 1
                progress(label, done, total)

    results = summarize(runs, ks, seeds, modes)
    best = results["chat"]["best_k"]
    result = {
        "model": {"file": gguf.name, "sha256": model_sha256, "bytes": gguf.stat().st_size},
        "toolchain": tc.describe(),
        "suite": {**suite_info, "selected": [p.id for p in prompts],
                  "categories": {c: sum(p.category == c for p in prompts) for c in CATEGORIES}},
        "settings": {
            "endpoints": {m: MODES[m] for m in modes}, "max_tokens": spec.max_tokens, "seeds": seeds,
            "draft_n_max": ks, "spec_type": SPEC_TYPE, "ctx": spec.ctx, "threads": spec.threads,
            "gpu_layers": spec.gpu_layers, "sampling": dict(SAMPLING), "cache_prompt": False,
            "warmup": {"endpoint": CHAT, "body": warm},
            "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "rng": "numpy.random.default_rng",
                          "rng_seed": BOOTSTRAP_SEED, "interval": "percentile", "level": LEVEL,
                          "unit": "prompt (its seeds resampled together)"},
            "spec": spec_json(spec), "spec_source": spec_source,
        },
        "servers": server_recs,
        "requests": [{"id": r.id, "endpoint": r.endpoint, "body": r.body} for r in reqs],
        "runs": runs,
        "results": results,
        "best_k": best,
        "headline": _headline(results, best),
        "notes": list(NOTES),
        "method": METHOD,
    }
    if spec.raw and best is not None:
        result["chat_vs_raw"] = {m: {f: results[m]["k"][str(best)]["overall"][f]
                                     for f in ("acceptance", "speedup", "tok_s")} for m in modes}
        result["chat_vs_raw"]["k"] = best
    if spec.context_sweep:
        def tick() -> None:
            nonlocal done
            done += 1
            progress(label, done, total)

        result["context_sweep"] = _context_sweep(make, spec, best, seeds[0], server_recs, tick)
    result["seconds"] = round(time.monotonic() - started, 3)
    if done < total:  # a skipped context sweep
        progress(label, total, total)
    return result


def _server_rec(srv: LlamaServer, name: str, k: int | None) -> dict:
    return {"label": name, "draft_n_max": k, "argv": srv.record_argv(), "log": srv.log_path.name,
            "slots_speculative": [bool(s.get("speculative")) for s in srv.slots_info],
            "startup_seconds": srv.startup_seconds}


def spec_json(spec: SmokeSpec) -> dict:
    """The smoke settings as stored in receipts (and compared on resume)."""
    d = dataclasses.asdict(spec)
    return json.loads(json.dumps(d, default=str))


def _suite_info(suite: Sequence[Prompt] | None) -> tuple[dict, list[Prompt]]:
    if suite is None:
        full = load_suite()
        return {"file": f"mtpquant/data/prompts/{SUITE_PATH.name}", "sha256": sha256_file(SUITE_PATH),
                "prompts": len(full)}, full
    full = list(suite)
    if not full:
        raise UsageError("the prompt suite is empty")
    blob = "\n".join(json.dumps(p.to_json(), sort_keys=True) for p in full).encode()
    return {"file": None, "sha256": sha256_bytes(blob), "prompts": len(full),
            "inline": [p.to_json() for p in full]}, full


def _headline(results: dict, best: int | None) -> dict | None:
    if best is None:
        return None
    g = results["chat"]["k"][str(best)]["overall"]
    return {"mode": "chat", "endpoint": CHAT, "k": best, "acceptance": g["acceptance"],
            "mean_accepted_length": g["mean_accepted_length"], "tok_s": g["tok_s"],
            "vanilla_tok_s": results["chat"]["vanilla"]["overall"]["tok_s"], "speedup": g["speedup"],
            "differs_from_vanilla": g["differs_from_vanilla"], "units": g["units"]}


# ----------------------------------------------------------------------------------------------- long context

def _context_sweep(make, spec: SmokeSpec, k: int | None, seed: int, server_recs: list[dict],
                   tick: Callable[[], None]) -> dict:
    """Acceptance and speedup with long prompts (one request per length and server) at the best k."""
    lengths = sorted(spec.context_sweep)
    if not LONG_TEXT_PATH.is_file():
        return {"skipped": f"mtpquant/data/long/{LONG_TEXT_PATH.name} is not in this installation"}
    if k is None:
        return {"skipped": "no best k (no speedup could be measured)"}
    text = LONG_TEXT_PATH.read_text(encoding="utf-8")
    ctx = max(spec.ctx, lengths[-1] + spec.max_tokens + LONG_RESERVE)
    rows: dict[int, dict] = {L: {"prompt_tokens_target": L} for L in lengths}
    bodies: dict[int, dict] = {}
    for name, kk in (("long-vanilla", None), (f"long-k{k}", k)):
        with make(name, kk, ctx) as srv:
            server_recs.append(_server_rec(srv, name, kk))
            if not bodies:
                tokens = srv.tokenize(text)
                for L in lengths:
                    if L - LONG_RESERVE > len(tokens):
                        rows[L]["skipped"] = f"the long text has only {len(tokens)} tokens"
                        continue
                    content = srv.detokenize(tokens[:L - LONG_RESERVE]) + LONG_INSTRUCTION
                    bodies[L] = {"messages": [{"role": "user", "content": content}], "max_tokens": spec.max_tokens,
                                 **SAMPLING, "seed": seed, "cache_prompt": False, "stream": False}
            srv.post(CHAT, {**bodies[min(bodies)], "max_tokens": WARMUP_TOKENS} if bodies else {
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": WARMUP_TOKENS, **SAMPLING})
            before = srv.metrics()
            for L in lengths:
                if L not in bodies:
                    tick()
                    continue
                p = Prompt(f"long-{L}", "general", (("user", "…"),), "…")
                rec, before = _send(srv, _Request(f"long/{L}/{seed}", "chat", p, seed, bodies[L]), name, before)
                rows[L]["vanilla" if kk is None else "mtp"] = rec
                tick()
    out_rows = []
    for L in lengths:
        row = rows[L]
        if "skipped" in row:
            out_rows.append(row)
            continue
        v, m = row["vanilla"], row["mtp"]
        out_rows.append({
            "prompt_tokens_target": L, "prompt_tokens": m["timings"].get("prompt_n"),
            "draft_n": m["draft_n"], "draft_n_accepted": m["draft_n_accepted"],
            "acceptance": _r(m["draft_n_accepted"] / m["draft_n"]) if m["draft_n"] else None,
            "tok_s": _r(m["timings"]["predicted_per_second"], 2),
            "vanilla_tok_s": _r(v["timings"]["predicted_per_second"], 2),
            "speedup": _r(m["timings"]["predicted_per_second"] / max(v["timings"]["predicted_per_second"], 1e-9)),
            "differs_from_vanilla": v["text"] != m["text"],
            "request_body": {**{k2: v2 for k2, v2 in bodies[L].items() if k2 != "messages"},
                             "messages": "elided: the first prompt_tokens_target - "
                                         f"{LONG_RESERVE} tokens of {LONG_TEXT_PATH.name} (/tokenize, /detokenize) "
                                         f"followed by {LONG_INSTRUCTION.strip()!r}",
                             "content_sha256": sha256_bytes(bodies[L]["messages"][0]["content"].encode())},
        })
    return {"k": k, "seed": seed, "ctx": ctx, "text": f"mtpquant/data/long/{LONG_TEXT_PATH.name}",
            "text_sha256": sha256_file(LONG_TEXT_PATH), "requests_per_length": 1, "rows": out_rows}


# ----------------------------------------------------------------------------------------------- gates

def gates_for(spec: SmokeSpec, tag: str) -> Gates:
    """The recipe's global gates, overridden field by field by the variant's own."""
    g = spec.gates
    v = spec.variant_gates.get(tag)
    if v is None:
        return g
    return Gates(min_acceptance=v.min_acceptance if v.min_acceptance is not None else g.min_acceptance,
                 min_speedup=v.min_speedup if v.min_speedup is not None else g.min_speedup)


def gate_report(result: dict, gates: Gates) -> dict:
    """Each gate against the headline figure (chat, best k): gate, value, CI, passed."""
    h = result.get("headline") or {}
    checks = {}
    for name, field in (("min_acceptance", "acceptance"), ("min_speedup", "speedup")):
        gate = getattr(gates, name)
        if gate is None:
            continue
        fig = h.get(field) or {"value": None, "ci95": None}
        value = fig.get("value")
        checks[name] = {"gate": gate, "figure": field, "value": value, "ci95": fig.get("ci95"),
                        "passed": value is not None and value >= gate}
    return {"mode": h.get("mode", "chat"), "k": h.get("k"), "checks": checks,
            "passed": all(c["passed"] for c in checks.values())}


def check_gates(result: dict, gates: Gates, tag: str) -> None:
    """Raise GateError naming the variant, the figure, its CI and the gate for every gate not met."""
    report = gate_report(result, gates)
    failures = []
    for name, c in report["checks"].items():
        if c["passed"]:
            continue
        unit = "x" if c["figure"] == "speedup" else ""
        what = "MTP acceptance" if c["figure"] == "acceptance" else "decode speedup"
        where = f"chat, k={report['k']}" if report["k"] is not None else "no draft-mtp measurement"
        if c["value"] is None:
            failures.append(f"variant {tag}: {what} could not be measured ({where}); gate {name} {c['gate']:g}{unit}")
            continue
        ci = f"95% CI {c['ci95'][0]:.3f}-{c['ci95'][1]:.3f}{unit}" if c["ci95"] else "no CI"
        failures.append(f"variant {tag}: {what} {c['value']:.3f}{unit} ({ci}; {where}) is below the gate "
                        f"{name} {c['gate']:g}{unit}")
    if failures:
        raise GateError("; ".join(failures), f"the figures are in receipts/smoke-{tag}.json")


# ----------------------------------------------------------------------------------------------- run directories

def run_artifacts(run: RunDir) -> list[Artifact]:
    """The model files a run directory lists in SHA256SUMS (imatrix files excluded), with their variant tags."""
    return run.artifacts()


def run_spec(run: RunDir) -> tuple[SmokeSpec, str]:
    """The smoke settings of the recipe that built the run (with its gates), or the defaults."""
    recipe_path = run.read_manifest().get("recipe")
    if not recipe_path:
        return SmokeSpec(enabled=True), "defaults"
    if not Path(recipe_path).is_file():
        return SmokeSpec(enabled=True), f"defaults (the run's recipe {recipe_path} is gone: no gates)"

    # A recipe that no longer validates is an error, not a reason to drop its gates silently.
    return dataclasses.replace(rcp.load(Path(recipe_path)).smoke, enabled=True), f"recipe {recipe_path}"


def smoke_run(tc: Toolchain, run: RunDir, spec: SmokeSpec, progress: ProgressFn = no_progress,
              suite: Sequence[Prompt] | None = None, artifacts: Sequence[Artifact] | None = None,
              **kwargs) -> dict[str, dict]:
    """Smoke every model of a run directory, write receipts/smoke-<variant>.json, then enforce the gates.

    Every receipt is written (with its gate report) before a GateError names all variants below a gate.
    """
    run.ensure()
    results: dict[str, dict] = {}
    failures: list[GateError] = []
    for art in artifacts if artifacts is not None else run_artifacts(run):
        result = smoke_model(tc, art.path, spec, run.logs, progress, suite, log_prefix=f"smoke-{art.variant}",
                             model_sha256=art.sha256, **kwargs)
        gates = gates_for(spec, art.variant)
        result["gates"] = gate_report(result, gates)
        run.write_receipt("smoke", result, tag=art.variant)
        results[art.variant] = result
        try:
            check_gates(result, gates, art.variant)
        except GateError as exc:
            failures.append(exc)
    if failures:
        raise GateError("; ".join(f.message for f in failures), failures[0].hint if len(failures) == 1
                        else "the figures are in receipts/smoke-<variant>.json")
    return results
