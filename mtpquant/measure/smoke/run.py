"""One smoke run: a vanilla llama-server, then one draft-mtp server per k, every request on each; the receipt body."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import ServerError, UsageError
from mtpquant.core.machine import describe as describe_machine
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.llamacpp.server import LlamaServer, Placement
from mtpquant.llamacpp.toolchain import Toolchain
from mtpquant.measure.smoke.aggregate import summarize, timed
from mtpquant.measure.smoke.context import MakeServer, check_context, context_sweep, sweep_requests
from mtpquant.measure.smoke.requests import (
    CHAT,
    MODES,
    SAMPLING,
    Request,
    build_requests,
    chat_body,
    send,
    server_record,
)
from mtpquant.measure.smoke.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, LEVEL, MIN_UNITS
from mtpquant.measure.smoke.suite import CATEGORIES, Prompt, select_prompts, suite_info
from mtpquant.recipe import SmokeSpec

SPEC_TYPE = "draft-mtp"

NOTES = (
    ("Sampling is greedy (temperature 0, top_k 1): the seed does not change the output, so seeds repeat each "
     "measurement and the per-seed spread is timing noise."),
    ("Per-request speculative fields are never sent: this llama-server ignores them. Every speculative setting is "
     "on the server command line recorded under 'servers'."),
    ("Every server runs with the same explicit placement (-fit off and the same -ngl, -ncmoe, threads, batch, KV "
     "type, flash attention); where the weights went is read from each server's load log ('loaded')."),
    ("All servers are resident at once; each request is sent to every arm back to back, the order of the arms "
     "rotated by one per request, so drift on a shared machine falls on every arm alike ('drift' reports it)."),
    "speedup = geometric mean over prompt x seed units of (MTP tok/s / vanilla tok/s) for the same prompt and seed.",
    ("95% CIs: BCa bootstrap resampling prompts (all seeds of a prompt together: at temperature 0 they are "
     "replicates); fewer than 10 prompts give no interval."),
    ("The best k is chosen on every other prompt (the selection half) and its headline figures come from the "
     "other half, so the choice does not flatter its own figures; gates use a k fixed in advance."),
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
    arms = [("vanilla", None)] + [(f"k{k}", k) for k in ks]
    trained = check_context(gguf, spec)  # before any server starts
    total = (len(reqs) + spec.warmup) * len(arms) + sweep_requests(spec)
    ticker = _Progress(progress, f"smoke {gguf.name}", total)
    make = _server_factory(tc, gguf, spec, Path(log_dir), log_prefix or f"smoke-{gguf.stem}", server_args, mtp_args,
                           start_timeout, request_timeout)
    warm = [chat_body(prompts[i % len(prompts)], seeds[0], spec.max_tokens) for i in range(spec.warmup)]
    server_recs, runs = _measure(make, arms, spec.ctx, reqs, warm, ticker)
    placement = check_placement(server_recs, gguf.name)
    split = split_prompts([p.id for p in prompts])
    results = summarize(runs, ks, seeds, modes, split)
    best = results["chat"]["best_k"]
    result = {
        "model": {"file": gguf.name, "sha256": model_sha256, "bytes": gguf.stat().st_size},
        "toolchain": tc.describe(),
        "machine": describe_machine(),
        "suite": {**info, "selected": [p.id for p in prompts],
                  "categories": {c: sum(p.category == c for p in prompts) for c in CATEGORIES}},
        "settings": _settings(spec, modes, seeds, ks, warm, spec_source),
        "servers": server_recs,
        "placement": placement,
        "order": {"scheme": "all servers resident; every request sent to each arm back to back, arm order rotated "
                            "by one per request", "warmup_requests_per_server": spec.warmup,
                  "arms": [name for name, _ in arms]},
        "drift": drift(runs, [name for name, _ in arms]),
        "split": split,
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
        result["context_sweep"] = context_sweep(make, spec, best, seeds[0], ticker.tick, trained)
    result["seconds"] = round(time.monotonic() - started, 3)
    ticker.finish()
    return result


def _server_factory(tc: Toolchain, gguf: Path, spec: SmokeSpec, log_dir: Path, prefix: str, server_args: Sequence[str],
                    mtp_args: Sequence[str], start_timeout: float, request_timeout: float) -> MakeServer:
    """Servers of this model: vanilla for k None, else draft-mtp with k draft tokens; logs <prefix>-<label>.log."""

    placement = Placement(n_cpu_moe=spec.n_cpu_moe, batch=spec.batch, ubatch=spec.ubatch, kv_type=spec.kv_type,
                          flash_attn=spec.flash_attn)

    def make(name: str, k: int | None, ctx: int) -> LlamaServer:
        return LlamaServer(tc, gguf, log_dir / f"{prefix}-{name}.log",
                           spec_type=SPEC_TYPE if k else None, draft_n_max=k, ctx=ctx, threads=spec.threads,
                           gpu_layers=spec.gpu_layers, placement=placement,
                           extra_args=[*spec.server_args, *server_args, *(mtp_args if k else ())],
                           start_timeout=start_timeout, request_timeout=request_timeout)

    return make


def _measure(make: MakeServer, arms: Sequence[tuple[str, int | None]], ctx: int, reqs: Sequence[Request],
             warm: Sequence[dict], ticker: _Progress) -> tuple[list[dict], list[dict]]:
    """Every request on every arm, all servers up at once, the arms' order rotated per request; each server first
    answers the warm-up requests (full length, not counted). (server records, request records)"""
    runs: list[dict] = []
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(make(name, k, ctx)) for name, k in arms}
        records = [server_record(servers[name], name, k) for name, k in arms]
        for name, _ in arms:
            for body in warm:
                servers[name].post(CHAT, body)
                ticker.tick()
        before = {name: srv.metrics() for name, srv in servers.items()}
        names = [name for name, _ in arms]
        seq = 0
        for i, req in enumerate(reqs):
            for pos, name in enumerate(names[i % len(names):] + names[:i % len(names)]):
                rec, before[name] = send(servers[name], req, name, before[name])
                rec["sequence"], rec["arm_position"] = seq, pos
                seq += 1
                runs.append(rec)
                ticker.tick()
    return records, runs


def split_prompts(ids: Sequence[str]) -> dict:
    """Every other prompt (in suite order) chooses the best k; the rest report its figures."""
    return {"selection": list(ids[0::2]), "report": list(ids[1::2]),
            "rule": "prompts at even positions choose k, those at odd positions report it"}


def drift(runs: Sequence[dict], arms: Sequence[str]) -> dict:
    """Per arm, decode tok/s of its first and second half of timed requests, and their ratio (1.0: no drift)."""
    out = {}
    for name in arms:
        tps = [float(r["timings"]["predicted_per_second"]) for r in runs if r["server"] == name and timed(r)]
        half = len(tps) // 2
        if half == 0:
            out[name] = None
            continue
        first, second = sum(tps[:half]) / half, sum(tps[half:]) / (len(tps) - half)
        out[name] = {"first_half_tok_s": round(first, 2), "second_half_tok_s": round(second, 2),
                     "ratio": round(second / first, 4) if first else None}
    return out


def check_placement(servers: Sequence[dict], model: str) -> dict:
    """The weights went to the same devices, with as many layers offloaded, on every arm; else the smoke fails."""
    seen = {s["label"]: (s["loaded"].get("offloaded"), tuple(sorted(s["loaded"].get("model_mib", {})))) for s in servers}
    if len(set(seen.values())) > 1:
        shown = "; ".join(f"{label}: {off or 'no GPU offload'} on {', '.join(dev) or '?'}"
                          for label, (off, dev) in seen.items())
        raise ServerError(f"smoke of {model}: the servers placed the weights differently ({shown})",
                          "give smoke.gpu_layers / smoke.n_cpu_moe so that every server fits the same way")
    label, (off, dev) = next(iter(seen.items()))
    return {"same": True, "offloaded": off, "devices": list(dev)}


def _settings(spec: SmokeSpec, modes: Sequence[str], seeds: list[int], ks: list[int], warm: dict,
              spec_source: str | None) -> dict:
    return {
        "endpoints": {m: MODES[m] for m in modes}, "max_tokens": spec.max_tokens, "seeds": seeds,
        "draft_n_max": ks, "spec_type": SPEC_TYPE, "ctx": spec.ctx, "threads": spec.threads,
        "gpu_layers": spec.gpu_layers, "sampling": dict(SAMPLING), "cache_prompt": False,
        "warmup": {"endpoint": CHAT, "bodies": list(warm)},
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "rng": "numpy.random.default_rng",
                      "rng_seed": BOOTSTRAP_SEED, "interval": "BCa", "level": LEVEL, "min_units": MIN_UNITS,
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
    """The chosen k's figures on the prompts that did not choose it (all prompts when too few to split)."""
    if best is None:
        return None
    chat = results["chat"]
    g = chat["best"] or chat["k"][str(best)]["overall"]
    return {"mode": "chat", "endpoint": CHAT, "k": best, "chosen_on": chat["best_k_chosen_on"],
            "acceptance": g["acceptance"], "mean_accepted_length": g["mean_accepted_length"],
            "tokens_per_step": g["tokens_per_step"], "tok_s": g["tok_s"], "vanilla_tok_s": g["vanilla_tok_s"],
            "speedup": g["speedup"], "prefill_speedup": g["prefill_speedup"], "e2e_speedup": g["e2e_speedup"],
            "differs_from_vanilla": g["differs_from_vanilla"], "units": g["units"], "prompts": g["prompts"]}
