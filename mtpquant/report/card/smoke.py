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
        "drift": drift_line(s),
    }
    if s.get("chat_vs_raw"):
        cvr = s["chat_vs_raw"]
        view["raw"] = {"k": cvr.need("k"), "chat": cvr.need("chat"), "raw": cvr.need("raw")}
    return view


def _build_line(s: Node) -> Md:
    """Which llama-server build, settings and machine measured, as the receipt records them."""
    tc = toolchain_facts(s.need("toolchain"))
    settings = s.need("settings")
    commit = f"llama.cpp {md_code(tc['commit'])}" if tc["commit"] else "llama.cpp commit not recorded"
    kind = {None: "build flags not recorded", True: "CUDA build", False: "CPU-only build"}[tc["cuda"]]
    threads = settings.get("threads")
    ngl = settings.get("gpu_layers")
    m = s.need("machine")
    gpus = ", ".join(f"{md_text(g.get('name', '?'))} (driver {md_text(g.get('driver_version', '?'))}, power limit "
                     f"{md_text(g.get('power.limit', '?'))}, SM clock {md_text(g.get('clocks.sm', '?'))} of "
                     f"{md_text(g.get('clocks.max.sm', '?'))})" for g in m.get("gpus") or []) or "no GPU"
    cuda = f", CUDA {md_text(m['cuda'])}" if m.get("cuda") else ""
    placed = s.need("placement")
    return Md(f"{commit}, {kind}; threads {int(threads) if threads is not None else 'default'}, GPU layers "
              f"{int(ngl) if ngl is not None else 'default'}, `-fit off`. Machine: {md_text(m.need('cpu'))}, "
              f"{int(m.need('cores_usable'))} usable cores, {md_text(str(m.get('memory_gib')))} GiB; {gpus}{cuda}. "
              f"Every arm placed the weights alike ({md_text(', '.join(placed.need('devices')))}"
              f"{', ' + md_text(placed['offloaded']) + ' layers offloaded' if placed.get('offloaded') else ''}).")


def drift_line(s: Node) -> Md:
    """The drift each arm showed between its first and second half of requests (interleaved, so it cancels)."""
    parts = [f"{md_text(arm)} {fmt_num(d['ratio'], '.2f')}×" for arm, d in s.need("drift").items() if d]
    return Md("Second half over first half of each arm's decode speed (interleaved arms see the same drift): "
              + ", ".join(parts) + ".") if parts else Md("No drift could be computed (too few timed requests).")


def _server(s: Node, k) -> Node | None:
    label = f"k{k}" if k is not None else "vanilla"
    return next((srv for srv in s.need("servers") if srv.need("label") == label), None)


def claim(v: dict) -> Md:
    """The headline of a smoked variant: acceptance and speedup with what they were measured on."""
    s = v["smoke"]
    h = s.need("headline")
    settings = s.need("settings")
    suite = s.need("suite")
    chosen = ("k chosen on the other half of the prompts" if h.need("chosen_on") == "selection prompts"
              else "k chosen after the fact on these same prompts")
    failed = [name for name, c in (s.get("gates") or {}).get("checks", {}).items() if not c.get("passed")]
    gate = f" Gate FAILED: {md_text(', '.join(failed))} at k={int(s['gates']['k'])}." if failed else ""
    return Md(
        f"**{md_text(v['tag'])}**: MTP draft acceptance {fmt_fig(h.need('acceptance'), 'pct')}, decode speedup "
        f"{fmt_fig(h.need('speedup'), 'x')}, end-to-end speedup {fmt_fig(h.need('e2e_speedup'), 'x')} over the same "
        f"llama-server without speculation (`--spec-type {SPEC_TYPE} --spec-draft-n-max {int(h.need('k'))}`, "
        f"{chosen}; {int(h.need('units'))} prompt × seed units from {int(h.need('prompts'))} of the "
        f"{len(suite.need('selected'))} prompts of {md_code(_suite_name(suite))}, {md_code(h.need('endpoint'))}, "
        f"greedy, {int(settings.need('max_tokens'))} tokens each).{gate}")


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
    argv = user_argv(list(server.need("argv")))
    port, host = "8080", "127.0.0.1"
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


# What the smoke adds for its own bookkeeping, not for a user: its ephemeral port, metrics, verbose load log.
SMOKE_ONLY = {"--metrics": 0, "--no-webui": 0, "-lv": 1}


def user_argv(argv: list[str]) -> list[str]:
    """The measured server command as a user would run it: the same model flags and placement, port 8080."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in SMOKE_ONLY:
            i += 1 + SMOKE_ONLY[a]
            continue
        out.append("8080" if out and out[-1] == "--port" else a)
        i += 1
    return out


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
