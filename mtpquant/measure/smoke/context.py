"""The context sweep: decode, prefill, time to first token and end-to-end time of every arm per context length.

Per length L every arm (vanilla, draft-mtp at the chosen k, optionally k=1) runs in its own llama-server with
`-c L`, all resident at once. Each long document (longtext.py), cut so that its prompt fills L less the output
and a reserve, goes to every arm back to back, the arms' order rotated per document. Figures are over documents
(the unit the bootstrap resamples), with the smoke's rules for intervals; each server's memory comes from the
buffer sizes its load log prints.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mtpquant.core.errors import UsageError
from mtpquant.llamacpp.server import LlamaServer
from mtpquant.measure.smoke.aggregate import MIN_TIMED_TOKENS, e2e_ms, timed
from mtpquant.measure.smoke.longtext import Document, LongSource, documents, documents_source, stdlib_source
from mtpquant.measure.smoke.requests import CHAT, SAMPLING, Request, send, server_record
from mtpquant.measure.smoke.stats import figure, geomean_ratio, mean, ratio_of_sums
from mtpquant.measure.smoke.suite import Prompt
from mtpquant.modelfile.header import field_int, field_value, read_header
from mtpquant.recipe import SmokeSpec

METHOD = 2  # 1: one request per length from a shipped 9k-token text; 2: this module
RESERVE = 64  # tokens of each length left for the chat template around the prompt
MIN_BODY = 16  # a length must leave at least this many tokens of document after the output and the reserve
WARMUP_PROMPT = 1024  # tokens of a warm-up prompt at most: it warms decoding, it is not a second long prefill
UNIT = "documents"

# (server label, k or None for vanilla, ctx) -> a server to enter with `with`
MakeServer = Callable[[str, int | None, int], LlamaServer]

NOTES = (
    ("Context length L is the server's -c; each prompt is a document's first tokens (counted by the server's "
    "/tokenize) so that prompt, chat template and output fill L less a reserve."),
    ("Every arm of a length is resident at once; each document goes to every arm back to back, the arms' order "
    "rotated by one per document."),
    (f"Speed figures use documents on which every arm ran to max_tokens with at least {MIN_TIMED_TOKENS} tokens; "
    "acceptance counts every document."),
    "95% CIs: BCa bootstrap resampling documents; fewer than 10 documents give no interval.",
    ("Memory: the buffer sizes each server's load log prints (model weights, KV cache, recurrent state, output and "
    "compute buffers), per device."),
)


def trained_context(gguf: Path) -> tuple[str, int | None]:
    """(`<arch>.context_length`, its value or None) from the model's GGUF header."""
    header = read_header(Path(gguf))
    key = f"{field_value(header, 'general.architecture')}.context_length"
    return key, field_int(header, key, None, 1, 1 << 31)


def check_context(gguf: Path, spec: SmokeSpec) -> dict | None:
    """Refuse, before any server starts, a sweep length the model was not trained for or that leaves no room for a
    prompt, and long documents that cannot be read as text; the trained context for the receipt."""
    if not spec.context_sweep:
        return None
    _source(spec)
    key, trained = trained_context(gguf)
    longest, shortest = max(spec.context_sweep), min(spec.context_sweep)
    if trained is not None and longest > trained:
        raise UsageError(f"{Path(gguf).name}: context sweep length {longest} is longer than the {trained} tokens the "
                         f"model was trained for ({key})", f"use lengths up to {trained}")
    floor = spec.max_tokens + RESERVE + MIN_BODY
    if shortest < floor:
        raise UsageError(f"context sweep length {shortest} leaves no room for a prompt after {spec.max_tokens} "
                         f"output tokens and {RESERVE} for the chat template", f"use lengths of at least {floor}")
    return {"key": key, "tokens": trained}


