"""What the card shows of a smoke run (receipts/smoke-*.json): its tables, the headline claim and how to run it."""

from __future__ import annotations

import json
from pathlib import Path

from mtpquant.core.errors import CardError
from mtpquant.report.card.markdown import Md, fmt_fig, fmt_num, md_code, md_text, shell_command
from mtpquant.report.card.nodes import Node, plain
from mtpquant.report.card.provenance import toolchain_facts

SPEC_TYPE = "draft-mtp"  # the llama-server capability the card requires (as the smoke step runs it)
CHAT_ENDPOINT = "/v1/chat/completions"
EXAMPLE_BODY = {"messages": [{"role": "user", "content": "Write a haiku about draft models."}], "max_tokens": 64,
                "temperature": 0.0, "top_k": 1}


def smoke_view(s: Node) -> dict:
    """The smoke receipt's tables in card order: best k per category and seed, k sweep, chat vs raw."""
    results = s.need("results")
    chat = results.need("chat")
    best = chat.need("best_k")
    ks = list(chat.need("k").keys())
    per_k = chat["k"]
    view = {
        "best_k": best,
        "ks": [{"k": k, "g": per_k[k].need("overall"), "best": best is not None and str(best) == k} for k in ks],
        "best": per_k[str(best)] if best is not None else None,
        "vanilla": chat.need("vanilla"),
        "server": _server(s, best),
        "raw": None,
        "sweep": s.get("context_sweep"),
        "build": _build_line(s),
    }
    if "chat_vs_raw" in s:
        cvr = s["chat_vs_raw"]
        view["raw"] = {"k": cvr.need("k"), "chat": cvr.need("chat"), "raw": cvr.need("raw")}
    return view


def _build_line(s: Node) -> Md:
    """Which llama-server build and settings measured: what the receipt records, and that the machine is not."""
    tc = toolchain_facts(s.need("toolchain"))
    settings = s.need("settings")
    commit = f"llama.cpp {md_code(tc['commit'])}" if tc["commit"] else "llama.cpp commit not recorded"
    kind = {None: "build flags not recorded", True: "CUDA build", False: "CPU-only build"}[tc["cuda"]]
    threads = settings.get("threads")
    ngl = settings.get("gpu_layers")
    return Md(f"{commit}, {kind}; threads {int(threads) if threads is not None else 'default'}, GPU layers "
              f"{int(ngl) if ngl is not None else 'default'}; the machine itself is not recorded.")


def _server(s: Node, k) -> Node | None:
    label = f"k{k}" if k is not None else "vanilla"
    return next((srv for srv in s.need("servers") if srv.need("label") == label), None)


def claim(v: dict) -> Md:
    """The headline of a smoked variant: acceptance and speedup with what they were measured on."""
    s = v["smoke"]
    h = s.need("headline")
    settings = s.need("settings")
    suite = s.need("suite")
    return Md(
        f"**{md_text(v['tag'])}**: MTP draft acceptance {fmt_fig(h.need('acceptance'), 'pct')}, decode speedup "
        f"{fmt_fig(h.need('speedup'), 'x')} over the same llama-server without speculation "
        f"(`--spec-type {SPEC_TYPE} --spec-draft-n-max {int(h.need('k'))}`; {int(h.need('units'))} prompt × seed "
        f"units from {len(suite.need('selected'))} prompts of {md_code(_suite_name(suite))}, "
        f"{md_code(h.need('endpoint'))}, greedy, {int(settings.need('max_tokens'))} tokens each).")


def _suite_name(suite: Node) -> str:
    return Path(suite["file"]).name if suite.get("file") else "an inline prompt suite"


def how_to_run(v: dict) -> dict:
    """The server command and a request the smoke run used for `v` at its best k, and what the server answered."""
    s = v["smoke"]
    view = v["smoke_view"]
    best = view["best_k"]
    server = view["server"]
    if server is None:
        raise CardError(f"{s.where}: no server recorded for k={best}")
    reqs = [r for r in s.need("requests") if r.need("endpoint") == CHAT_ENDPOINT]
    if not reqs:
        raise CardError(f"{s.where}: no {CHAT_ENDPOINT} request recorded")
    req = reqs[0]
    run = next((r for r in s.need("runs") if r.need("request") == req.need("id") and r.need("server") ==
                server.need("label")), None)
    argv = list(server.need("argv"))
    port = argv[argv.index("--port") + 1] if "--port" in argv else "8080"
    host = argv[argv.index("--host") + 1] if "--host" in argv else "127.0.0.1"
    body = json.dumps(plain(req.need("body")), indent=2, ensure_ascii=False)
    return {
        "tested": True,
        "variant": v["tag"],
        "command": Md(shell_command(argv)),
        "k": best,
        "body": body,
        "curl": _curl(host, port),
        "answer": None if run is None else {"draft_n": int(run.need("draft_n")),
                                            "draft_n_accepted": int(run.need("draft_n_accepted")),
                                            "tok_s": fmt_num(run.need("timings.predicted_per_second"), ".1f")},
        "request_id": req.need("id"),
    }


def untested_run(v: dict, card: Node) -> dict:
    """A server command from the recipe's default MTP flags, for a run without a smoke receipt (not run)."""
    d = card.need("server_defaults")
    argv = ["llama-server", "-m", v["q"].need("file"), "-c", str(d.need("ctx")), "--spec-type", SPEC_TYPE,
            "--spec-draft-n-max", str(d.need("draft_n_max"))]
    return {"tested": False, "variant": v["tag"], "command": Md(shell_command(argv)),
            "k": d.need("draft_n_max"), "body": json.dumps(EXAMPLE_BODY, indent=2),
            "curl": _curl("127.0.0.1", "8080"), "answer": None, "request_id": None}


def _curl(host: str, port: str) -> Md:
    return Md(shell_command(["curl", "-s", f"http://{host}:{port}{CHAT_ENDPOINT}", "-H",
                             "Content-Type: application/json", "-d", "@request.json"]))
