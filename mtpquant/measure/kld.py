"""What quantization cost: KL divergence and perplexity of a variant against its BF16 source, with llama-perplexity.

First `--kl-divergence-base BASE.kld` on the source saves its logits (once per source, text and arguments: the
file is cached under a key of all of them), then `--kl-divergence` on each variant compares against it. `-b` is
always equal to `-c`: with the default `-b 2048` and a small `-c`, several sequences share a batch and the
chunk count and statistics stop matching what was asked. llama-perplexity prints its statistics only when at least
100 tokens were scored, and loses the end of its output when its log thread is starved at exit; it exits 0 either
way, so a run without the statistics section is an error here (retried when the cause is the lost output).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import EvalError, UsageError
from mtpquant.core.files import (
    incomplete_path,
    sha256_file,
    sha256_json,
    write_json_atomic,
)
from mtpquant.core.paths import DATA_DIR
from mtpquant.core.procs import run_tool
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.rundir import RunDir
from mtpquant.llamacpp.toolchain import Toolchain

DEFAULT_TEXT = DATA_DIR / "eval" / "wiki-style-v1.txt"
DEFAULT_CTX = 128
DEFAULT_CHUNKS = 16
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


@dataclass(frozen=True)
class BaseLogits:
    """The source's saved logits and what made them."""

    path: Path
    key: str
    command: tuple[str, ...]
    ppl: float | None
    reused: bool


def text_sha256(text: Path) -> str:
    return sha256_file(Path(text))


def default_text() -> Path:
    if not DEFAULT_TEXT.is_file():
        raise UsageError(f"the evaluation text shipped with mtpquant is missing ({DEFAULT_TEXT})",
                         "pass --text FILE, or reinstall mtpquant")
    return DEFAULT_TEXT


def _tool_identity(tc: Toolchain) -> str:
    known = tc.describe().get("binaries", {}).get("llama-perplexity", {}).get("sha256")
    return known or sha256_file(tc.tool("llama-perplexity"))


def base_key(tc: Toolchain, source_sha256: str, text: Path, ctx: int, chunks: int) -> str:
    """What decides the base logits: source bytes, text bytes, ctx, chunks, and the llama-perplexity binary."""
    return sha256_json({"source": source_sha256, "text": text_sha256(text), "ctx": ctx, "batch": ctx,
                        "chunks": chunks, "llama_perplexity": _tool_identity(tc)})


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


def _shown(argv) -> list[str]:
    return [Path(str(argv[0])).name, *(str(a) for a in argv[1:])]


def kld_base(tc: Toolchain, source: Path, text: Path, ctx: int, chunks: int, dest: Path, log: Path, *,
             source_sha256: str | None = None, threads: int | None = None) -> Path:
    """Save the source's logits to `dest` (reused when its sidecar records the same key); return `dest`."""
    return kld_base_info(tc, source, text, ctx, chunks, dest, log, source_sha256=source_sha256,
                         threads=threads).path