def sweep_arms(spec: SmokeSpec, k: int) -> list[tuple[str, int | None]]:
    """(label, k) of every arm: vanilla, the chosen k, and k=1 when asked for and not already chosen."""
    arms = [("vanilla", None), (f"k{k}", k)]
    return arms + [("k1", 1)] if spec.context_k1 and k != 1 else arms


def sweep_requests(spec: SmokeSpec, k: int = 2) -> int:
    """How many requests the sweep sends (warm-ups included), for a progress bar."""
    docs = len(spec.long_documents) or spec.context_documents
    return len(spec.context_sweep) * len(sweep_arms(spec, k)) * (docs + spec.warmup)


def _source(spec: SmokeSpec) -> LongSource:
    return documents_source(spec.long_documents) if spec.long_documents else stdlib_source()


def context_sweep(make: MakeServer, spec: SmokeSpec, k: int | None, seed: int, tick: Callable[[], None],
                  trained: dict | None = None) -> dict:
    """Every arm at every length of spec.context_sweep on the same long documents; the receipt's context_sweep."""
    lengths = sorted(spec.context_sweep)
    base = {"method": METHOD, "lengths": lengths, "trained_context": trained}
    if k is None:
        return {**base, "skipped": "no best k (no speedup could be measured)"}
    arms = sweep_arms(spec, k)
    src = _source(spec)
    count = len(src.files) if src.kind == "documents" else spec.context_documents
    docs: list[Document] = []
    state = {"prompts": [], "requests": [], "servers": [], "warmup": None, "sequence": 0}
    rows = []
    for L in lengths:
        with contextlib.ExitStack() as stack:
            servers = {name: stack.enter_context(make(f"long{L}-{name}", kk, L)) for name, kk in arms}
            for name, kk in arms:
                state["servers"].append({**server_record(servers[name], f"long{L}-{name}", kk), "arm": name,
                                         "ctx": L, "memory": measured_memory(servers[name].log_path)})
            tok = servers["vanilla"]
            if not docs:
                docs = documents(src, count, lengths[-1], tok.tokenize)
            if state["warmup"] is None:
                state["warmup"] = _warmup(tok, docs, min(lengths[0], WARMUP_PROMPT + spec.max_tokens + RESERVE),
                                          spec, seed)
            bodies, skipped = _bodies(tok, docs, L, spec, seed, state)
            _warm(servers, arms, spec, state["warmup"], tick)
            recs = _measure(servers, arms, L, bodies, seed, state, tick)
        for _ in range(len(docs) - len(bodies)):
            for _arm in arms:
                tick()  # documents too short for this length
        rows.append(_row(L, arms, recs, skipped))
    used = {f for p in state["prompts"] for f in p["files"]}
    files = {f: sha for d in docs for f, _, sha in d.files if f in used}
    return {
        **base, "k": k, "seed": seed, "arms": [{"label": name, "draft_n_max": kk} for name, kk in arms],
        "max_tokens": spec.max_tokens, "reserve_tokens": RESERVE, "documents_per_length": count,
        "source": src.describe(),
        "file_sha256": {p: files[p] for p in sorted(files)},
        "body": {"endpoint": CHAT, "messages": [{"role": "user", "content": "<prompts[].content_sha256>"}],
                 "max_tokens": spec.max_tokens, **SAMPLING, "seed": seed, "cache_prompt": False, "stream": False},
        "order": {"scheme": "per length, every arm resident; each document sent to every arm back to back, the "
                            "arms' order rotated by one per document", "warmup_requests_per_server": spec.warmup,
                  "warmup_prompt": {key: v for key, v in state["warmup"].items() if key != "body"}
                  if state["warmup"] else None},
        "servers": state["servers"], "prompts": state["prompts"], "requests": state["requests"], "rows": rows,
        "notes": list(NOTES),
    }


