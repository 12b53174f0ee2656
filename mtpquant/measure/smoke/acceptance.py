"""MTP acceptance only: one draft-mtp llama-server, several slots answering concurrent greedy requests.

Acceptance is sum(draft_n_accepted) / sum(draft_n) over the prompts, as llama.cpp counts it. The counts a greedy
request gets do not depend on timing (tests/test_draft_head.py checks one slot against four), so the slots answer
at once and nothing here is a speed figure: the draft-head study and the smoke's reference comparison use it.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import ServerError, UsageError
from mtpquant.core.files import sha256_bytes
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.llamacpp.server import LlamaServer
from mtpquant.llamacpp.toolchain import Toolchain
from mtpquant.measure.smoke.suite import Prompt

SPEC_TYPE = "draft-mtp"
ENDPOINT = "/v1/chat/completions"
SAMPLING = {"temperature": 0.0, "top_k": 1}  # greedy: the main model's tokens, and so the counts, are fixed
REQUEST_SEED = 42
SLOT_CTX = 2048  # context per slot: the suite's prompts plus max_tokens fit with room to spare


@dataclass(frozen=True)
class Settings:
    """How one head is measured: draft length, tokens per request, slots; threads and GPU layers of the server."""

    k: int
    max_tokens: int
    slots: int
    threads: int | None = None
    gpu_layers: int | None = None

    def to_json(self) -> dict:
        return {"k": self.k, "max_tokens": self.max_tokens, "slots": self.slots, "threads": self.threads,
                "gpu_layers": self.gpu_layers, "ctx_per_slot": SLOT_CTX, "spec_type": SPEC_TYPE,
                "endpoint": ENDPOINT, "sampling": dict(SAMPLING), "seed": REQUEST_SEED, "cache_prompt": False}


def request_body(p: Prompt, max_tokens: int) -> dict:
    """The greedy chat request of one prompt."""
    return {"messages": p.messages_json(), "max_tokens": max_tokens, **SAMPLING, "seed": REQUEST_SEED,
            "cache_prompt": False, "stream": False}


def measure_head(tc: Toolchain, gguf: Path, prompts: Sequence[Prompt], settings: Settings, log: Path,
                 progress: ProgressFn = no_progress, label: str = "") -> dict:
    """Acceptance of one GGUF's draft head: one draft-mtp server, every prompt as a concurrent request.

    Returns the server command, one record per prompt (in prompt order) and the seconds it took: wall (what a GPU
    is held for), the server's own CPU time, start-up.
    """
    if not prompts:
        raise UsageError("the draft-head study needs at least one prompt")
    label = label or f"draft head {gguf.name}"
    started = time.monotonic()
    srv = LlamaServer(tc, gguf, log, spec_type=SPEC_TYPE, draft_n_max=settings.k, ctx=settings.slots * SLOT_CTX,
                      threads=settings.threads, gpu_layers=settings.gpu_layers, parallel=settings.slots)
    with srv:
        asked = time.monotonic()
        progress(label, 0, len(prompts))
        records: dict[int, dict] = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=settings.slots) as pool:
            futures = {pool.submit(srv.post, ENDPOINT, request_body(p, settings.max_tokens)): i
                       for i, p in enumerate(prompts)}
            for fut in concurrent.futures.as_completed(futures):
                i = futures[fut]
                records[i] = _record(prompts[i], fut.result(), srv)
                progress(label, len(records), len(prompts))
        requests_done = time.monotonic()
        cpu = _cpu_seconds(srv.proc.pid) if srv.proc is not None else None
        argv = srv.record_argv()
        speculative = [bool(s.get("speculative")) for s in srv.slots_info]
        startup = srv.startup_seconds
    per_prompt = [records[i] for i in range(len(prompts))]
    return {"server": argv, "log": log.name, "slots_speculative": speculative, "per_prompt": per_prompt,
            "drafted": sum(r["draft_n"] for r in per_prompt),
            "accepted": sum(r["draft_n_accepted"] for r in per_prompt), "acceptance": acceptance(per_prompt),
            "seconds": {"wall": round(time.monotonic() - started, 3), "startup": startup,
                        "requests": round(requests_done - asked, 3), "server_cpu": cpu}}


def _record(p: Prompt, resp, srv: LlamaServer) -> dict:
    timings = resp.get("timings") if isinstance(resp, dict) else None
    if not isinstance(timings, dict):
        raise ServerError(f"{ENDPOINT} returned no timings for prompt {p.id}; log: {srv.log_path}")
    choice = (resp.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    text = (msg.get("reasoning_content") or "") + (msg.get("content") or "")
    # a response without draft_n made no drafts (llama-server leaves the counters out when there were none)
    return {"prompt": p.id, "category": p.category, "draft_n": int(timings.get("draft_n", 0)),
            "draft_n_accepted": int(timings.get("draft_n_accepted", 0)),
            "predicted_n": int(timings.get("predicted_n", 0)), "finish_reason": choice.get("finish_reason"),
            "text_sha256": sha256_bytes(text.encode())}


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a running process has used so far (Linux /proc), None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, IndexError):
        return None


def acceptance(per_prompt: Sequence[dict]) -> float | None:
    """sum(draft_n_accepted) / sum(draft_n) over the prompts (6 decimals), None when nothing was drafted."""
    drafted = sum(r["draft_n"] for r in per_prompt)
    return round(sum(r["draft_n_accepted"] for r in per_prompt) / drafted, 6) if drafted else None
