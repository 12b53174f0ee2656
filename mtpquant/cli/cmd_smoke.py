"""`mtpquant smoke GGUF|RUN_DIR`: MTP off vs on in llama-server; the work is in mtpquant.measure.smoke."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from mtpquant.cli.app import bars, json_option, llama_cpp_option, quiet_option, toolchain
from mtpquant.core.errors import GateError, UsageError
from mtpquant.core.paths import cache_root
from mtpquant.core.receipts import SmokeReceipt
from mtpquant.core.rundir import RunDir
from mtpquant.measure import smoke as sm
from mtpquant.recipe import SmokeSpec
from mtpquant.recipe.checker import file_kind
from mtpquant.report.card.pays import METHOD as SWEEP_METHOD
from mtpquant.report.card.pays import analyse, recommendation


def _int_list(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        items = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not items or len(set(items)) != len(items) or min(items) < (1 if param.name == "ks" else 0):
        raise click.BadParameter(f"expected distinct {'positive' if param.name == 'ks' else 'non-negative'} "
                                 f"integers, got {value!r}")
    return items


@click.command("smoke")
@click.argument("target", metavar="GGUF|RUN_DIR", type=click.Path(path_type=Path))
@click.option("--k", "ks", callback=_int_list, default=None, metavar="LIST",
              help="Draft lengths (--spec-draft-n-max) to sweep, e.g. 3,4.")
@click.option("--seeds", callback=_int_list, default=None, metavar="LIST", help="Request seeds, e.g. 42,1337.")
@click.option("--prompts", type=click.IntRange(1), default=None, help="Use N prompts of the suite.")
@click.option("--max-tokens", type=click.IntRange(1), default=None, help="Tokens generated per request.")
@click.option("--raw", is_flag=True, help="Also send raw prompts to /completion (no chat template).")
@click.option("--context", "context", callback=_int_list, default=None, metavar="LIST",
              help="Context sweep: context lengths (-c), e.g. 4096,32768,131072; each prompt fills its length.")
@click.option("--context-docs", type=click.IntRange(1, 1000), default=None,
              help="Documents per length for the context sweep (10 or more give a CI).")
@click.option("--context-k1", is_flag=True, help="Also measure k=1 in the context sweep.")
@click.option("--long-doc", "long_docs", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Your own document for the context sweep instead of the Python stdlib's source (repeatable).")
@llama_cpp_option
@json_option
@quiet_option
def smoke(target, ks, seeds, prompts, max_tokens, raw, context, context_docs, context_k1, long_docs, llama_cpp,
          as_json, quiet) -> None:
    """Measure MTP draft acceptance and decode speedup in llama-server (vanilla vs --spec-type draft-mtp per k).

    For a RUN_DIR every model in its SHA256SUMS is measured, receipts/smoke-<variant>.json written and the
    recipe's gates enforced.
    """
    if target.is_dir():
        run = RunDir(target)
        artifacts = run.artifacts()
        spec, spec_source = sm.run_spec(run)
    elif target.is_file():
        run, artifacts, spec, spec_source = None, None, SmokeSpec(enabled=True), "defaults"
    elif target.exists():  # a FIFO, a device, a socket: named, never opened
        raise UsageError(f"{target} is {file_kind(target)}, not a GGUF file or run directory",
                         "give a GGUF file or a run directory")
    else:
        raise UsageError(f"{target}: no such GGUF file or run directory")
    overrides = {k: v for k, v in (("draft_n_max", ks), ("seeds", seeds), ("prompts", prompts),
                                   ("max_tokens", max_tokens), ("context_sweep", context),
                                   ("context_documents", context_docs)) if v is not None}
    if raw:
        overrides["raw"] = True
    if context_k1:
        overrides["context_k1"] = True
    if long_docs:
        overrides["long_documents"] = tuple(long_docs)
    spec = dataclasses.replace(spec, **overrides)
    tc = toolchain(llama_cpp)
    error = None
    with bars(quiet) as progress:
        if run is not None:
            try:
                receipts = sm.smoke_run(tc, run, spec, progress, artifacts=artifacts, spec_source=spec_source)
            except GateError as exc:  # the receipts are written; show what was measured, then fail
                error = exc
                receipts = {a.variant: run.read(SmokeReceipt, a.variant) for a in artifacts}
            results = {tag: r.body() for tag, r in receipts.items() if r is not None}
        else:
            results = {target.stem: sm.smoke_model(tc, target, spec, cache_root() / "logs", progress,
                                                    log_prefix=f"smoke-{target.stem}", spec_source=spec_source)}
    if as_json:
        click.echo(json.dumps(results if run is not None else next(iter(results.values())), indent=2, default=str))
    else:
        click.echo("\n\n".join(table(tag, r) for tag, r in results.items() if r is not None))
    if error is not None:
        raise error


def _fig(f: dict | None, fmt: str, unit: str = "") -> str:
    if not f or f.get("value") is None:
        return "-"
    ci = f.get("ci95")
    text = format(f["value"], fmt) + unit
    return f"{text} [{format(ci[0], fmt)}, {format(ci[1], fmt)}]" if ci else text


def table(tag: str, r: dict) -> str:
    """A compact text table of one smoke result."""
    s = r["settings"]
    lines = [(f"{tag}  ({r['model']['file']}): {len(r['suite']['selected'])} prompts x {len(s['seeds'])} seed(s), "
              f"{s['max_tokens']} tokens, greedy")]
    lines.append(f"  {'mode':<5} {'k':>3}  {'acceptance [95% CI]':<26} {'len':>5}  {'tok/s [95% CI]':<26} "
                 f"{'speedup [95% CI]':<26} differs")
    for mode, m in r["results"].items():
        v = m["vanilla"]["overall"]
        lines.append(f"  {mode:<5} {'off':>3}  {'-':<26} {'-':>5}  {_fig(v['tok_s'], '.1f'):<26} {'1':<26} -")
        for k, g in m["k"].items():
            o = g["overall"]
            mark = "*" if str(m["best_k"]) == k else " "
            length = o["mean_accepted_length"]["value"]
            d = o["differs_from_vanilla"]
            lines.append(f"  {mode:<5} {k:>3}{mark} {_fig(o['acceptance'], '.3f'):<26} "
                         f"{'-' if length is None else format(length, '.2f'):>5}  {_fig(o['tok_s'], '.1f'):<26} "
                         f"{_fig(o['speedup'], '.2f', 'x'):<26} {d['count']}/{d['of']}")
    h = r.get("headline")
    if h:
        cats = r["results"]["chat"]["k"][str(h["k"])]["per_category"]
        lines.append(f"  best k={h['k']} (chat): " + ", ".join(
            f"{c} {_fig(g['acceptance'], '.3f')}" for c, g in cats.items()))
    for name, c in (r.get("gates") or {}).get("checks", {}).items():
        lines.append(f"  gate {name} {c['gate']:g}: {'passed' if c['passed'] else 'FAILED'}")
    cs = r.get("context_sweep")
    if cs:
        lines += sweep_lines(cs)
    return "\n".join(lines)


def sweep_lines(cs: dict) -> list[str]:
    """The context sweep as text: per length and arm the measured figures, then where MTP pays."""
    if cs.get("method") != SWEEP_METHOD:
        return ["  context sweep: recorded by an older smoke method"]
    if "skipped" in cs:
        return [f"  context sweep: skipped ({cs['skipped']})"]
    lines = [f"  context sweep, {cs['documents_per_length']} document(s) per length, {cs['max_tokens']} tokens out:",
             (f"  {'ctx':>7} {'prompt':>7} {'arm':>4}  {'accept':>6}  {'decode tok/s':<22} {'prefill tok/s':<22} "
              f"{'TTFT ms':<18} e2e speedup")]
    for row in cs["rows"]:
        for name, f in row["arms"].items():
            mtp = name != "vanilla"
            acc = f["acceptance"]["value"] if mtp else None
            lines.append(
                f"  {row['ctx']:>7} {_fig(row['prompt_tokens'], '.0f'):>7} {'off' if not mtp else name:>4}  "
                f"{'-' if acc is None else format(acc, '.3f'):>6}  {_fig(f['decode_tok_s'], '.1f'):<22} "
                f"{_fig(f['prefill_tok_s'], '.0f'):<22} {_fig(f['ttft_ms'], '.0f'):<18} "
                f"{_fig(f['e2e_speedup'], '.2f', 'x') if mtp else '-'}")
    for arm in analyse(cs)["arms"]:
        lines.append(f"  k={arm['k']}: {recommendation(arm)}")
    return lines