def _body(tok: LlamaServer, d: Document, L: int, spec: SmokeSpec, seed: int) -> tuple[dict, dict] | str:
    """(request body, what the receipt says about its prompt) of document d cut for length L, or why it cannot be."""
    n_body = L - spec.max_tokens - RESERVE - len(tok.tokenize(d.preface + d.question))
    if n_body > len(d.tokens) or n_body < MIN_BODY:
        return f"it holds {len(d.tokens)} tokens, {n_body} needed"
    content, meta = d.prompt(n_body, tok.detokenize)
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": spec.max_tokens, **SAMPLING,
            "seed": seed, "cache_prompt": False, "stream": False}
    return body, {"ctx": L, **meta, "content_tokens": len(tok.tokenize(content))}


def _bodies(tok: LlamaServer, docs: Sequence[Document], L: int, spec: SmokeSpec, seed: int,
            state: dict) -> tuple[list[tuple[str, int, dict]], list[dict]]:
    """(prompt id, document, request body) of every document long enough for length L; the skipped ones."""
    out, skipped = [], []
    for d in docs:
        got = _body(tok, d, L, spec, seed)
        if isinstance(got, str):
            skipped.append({"document": d.index, "reason": got})
            continue
        pid = f"long/{L}/d{d.index}"
        state["prompts"].append({"id": pid, **got[1]})
        out.append((pid, d.index, got[0]))
    return out, skipped


def _warmup(tok: LlamaServer, docs: Sequence[Document], L: int, spec: SmokeSpec, seed: int) -> dict | None:
    """The warm-up request: the first document that fits, cut for a short context, full output length."""
    for d in docs:
        got = _body(tok, d, L, spec, seed)
        if not isinstance(got, str):
            return {"prompt": f"warmup/{L}/d{d.index}", **got[1], "body": got[0]}
    return None


def _warm(servers: dict, arms: Sequence[tuple[str, int | None]], spec: SmokeSpec, warmup: dict | None,
          tick: Callable[[], None]) -> None:
    """spec.warmup uncounted requests per server."""
    for name, _ in arms:
        for _ in range(spec.warmup):
            if warmup is not None:
                servers[name].post(CHAT, warmup["body"])
            tick()


def _measure(servers: dict, arms: Sequence[tuple[str, int | None]], L: int, bodies: Sequence[tuple[str, int, dict]],
             seed: int, state: dict, tick: Callable[[], None]) -> list[dict]:
    """Every document on every arm back to back, the arms' order rotated by one per document."""
    names = [name for name, _ in arms]
    before = {name: srv.metrics() for name, srv in servers.items()}
    recs = []
    for j, (pid, doc, body) in enumerate(bodies):
        prompt = Prompt(pid, "general", (("user", f"<{pid}>"),), f"<{pid}>")
        for pos, name in enumerate(names[j % len(names):] + names[:j % len(names)]):
            rec, before[name] = send(servers[name], Request(pid, "chat", prompt, seed, body), f"long{L}-{name}",
                                     before[name])
            rec.update(arm=name, ctx=L, document=doc, sequence=state["sequence"], arm_position=pos)
            state["sequence"] += 1
            state["requests"].append(rec)
            recs.append(rec)
            tick()
    return recs


def _t(recs: Sequence[dict], key: str) -> np.ndarray:
    return np.array([float(r["timings"][key]) for r in recs], dtype=float)


def _fig(stat, arrays, units: Sequence, digits: int = 4) -> dict:
    """stats.figure over documents (one unit each), its note in documents rather than prompts."""
    out = figure(stat, arrays, digits, clusters=list(units))
    if out.get("note"):
        out["note"] = out["note"].replace("prompts", UNIT)
    return out


