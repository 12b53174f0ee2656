"""Long-context sweep: acceptance and speedup of the best k with long prompts cut from a shipped text."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mtpquant.core.files import sha256_bytes, sha256_file
from mtpquant.core.paths import DATA_DIR
from mtpquant.llamacpp.server import LlamaServer
from mtpquant.measure.smoke.requests import CHAT, SAMPLING, WARMUP_TOKENS, Request, send, server_record
from mtpquant.measure.smoke.stats import rounded
from mtpquant.measure.smoke.suite import Prompt
from mtpquant.recipe import SmokeSpec

LONG_TEXT_PATH = DATA_DIR / "long" / "long-context-v1.txt"
LONG_RESERVE = 48  # tokens left for the chat template and the instruction after a long prompt
LONG_INSTRUCTION = "\n\nSummarize the text above in one sentence."

# (server label, k or None for vanilla, ctx) -> a server to enter with `with`
MakeServer = Callable[[str, int | None, int], LlamaServer]


def context_sweep(make: MakeServer, spec: SmokeSpec, k: int | None, seed: int, server_recs: list[dict],
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
            server_recs.append(server_record(srv, name, kk))
            if not bodies:
                bodies = _long_bodies(srv, text, lengths, spec.max_tokens, seed, rows)
            srv.post(CHAT, _warmup_body(bodies))
            _measure(srv, name, "vanilla" if kk is None else "mtp", lengths, bodies, seed, rows, tick)
    out_rows = [rows[L] if "skipped" in rows[L] else _row(L, rows[L], bodies[L]) for L in lengths]
    return {"k": k, "seed": seed, "ctx": ctx, "text": f"mtpquant/data/long/{LONG_TEXT_PATH.name}",
            "text_sha256": sha256_file(LONG_TEXT_PATH), "requests_per_length": 1, "rows": out_rows}


def _long_bodies(srv: LlamaServer, text: str, lengths: Sequence[int], max_tokens: int, seed: int,
                 rows: dict[int, dict]) -> dict[int, dict]:
    """A chat body per length: the first L - LONG_RESERVE tokens of the text, then the instruction."""
    bodies: dict[int, dict] = {}
    tokens = srv.tokenize(text)
    for L in lengths:
        if L - LONG_RESERVE > len(tokens):
            rows[L]["skipped"] = f"the long text has only {len(tokens)} tokens"
            continue
        content = srv.detokenize(tokens[:L - LONG_RESERVE]) + LONG_INSTRUCTION
        bodies[L] = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                     **SAMPLING, "seed": seed, "cache_prompt": False, "stream": False}
    return bodies


def _warmup_body(bodies: dict[int, dict]) -> dict:
    if bodies:
        return {**bodies[min(bodies)], "max_tokens": WARMUP_TOKENS}
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": WARMUP_TOKENS, **SAMPLING}


def _measure(srv: LlamaServer, name: str, side: str, lengths: Sequence[int], bodies: dict[int, dict], seed: int,
             rows: dict[int, dict], tick: Callable[[], None]) -> None:
    """One request per length on this server, its record stored under rows[L][side]."""
    before = srv.metrics()
    for L in lengths:
        if L not in bodies:
            tick()
            continue
        p = Prompt(f"long-{L}", "general", (("user", "…"),), "…")
        rec, before = send(srv, Request(f"long/{L}/{seed}", "chat", p, seed, bodies[L]), name, before)
        rows[L][side] = rec
        tick()


def _row(L: int, row: dict, body: dict) -> dict:
    """The receipt row of one length: MTP against vanilla, and the request body with its long content elided."""
    v, m = row["vanilla"], row["mtp"]
    return {
        "prompt_tokens_target": L, "prompt_tokens": m["timings"].get("prompt_n"),
        "draft_n": m["draft_n"], "draft_n_accepted": m["draft_n_accepted"],
        "acceptance": rounded(m["draft_n_accepted"] / m["draft_n"]) if m["draft_n"] else None,
        "tok_s": rounded(m["timings"]["predicted_per_second"], 2),
        "vanilla_tok_s": rounded(v["timings"]["predicted_per_second"], 2),
        "speedup": rounded(m["timings"]["predicted_per_second"] / max(v["timings"]["predicted_per_second"], 1e-9)),
        "differs_from_vanilla": v["text"] != m["text"],
        "request_body": {**{k2: v2 for k2, v2 in body.items() if k2 != "messages"},
                         "messages": "elided: the first prompt_tokens_target - "
                                     f"{LONG_RESERVE} tokens of {LONG_TEXT_PATH.name} (/tokenize, /detokenize) "
                                     f"followed by {LONG_INSTRUCTION.strip()!r}",
                         "content_sha256": sha256_bytes(body["messages"][0]["content"].encode())},
    }
