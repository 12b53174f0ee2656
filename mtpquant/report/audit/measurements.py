"""Each measurement receipt (smoke, eval, fit) against the artifact it measured, with its figures re-derived from
its own raw data where the receipt or a log holds them."""

from __future__ import annotations

import json
import re

from mtpquant.core.errors import MtpquantError, VerifyError
from mtpquant.core.files import plain_json
from mtpquant.llamacpp.perplexity import parse_kld_output
from mtpquant.measure import fit as fitmod
from mtpquant.measure import smoke
from mtpquant.modelfile.model import read_model
from mtpquant.report.audit.state import Audit, first_diff, need

SMOKE_SHOWN = ("units", "acceptance", "mean_accepted_length", "tok_s", "speedup", "differs_from_vanilla")


def check_measurements(audit: Audit, receipts: dict, quantize: dict) -> None:
    """Every smoke, eval and fit receipt measured a variant of this run, and its figures hold."""
    for tag, q in quantize.items():
        s = receipts.get(f"smoke-{tag}.json")
        if s is not None:
            _check_smoke(audit, tag, s, q)
        e = receipts.get(f"eval-{tag}.json")
        if e is not None:
            _check_eval(audit, tag, e, q)
        f = receipts.get(f"fit-{tag}.json")
        if f is not None:
            _check_fit(audit, tag, f, q)
    strays = [n for n in receipts if re.match(r"(smoke|eval|fit)-(.+)\.json$", n)
              and n.split("-", 1)[1][:-5] not in quantize]
    if strays:
        raise VerifyError(f"receipts/{strays[0]}: measures a variant this run has no quantize receipt for",
                          "remove the stale receipt")


def _check_smoke(audit: Audit, tag: str, s: dict, q: dict) -> None:
    where = f"receipts/smoke-{tag}.json"
    model = need(s, "model", where)
    if model.get("sha256") != q["sha256"] or model.get("file") != q["file"]:
        raise VerifyError(f"{where}: measured {model.get('file')} with sha256 {model.get('sha256')}, but {q['file']} "
                          f"is {q['sha256']}", "the measurement is stale; rerun `mtpquant smoke` on the run")
    settings = need(s, "settings", where)
    results = need(s, "results", where)
    derived = plain_json(smoke.summarize(need(s, "runs", where), settings["draft_n_max"], settings["seeds"],
                                       list(results), s.get("split")))
    path_, a, b = first_diff(_shown_smoke(results), _shown_smoke(derived), "results")
    if path_ is not None:
        raise VerifyError(f"{where}: {path_} is {json.dumps(a)}, its own runs give {json.dumps(b)}",
                          "the receipt was edited or written by another version of mtpquant.smoke")
    best = derived["chat"]["best_k"] if "chat" in derived else None
    if s.get("best_k") != best:
        raise VerifyError(f"{where}: best_k is {s.get('best_k')}, its own runs give {best}")
    if best is not None:
        head = need(s, "headline", where)
        g = derived["chat"]["best"] or derived["chat"]["k"][str(best)]["overall"]
        for key in SMOKE_SHOWN:
            if head.get(key) != g[key]:
                raise VerifyError(f"{where}: headline.{key} is {json.dumps(head.get(key))}, its own runs give "
                                  f"{json.dumps(g[key])}")
    audit.ok(f"smoke {tag}: measured this artifact; every figure re-derives from its {len(s['runs'])} recorded "
             f"responses")


def _shown_smoke(results: dict) -> dict:
    """The smoke figures the card shows, per mode, k and group (other fields may change with mtpquant.smoke)."""
    out = {}
    for mode, m in results.items():
        out[mode] = {"best_k": m.get("best_k"), "vanilla": (m.get("vanilla") or {}).get("overall"), "k": {
            k: {group: ({name: {f: g.get(f) for f in SMOKE_SHOWN} for name, g in per.items()} if group != "overall"
                        else {f: per.get(f) for f in SMOKE_SHOWN})
                for group, per in kv.items()}
            for k, kv in (m.get("k") or {}).items()}}
    return out


def _check_eval(audit: Audit, tag: str, e: dict, q: dict) -> None:
    where = f"receipts/eval-{tag}.json"
    if e.get("variant_sha256") != q["sha256"] or e.get("file") != q["file"]:
        raise VerifyError(f"{where}: evaluated {e.get('file')} with sha256 {e.get('variant_sha256')}, but "
                          f"{q['file']} is {q['sha256']}", "the evaluation is stale; rerun `mtpquant eval`")
    log = audit.run.logs / f"eval-{tag}.log"
    if not log.is_file() or e.get("runs", 1) != 1:
        audit.note(f"eval {tag}: figures taken as recorded (no single-run log to re-read)")
        audit.ok(f"eval {tag}: evaluated this artifact")
        return
    try:
        parsed = parse_kld_output(log.read_text(encoding="utf-8", errors="replace"), log)
    except MtpquantError as exc:
        raise VerifyError(f"logs/eval-{tag}.log: {exc.message}") from None
    stats = e.get("stats") or {}
    for key, value in parsed.items():
        if key in stats and stats[key] != value:
            raise VerifyError(f"{where}: stats.{key} is {stats[key]}, logs/eval-{tag}.log gives {value}")
    audit.ok(f"eval {tag}: evaluated this artifact; figures re-read from logs/eval-{tag}.log")


def _check_fit(audit: Audit, tag: str, f: dict, q: dict) -> None:
    where = f"receipts/fit-{tag}.json"
    if f.get("file") != q["file"] or f.get("file_bytes") != q["bytes"]:
        raise VerifyError(f"{where}: estimated {f.get('file')} of {f.get('file_bytes')} bytes, but {q['file']} has "
                          f"{q['bytes']}", "the estimate is stale; rerun `mtpquant fit`")
    rows = need(f, "rows", where)
    st = need(f, "settings", where)
    settings = fitmod.ServerSettings(parallel=st["parallel"], draft_n_max=st["draft_n_max"], n_ubatch=st["n_ubatch"],
                                     reserve_mib=st["reserve_mib"])
    table = fitmod.fit_table(read_model(audit.local[q["file"]]),
                             vram_gb=list(dict.fromkeys(r["vram_gb"] for r in rows)),
                             ctx=list(dict.fromkeys(r["ctx"] for r in rows)),
                             kv_types=list(dict.fromkeys(r["kv_type"] for r in rows)), mtp=f.get("mtp", True),
                             settings=settings)
    path_, a, b = first_diff(_shown_fit(f), _shown_fit(plain_json(table)), "fit")
    if path_ is not None:
        raise VerifyError(f"{where}: {path_.removeprefix('fit.')} is {json.dumps(a)}, the artifact's header gives "
                          f"{json.dumps(b)}", "the receipt was edited or written by another version of mtpquant.fit")
    audit.ok(f"fit {tag}: the estimate re-derives from the artifact's header")


def _shown_fit(t: dict) -> dict:
    """The fit figures the card shows."""
    return {"mtp": t.get("mtp"), "weights_total_mib": (t.get("weights") or {}).get("total_mib"),
            "needs": [{k: n.get(k) for k in ("ctx", "kv_type", "total_mib")} for n in t.get("needs", [])],
            "rows": [{k: r.get(k) for k in ("vram_gb", "ctx", "kv_type", "fit", "n_cpu_moe")}
                     for r in t.get("rows", [])]}