def _row(L: int, arms: Sequence[tuple[str, int | None]], recs: Sequence[dict], skipped: list[dict]) -> dict:
    """The figures of one length: per arm over the documents, MTP arms paired with vanilla document by document."""
    by = {(r["arm"], r["document"]): r for r in recs}
    docs = sorted({r["document"] for r in recs})
    ok = [d for d in docs if all(timed(by[(name, d)]) for name, _ in arms)]
    van = [by[("vanilla", d)] for d in ok]
    row = {"ctx": L, "documents": len(docs), "timed_documents": len(ok), "skipped_documents": skipped,
           "prompt_tokens": _fig(mean, (_t([by[("vanilla", d)] for d in docs], "prompt_n"),), docs, 1),
           "arms": {}}
    for name, kk in arms:
        rs = [by[(name, d)] for d in ok]
        fig = {"decode_tok_s": _fig(mean, (_t(rs, "predicted_per_second"),), ok, 2),
               "prefill_tok_s": _fig(mean, (_t(rs, "prompt_per_second"),), ok, 1),
               "ttft_ms": _fig(mean, (_t(rs, "prompt_ms"),), ok, 1),
               "e2e_ms": _fig(mean, (np.array([e2e_ms(r) for r in rs]),), ok, 1)}
        if kk is not None:
            every = [by[(name, d)] for d in docs]
            dn = np.array([r["draft_n"] for r in every], dtype=float)
            acc = np.array([r["draft_n_accepted"] for r in every], dtype=float)
            fig.update({
                "draft_n": int(dn.sum()), "draft_n_accepted": int(acc.sum()),
                "acceptance": _fig(ratio_of_sums, (acc, dn), docs),
                "decode_speedup": _fig(geomean_ratio, (_t(rs, "predicted_per_second"),
                                                       _t(van, "predicted_per_second")), ok),
                "prefill_speedup": _fig(geomean_ratio, (_t(rs, "prompt_per_second"), _t(van, "prompt_per_second")),
                                        ok),
                "e2e_speedup": _fig(geomean_ratio, (np.array([e2e_ms(r) for r in van]),
                                                    np.array([e2e_ms(r) for r in rs])), ok),
                "differs_from_vanilla": sum(1 for d in docs if by[(name, d)]["text"] != by[("vanilla", d)]["text"]),
            })
        row["arms"][name] = fig
    return row


# "load_tensors:   CUDA0 model buffer size =  1234.56 MiB", "llama_kv_cache:  CPU KV buffer size = ...", ...
_BUFFER_RE = re.compile(r"(\S+)\s+(model|KV|RS|compute|output) buffer size =\s+([\d.]+) MiB")


def measured_memory(log_path: Path) -> dict:
    """MiB per device from a llama-server load log: weights, plus per context its KV, recurrent-state and output
    buffers and its largest compute buffer (a context that reserves again reuses its buffer)."""
    try:
        text = Path(log_path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {"per_device_mib": {}, "total_mib": None, "contexts": [], "model_mib": {}}
    model: dict[str, float] = {}
    contexts: list[dict[str, float]] = []
    for line in text.splitlines():
        if "constructing llama_context" in line:
            contexts.append({})
            continue
        m = _BUFFER_RE.search(line)
        if not m:
            continue
        device, kind, mib = m.group(1), m.group(2), float(m.group(3))
        if kind == "model":
            model[device] = model.get(device, 0.0) + mib
            continue
        if not contexts:
            contexts.append({})
        ctx, key = contexts[-1], f"{kind}:{device}"
        ctx[key] = max(ctx.get(key, 0.0), mib) if kind == "compute" else ctx.get(key, 0.0) + mib
    per_device = dict(model)
    for ctx in contexts:
        for key, mib in ctx.items():
            dev = key.split(":", 1)[1]
            per_device[dev] = per_device.get(dev, 0.0) + mib
    return {"per_device_mib": {d: round(v, 2) for d, v in sorted(per_device.items())},
            "total_mib": round(sum(per_device.values()), 2) if per_device else None,
            "model_mib": {d: round(v, 2) for d, v in sorted(model.items())},
            "contexts": [{k: round(v, 2) for k, v in c.items()} for c in contexts]}
