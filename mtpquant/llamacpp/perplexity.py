"""llama-perplexity: its argv, the environment it runs in, and the KLD/PPL statistics parsed from its stdout."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from mtpquant.core.errors import EvalError
from mtpquant.core.procs import ToolRun, run_tool
from mtpquant.llamacpp.toolchain import Toolchain

STATS_HEADER = "====== Perplexity statistics ======"
KLD_HEADER = "====== KL divergence statistics ======"

_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf))"
_PM = rf"{_NUM}\s*±\s*{_NUM}"
PATTERNS = {
    "ppl_q": re.compile(rf"^Mean PPL\(Q\)\s*:\s*{_PM}", re.MULTILINE),
    "ppl_base": re.compile(rf"^Mean PPL\(base\)\s*:\s*{_PM}", re.MULTILINE),
    "ln_ppl_ratio": re.compile(rf"^Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*{_PM}", re.MULTILINE),
    "ppl_ratio": re.compile(rf"^Mean PPL\(Q\)/PPL\(base\)\s*:\s*{_PM}", re.MULTILINE),
    "kld_mean": re.compile(rf"^Mean\s+KLD:\s*{_PM}", re.MULTILINE),
    "same_top_pct": re.compile(rf"^Same top p:\s*{_PM}\s*%", re.MULTILINE),
}
SINGLE = {
    "kld_max": re.compile(rf"^Maximum KLD:\s*{_NUM}", re.MULTILINE),
    "kld_p99": re.compile(rf"^99\.0%\s+KLD:\s*{_NUM}", re.MULTILINE),
    "kld_median": re.compile(rf"^Median\s+KLD:\s*{_NUM}", re.MULTILINE),
    "rms_dp_pct": re.compile(rf"^RMS Δp\s*:\s*{_NUM}", re.MULTILINE),
}
CHUNK_ROW = re.compile(r"^\s*\d+\s+[-+\d.naif]+\s+±", re.MULTILINE)
FINAL_RE = re.compile(rf"Final estimate: PPL = {_NUM} \+/- {_NUM}")


def perplexity_argv(tc: Toolchain, model: Path, text: Path, ctx: int, chunks: int, base_kld: Path,
                    compare: bool, threads: int | None = None) -> list:
    """llama-perplexity argv; `-b` equals `-c` so one sequence fills each batch."""
    argv: list = [tc.tool("llama-perplexity"), "-m", model, "-f", text, "-c", str(ctx), "-b", str(ctx),
                  "--chunks", str(chunks), "--kl-divergence-base", base_kld]
    if compare:
        argv.append("--kl-divergence")
    if threads:
        argv += ["-t", str(threads)]
    return argv


def perplexity_env() -> dict[str, str]:
    """The environment for llama-perplexity: OpenMP threads that sleep instead of spinning once idle.

    Spinning OpenMP threads starve the log thread, whose unflushed tail (the statistics) is then lost at exit:
    on a loaded 2-core machine 7 runs in 12 lost it with the default policy, 1 in 12 with `passive`.
    """
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "passive")}


def run_perplexity(argv: Sequence, log: Path, on_line: Callable[[str], None] | None = None) -> ToolRun:
    """Run a llama-perplexity argv in `perplexity_env`, logging to `log`; ToolError if it fails."""
    return run_tool(list(argv), log_path=log, on_line=on_line, env=perplexity_env())


def shown_argv(argv: Sequence) -> list[str]:
    """The argv as receipts show it: the binary's name instead of its path."""
    return [Path(str(argv[0])).name, *(str(a) for a in argv[1:])]


def scored_tokens(ctx: int, chunks: int) -> int:
    """Tokens llama-perplexity scores in KLD mode: the second half of each chunk, less the last position."""
    return chunks * (ctx - 1 - ctx // 2)


def parse_final_ppl(output: str) -> float | None:
    """The `Final estimate: PPL = ...` of a run, None if it printed none."""
    m = FINAL_RE.search(output)
    return float(m.group(1)) if m else None


def parse_kld_output(stdout: str, log: Path | None = None) -> dict:
    """The statistics of `llama-perplexity --kl-divergence`; EvalError naming the log if they are absent."""
    where = f"; log: {log}" if log else ""
    if STATS_HEADER not in stdout or KLD_HEADER not in stdout:
        rows = len(CHUNK_ROW.findall(stdout))
        raise EvalError(f"llama-perplexity printed no '{STATS_HEADER}' section ({rows} chunk row(s)){where}")
    out: dict = {}
    missing = []
    for key, rx in PATTERNS.items():
        m = rx.search(stdout)
        if not m:
            missing.append(key)
            continue
        out[key], out[key + "_err"] = float(m.group(1)), float(m.group(2))
    for key, rx in SINGLE.items():
        m = rx.search(stdout)
        out[key] = float(m.group(1)) if m else None
    if missing:
        raise EvalError(f"llama-perplexity statistics lack {', '.join(missing)}{where}",
                        "its output was cut short; run the step again")
    out["same_top_share"] = round(out.pop("same_top_pct") / 100.0, 6)
    out["same_top_share_err"] = round(out.pop("same_top_pct_err") / 100.0, 6)
    out["chunks_evaluated"] = len(CHUNK_ROW.findall(stdout))
    return out