def kld_base_info(tc: Toolchain, source: Path, text: Path, ctx: int, chunks: int, dest: Path, log: Path, *,
                  source_sha256: str | None = None, threads: int | None = None) -> BaseLogits:
    """kld_base, returning the key, command and base PPL too."""
    source, text, dest = Path(source), Path(text), Path(dest)
    _check_inputs(source, text, ctx, chunks)
    key = base_key(tc, source_sha256 or sha256_file(source), text, ctx, chunks)
    sidecar = dest.with_name(dest.name + ".json")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("key") == key and dest.is_file() and dest.stat().st_size == meta.get("bytes"):
        return BaseLogits(dest, key, tuple(meta.get("command", ())), meta.get("ppl"), True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = incomplete_path(dest)
    argv = perplexity_argv(tc, source, text, ctx, chunks, tmp, compare=False, threads=threads)
    lines: list[str] = []
    try:
        run_tool(argv, log_path=log, on_line=lines.append, env=perplexity_env())
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise EvalError(f"llama-perplexity wrote no logits file for {source.name}; log: {log}",
                            "is the text long enough for 2 x ctx tokens?")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    m = FINAL_RE.search("\n".join(lines))
    ppl = float(m.group(1)) if m else None
    command = _shown(argv)
    command[command.index("--kl-divergence-base") + 1] = str(dest)
    write_json_atomic(sidecar, {"key": key, "bytes": dest.stat().st_size, "source": source.name,
                                "source_sha256": source_sha256, "text": text.name, "ctx": ctx, "chunks": chunks,
                                "command": command, "ppl": ppl})
    return BaseLogits(dest, key, tuple(command), ppl, False)


def _check_inputs(source: Path, text: Path, ctx: int, chunks: int) -> None:
    if not source.is_file():
        raise UsageError(f"{source}: source model not found", "give the BF16 GGUF the variants were made from")
    if not text.is_file():
        raise UsageError(f"{text}: evaluation text not found", "give a UTF-8 text file")
    if ctx < 16 or chunks < 1:
        raise UsageError(f"eval needs ctx >= 16 and chunks >= 1, got ctx={ctx}, chunks={chunks}")


def scored_tokens(ctx: int, chunks: int) -> int:
    """Tokens llama-perplexity scores in KLD mode: the second half of each chunk, less the last position."""
    return chunks * (ctx - 1 - ctx // 2)


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


def eval_variant(tc: Toolchain, source: Path, variant_gguf: Path, base_kld: Path | BaseLogits, text: Path,
                 ctx: int, chunks: int, log: Path, *, threads: int | None = None, attempts: int = 3) -> dict:
    """KLD/PPL of one variant against the saved base logits; the dict receipts/eval-<variant>.json holds.

    llama-perplexity (515e855) never flushes its asynchronous log before exiting, so the statistics at the end of
    stdout are sometimes lost with exit code 0: such a run is repeated, up
    to `attempts` runs in all (see `perplexity_env` for what makes it rare). Too few scored tokens (< 100) means
    no statistics at all, and is not retried.
    """
    variant_gguf, text = Path(variant_gguf), Path(text)
    base = base_kld if isinstance(base_kld, BaseLogits) else None
    base_path = base.path if base else Path(base_kld)
    if not variant_gguf.is_file():
        raise UsageError(f"{variant_gguf}: variant GGUF not found")
    if not base_path.is_file():
        raise UsageError(f"{base_path}: base logits file not found", "run kld_base on the source first")
    argv = perplexity_argv(tc, variant_gguf, text, ctx, chunks, base_path, compare=True, threads=threads)
    too_few = scored_tokens(ctx, chunks) < 100
    for attempt in range(1, max(1, attempts) + 1):
        run = run_tool(argv, log_path=log, env=perplexity_env())
        try:
            stats = parse_kld_output(run.stdout, log)
            break
        except EvalError:
            if attempt < attempts and not too_few:
                continue
            hint = (f"it prints statistics only for >= 100 scored tokens and {chunks} chunk(s) of {ctx} score "
                    f"{scored_tokens(ctx, chunks)}: raise chunks or ctx" if too_few else
                    "its output was cut short (llama.cpp does not flush its log at exit); run the step again")
            raise EvalError(f"llama-perplexity printed no '{STATS_HEADER}' section for {variant_gguf.name} "
                            f"(exit code 0, {attempt} run(s)); log: {log}", hint) from None
    return {
        "file": variant_gguf.name,
        "source": Path(source).name,
        "text": {"file": text.name, "sha256": text_sha256(text)},
        "ctx": ctx, "batch": ctx, "chunks": chunks,
        **stats,
        "runs": attempt,
        "base_logits": {"file": base_path.name, "key": base.key if base else None,
                        "ppl": base.ppl if base else None},
        "commands": {"base": list(base.command) if base else None, "variant": _shown(argv)},
        "env": {"OMP_WAIT_POLICY": perplexity_env()["OMP_WAIT_POLICY"]},
        "log": str(log),
    }


# ----------------------------------------------------------------------------------------------- run directories

def run_source(run_root: Path) -> tuple[Path, str | None]:
    """The source GGUF (and its sha256) a run directory was built from, from receipts/source.json."""

    run = RunDir(Path(run_root))
    r = run.read_receipt("source") or {}
    candidates = []
    if r.get("path"):
        candidates.append(Path(r["path"]))
    if r.get("file"):
        candidates += [run.root / "source" / r["file"], run.root / r["file"]]
    for c in candidates:
        if c.is_file():
            return c, r.get("sha256")
    raise UsageError(f"{run.root}: cannot find the source model from receipts/source.json",
                     "pass --source BF16.gguf")


def eval_run(tc: Toolchain, run_root: Path, source: Path | None = None, text: Path | None = None,
             ctx: int = DEFAULT_CTX, chunks: int = DEFAULT_CHUNKS, *, threads: int | None = None,
             force: bool = False, progress: ProgressFn = no_progress) -> dict[str, dict]:
    """Evaluate every variant of a run directory; write receipts/eval-<variant>.json (skipping unchanged ones)."""

    run = RunDir(Path(run_root))
    run.ensure()
    src_sha = None
    if source is None:
        source, src_sha = run_source(run.root)
    text = Path(text) if text else default_text()
    _check_inputs(Path(source), text, ctx, chunks)
    artifacts = [(a.variant, a.path) for a in run.artifacts()]
    sums = run.read_sha256sums()
    progress("eval base", 0, 1)
    src_sha = src_sha or sha256_file(Path(source))
    key = base_key(tc, src_sha, text, ctx, chunks)
    base = kld_base_info(tc, Path(source), text, ctx, chunks, run.work / "eval" / f"base-{key[:16]}.kld",
                         run.logs / "eval-base.log", source_sha256=src_sha, threads=threads)
    progress("eval base", 1, 1)
    out = {}
    for i, (tag, path) in enumerate(artifacts):
        progress("eval", i, len(artifacts))
        input_key = sha256_json({"base": base.key, "variant": sums.get(path.name)})
        previous = run.read_receipt("eval", tag) or {}
        if not force and previous.get("input_key") == input_key:
            out[tag] = previous
            continue
        log = run.logs / f"eval-{tag}.log"
        log.unlink(missing_ok=True)
        result = eval_variant(tc, Path(source), path, base, text, ctx, chunks, log, threads=threads)
        result.update({"input_key": input_key, "variant_sha256": sums.get(path.name),
                       "source_sha256": src_sha, "base_reused": base.reused})
        run.write_receipt("eval", result, tag=tag)
        out[tag] = result
    progress("eval", len(artifacts), len(artifacts))
    return out


def eval_file(tc: Toolchain, variant_gguf: Path, source: Path, text: Path | None, ctx: int, chunks: int,
              cache_dir: Path, *, threads: int | None = None) -> dict:
    """Evaluate one GGUF outside a run directory; the base logits are cached in cache_dir by key."""
    text = Path(text) if text else default_text()
    source = Path(source)
    _check_inputs(source, text, ctx, chunks)
    src_sha = sha256_file(source)
    key = base_key(tc, src_sha, text, ctx, chunks)
    base = kld_base_info(tc, source, text, ctx, chunks, cache_dir / f"base-{key[:16]}.kld",
                         cache_dir / f"base-{key[:16]}.log", source_sha256=src_sha, threads=threads)
    log = cache_dir / f"{Path(variant_gguf).stem}.log"
    log.unlink(missing_ok=True)
    result = eval_variant(tc, source, Path(variant_gguf), base, text, ctx, chunks, log, threads=threads)
    result["source_sha256"] = src_sha
    return result


def format_results(results: dict[str, dict]) -> str:
    """One line per variant: mean KLD, PPL ratio, same-top-token share."""
    lines = [f"{'variant':<14} {'mean KLD':>20} {'PPL(Q)':>10} {'PPL ratio':>18} {'same top':>16}"]
    for tag, r in results.items():
        lines.append(f"{tag:<14} {r['kld_mean']:>10.6f} ± {r['kld_mean_err']:<8.6f}"
                     f"{r['ppl_q']:>10.4f} {r['ppl_ratio']:>9.5f} ± {r['ppl_ratio_err']:<7.5f}"
                     f"{100 * r['same_top_share']:>8.2f} ± {100 * r['same_top_share_err']:.2f} %")
    if results:
        r = next(iter(results.values()))
        lines.append(f"text {r['text']['file']} (sha256 {r['text']['sha256'][:12]}), ctx {r['ctx']}, "
                     f"{r['chunks_evaluated']} chunk(s); PPL(base) {r['ppl_base']:.4f}")
    return "\n".join(lines)
