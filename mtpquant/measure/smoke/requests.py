"""What goes to llama-server and what comes back: request bodies, one timed request with the speculative counters
it moved in /metrics, and the record of a server."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from mtpquant.core.errors import ServerError
from mtpquant.llamacpp.server import LlamaServer
from mtpquant.measure.smoke.suite import Prompt

CHAT = "/v1/chat/completions"
RAW = "/completion"
MODES = {"chat": CHAT, "raw": RAW}
SAMPLING = {"temperature": 0.0, "top_k": 1}  # greedy: MTP output must equal vanilla output up to numerics
WARMUP_TOKENS = 8
DRAFT_TOKENS = "spec_decode_num_draft_tokens_total"
ACCEPTED_TOKENS = "spec_decode_num_accepted_tokens_total"
DRAFT_STEPS = "spec_decode_num_drafts_total"
PER_POSITION = "spec_decode_num_accepted_tokens_per_pos_total{"


def chat_body(p: Prompt, seed: int, max_tokens: int) -> dict:
    """The /v1/chat/completions body of a prompt."""
    return {"messages": p.messages_json(), "max_tokens": max_tokens, **SAMPLING, "seed": seed,
            "cache_prompt": False, "stream": False}


def raw_body(p: Prompt, seed: int, max_tokens: int) -> dict:
    """The /completion body of a prompt's raw text."""
    return {"prompt": p.prompt, "n_predict": max_tokens, **SAMPLING, "seed": seed, "cache_prompt": False,
            "stream": False}


@dataclass(frozen=True)
class Request:
    """One request of the run: `<mode>/<prompt id>/<seed>`, its endpoint and exact body."""

    id: str
    mode: str
    prompt: Prompt
    seed: int
    body: dict

    @property
    def endpoint(self) -> str:
        return MODES[self.mode]


def build_requests(prompts: Sequence[Prompt], seeds: Sequence[int], max_tokens: int, raw: bool) -> list[Request]:
    """Every (mode, prompt, seed): chat, then raw when asked."""
    out = []
    for mode in ("chat", "raw") if raw else ("chat",):
        make = chat_body if mode == "chat" else raw_body
        for p in prompts:
            for s in seeds:
                out.append(Request(f"{mode}/{p.id}/{s}", mode, p, s, make(p, s, max_tokens)))
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
        if key.startswith(PER_POSITION):
            out[int(key.split('"')[1])] = v
    return out


def _draft_steps(before: dict, after: dict, draft_n: int, accepted: int) -> tuple[int | None, list[int] | None]:
    """(verification steps, accepted per position) from the /metrics deltas of one request, or (None, None)."""

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    if int(delta(DRAFT_TOKENS)) != draft_n or int(delta(ACCEPTED_TOKENS)) != accepted:
        return None, None  # the counters do not belong to this request alone
    pa, pb = _per_pos(after), _per_pos(before)
    return int(delta(DRAFT_STEPS)), [int(pa[i] - pb.get(i, 0)) for i in sorted(pa)]


def send(srv: LlamaServer, req: Request, server_label: str, before: dict) -> tuple[dict, dict]:
    """Post one request; its record (timings, draft counts, text) and the /metrics after it."""
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
    steps, per_pos = _draft_steps(before, after, draft_n, accepted) if srv.speculative else (None, None)
    rec = {"server": server_label, "request": req.id, "mode": req.mode, "prompt": req.prompt.id,
           "category": req.prompt.category, "seed": req.seed, "timings": timings, "draft_n": draft_n,
           "draft_n_accepted": accepted, "draft_steps": steps, "accepted_per_position": per_pos,
           "finish_reason": finish, "text": text, "wall_seconds": round(wall, 4)}
    return rec, after


def server_record(srv: LlamaServer, name: str, k: int | None) -> dict:
    """A started server as the receipt lists it: label, k, exact argv, log, which slots speculate, start-up time."""
    return {"label": name, "draft_n_max": k, "argv": srv.record_argv(), "log": srv.log_path.name,
            "slots_speculative": [bool(s.get("speculative")) for s in srv.slots_info],
            "startup_seconds": srv.startup_seconds, "loaded": srv.loaded}
