"""One smoke run: a vanilla llama-server, then one draft-mtp server per k, every request on each; the receipt body."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import UsageError
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.llamacpp.server import LlamaServer
from mtpquant.llamacpp.toolchain import Toolchain
from mtpquant.measure.smoke.aggregate import summarize
from mtpquant.measure.smoke.context import MakeServer, context_sweep
from mtpquant.measure.smoke.requests import (
    CHAT,
    MODES,
    SAMPLING,
    WARMUP_TOKENS,
    Request,
    build_requests,
    chat_body,
    send,
    server_record,
)
from mtpquant.measure.smoke.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, LEVEL
from mtpquant.measure.smoke.suite import CATEGORIES, Prompt, select_prompts, suite_info
from mtpquant.recipe import SmokeSpec

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


@dataclass
class _Progress:
    """progress(label, done, total) after each request, starting at 0 of total."""

    report: ProgressFn
    label: str
    total: int
    done: int = 0

    def __post_init__(self) -> None:
        self.report(self.label, self.done, self.total)

    def tick(self) -> None:
        self.done += 1
        self.report(self.label, self.done, self.total)

    def finish(self) -> None:
        if self.done < self.total:  # a skipped context sweep
            self.report(self.label, self.total, self.total)


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
    info, full = suite_info(suite)
    prompts = select_prompts(full, spec.prompts)
    seeds, ks = list(spec.seeds), list(spec.draft_n_max)
    modes = ["chat", "raw"] if spec.raw else ["chat"]
    reqs = build_requests(prompts, seeds, spec.max_tokens, spec.raw)
    servers = [("vanilla", None)] + [(f"k{k}", k) for k in ks]
    ticker = _Progress(progress, f"smoke {gguf.name}", len(reqs) * len(servers) + 2 * len(spec.context_sweep))
    make = _server_factory(tc, gguf, spec, Path(log_dir), log_prefix or f"smoke-{gguf.stem}", server_args, mtp_args,
                           start_timeout, request_timeout)
    warm = chat_body(prompts[0], seeds[0], WARMUP_TOKENS)
    server_recs, runs = _measure(make, servers, spec.ctx, reqs, warm, ticker)
    results = summarize(runs, ks, seeds, modes)
    best = results["chat"]["best_k"]
    result = {
        "model": {"file": gguf.name, "sha256": model_sha256, "bytes": gguf.stat().st_size},
        "toolchain": tc.describe(),
        "suite": {**info, "selected": [p.id for p in prompts],
                  "categories": {c: sum(p.category == c for p in prompts) for c in CATEGORIES}},
        "settings": _settings(spec, modes, seeds, ks, warm, spec_source),
        "servers": server_recs,
        "requests": [{"id": r.id, "endpoint": r.endpoint, "body": r.body} for r in reqs],
        "runs": runs,
        "results": results,
        "best_k": best,
        "headline": _headline(results, best),
        "notes": list(NOTES),
    }
    if spec.raw and best is not None:
        result["chat_vs_raw"] = _chat_vs_raw(results, modes, best)
    if spec.context_sweep:
        result["context_sweep"] = context_sweep(make, spec, best, seeds[0], server_recs, ticker.tick)
    result["seconds"] = round(time.monotonic() - started, 3)
    ticker.finish()
    return result


def _server_factory(tc: Toolchain, gguf: Path, spec: SmokeSpec, log_dir: Path, prefix: str, server_args: Sequence[str],
                    mtp_args: Sequence[str], start_timeout: float, request_timeout: float) -> MakeServer:
    """Servers of this model: vanilla for k None, else draft-mtp with k draft tokens; logs <prefix>-<label>.log."""

    def make(name: str, k: int | None, ctx: int) -> LlamaServer:
        return LlamaServer(tc, gguf, log_dir / f"{prefix}-{name}.log",
                           spec_type=SPEC_TYPE if k else None, draft_n_max=k, ctx=ctx, threads=spec.threads,
                           gpu_layers=spec.gpu_layers, extra_args=[*server_args, *(mtp_args if k else ())],
                           start_timeout=start_timeout, request_timeout=request_timeout)

    return make


def _measure(make: MakeServer, servers: Sequence[tuple[str, int | None]], ctx: int, reqs: Sequence[Request],
             warm: dict, ticker: _Progress) -> tuple[list[dict], list[dict]]:
    """Every request on every server, each server warmed up first; (server records, request records)."""
    server_recs: list[dict] = []
    runs: list[dict] = []
    for name, k in servers:
        with make(name, k, ctx) as srv:
            server_recs.append(server_record(srv, name, k))
            srv.post(CHAT, warm)
            before = srv.metrics()
            for req in reqs:
                rec, before = send(srv, req, name, before)
                runs.append(rec)
                ticker.tick()
    return server_recs, runs


def _settings(spec: SmokeSpec, modes: Sequence[str], seeds: list[int], ks: list[int], warm: dict,
              spec_source: str | None) -> dict:
    return {
        "endpoints": {m: MODES[m] for m in modes}, "max_tokens": spec.max_tokens, "seeds": seeds,
        "draft_n_max": ks, "spec_type": SPEC_TYPE, "ctx": spec.ctx, "threads": spec.threads,
        "gpu_layers": spec.gpu_layers, "sampling": dict(SAMPLING), "cache_prompt": False,
        "warmup": {"endpoint": CHAT, "body": warm},
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "rng": "numpy.random.default_rng",
                      "rng_seed": BOOTSTRAP_SEED, "interval": "percentile", "level": LEVEL,
                      "unit": "prompt (its seeds resampled together)"},
        "spec": spec_json(spec), "spec_source": spec_source,
    }


def spec_json(spec: SmokeSpec) -> dict:
    """The smoke settings as stored in receipts (and compared on resume)."""
    d = dataclasses.asdict(spec)
    return json.loads(json.dumps(d, default=str))


def _chat_vs_raw(results: dict, modes: Sequence[str], best: int) -> dict:
    out = {m: {f: results[m]["k"][str(best)]["overall"][f] for f in ("acceptance", "speedup", "tok_s")}
           for m in modes}
    out["k"] = best
    return out


def _headline(results: dict, best: int | None) -> dict | None:
    if best is None:
        return None
    g = results["chat"]["k"][str(best)]["overall"]
    return {"mode": "chat", "endpoint": CHAT, "k": best, "acceptance": g["acceptance"],
            "mean_accepted_length": g["mean_accepted_length"], "tok_s": g["tok_s"],
            "vanilla_tok_s": results["chat"]["vanilla"]["overall"]["tok_s"], "speedup": g["speedup"],
            "differs_from_vanilla": g["differs_from_vanilla"], "units": g["units"]}
