"""What quantization cost: KL divergence and perplexity of a variant against its BF16 source, with llama-perplexity.

First `--kl-divergence-base BASE.kld` on the source saves its logits (once per source, text and arguments: the
file is cached under a key of all of them), then `--kl-divergence` on each variant compares against it. `-b` is
always equal to `-c`: with the default `-b 2048` and a small `-c`, several sequences share a batch and the
chunk count and statistics stop matching what was asked. llama-perplexity prints its statistics only when at least
100 tokens were scored, and without the drain `perplexity_env` preloads it loses the end of its output when its log
thread has not written it by exit; it exits 0 either way, so a run without the statistics section is an error here
(retried when the cause can be the lost output).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mtpquant.core.errors import EvalError, UsageError
from mtpquant.core.files import incomplete_path, sha256_file, sha256_json, write_json_atomic
from mtpquant.core.paths import DATA_DIR
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.receipts import EvalReceipt, SourceReceipt
from mtpquant.core.rundir import Artifact, RunDir
from mtpquant.core.steps import Step, run_step
from mtpquant.llamacpp.perplexity import (
    STATS_HEADER,
    log_drain_library,
    parse_final_ppl,
    parse_kld_output,
    perplexity_argv,
    perplexity_env,
    run_perplexity,
    scored_tokens,
    shown_argv,
)
from mtpquant.llamacpp.toolchain import Toolchain
from mtpquant.recipe.checker import file_problem
from mtpquant.recipe.schema import EvalSpec

DEFAULT_TEXT = DATA_DIR / "eval" / "wiki-style-v1.txt"
DEFAULT_CTX, DEFAULT_CHUNKS = EvalSpec.ctx, EvalSpec.chunks


@dataclass(frozen=True)
class BaseLogits:
    """The source's saved logits and what made them."""

    path: Path
    key: str
    command: tuple[str, ...]
    ppl: float | None
    reused: bool


def text_sha256(text: Path) -> str:
    """sha256 of the evaluation text's bytes."""
    return sha256_file(Path(text))


def default_text() -> Path:
    """The evaluation text shipped with mtpquant; UsageError if the installation lacks it."""
    if not DEFAULT_TEXT.is_file():
        raise UsageError(f"the evaluation text shipped with mtpquant is missing ({DEFAULT_TEXT})",
                         "pass --text FILE, or reinstall mtpquant")
    return DEFAULT_TEXT


def base_key(tc: Toolchain, source_sha256: str, text: Path, ctx: int, chunks: int) -> str:
    """What decides the base logits: source bytes, text bytes, ctx, chunks, and the llama-perplexity binary."""
    return sha256_json({"source": source_sha256, "text": text_sha256(text), "ctx": ctx, "batch": ctx,
                        "chunks": chunks, "llama_perplexity": tc.binary_sha256("llama-perplexity")})


def kld_base_info(tc: Toolchain, source: Path, text: Path, ctx: int, chunks: int, dest: Path, log: Path, *,
                  source_sha256: str | None = None, threads: int | None = None, key: str | None = None) -> BaseLogits:
    """Save the source's logits to `dest` (reused when its sidecar records the same key), with key, command, PPL."""
    source, text, dest = Path(source), Path(text), Path(dest)
    if key is None:  # callers that already computed it pass it: the text and the source are hashed once
        _check_inputs(source, text, ctx, chunks)
        key = base_key(tc, source_sha256 or sha256_file(source), text, ctx, chunks)
    sidecar = dest.with_name(dest.name + ".json")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("key") == key and dest.is_file() and dest.stat().st_size == meta.get("bytes"):
        return BaseLogits(dest, key, tuple(meta.get("command", ())), meta.get("ppl"), True)
    argv, ppl = _save_logits(tc, source, text, ctx, chunks, dest, log, threads)
    command = shown_argv(argv)
    command[command.index("--kl-divergence-base") + 1] = str(dest)
    write_json_atomic(sidecar, {"key": key, "bytes": dest.stat().st_size, "source": source.name,
                                "source_sha256": source_sha256, "text": text.name, "ctx": ctx, "chunks": chunks,
                                "command": command, "ppl": ppl})
    return BaseLogits(dest, key, tuple(command), ppl, False)


def _save_logits(tc: Toolchain, source: Path, text: Path, ctx: int, chunks: int, dest: Path, log: Path,
                 threads: int | None) -> tuple[list, float | None]:
    """Run llama-perplexity on the source into a temporary file renamed to `dest`; (argv, base PPL)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = incomplete_path(dest)
    argv = perplexity_argv(tc, source, text, ctx, chunks, tmp, compare=False, threads=threads)
    lines: list[str] = []
    try:
        run_perplexity(argv, log, on_line=lines.append)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise EvalError(f"llama-perplexity wrote no logits file for {source.name}; log: {log}",
                            "is the text long enough for 2 x ctx tokens?")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return argv, parse_final_ppl("\n".join(lines))


def _check_inputs(source: Path, text: Path, ctx: int, chunks: int) -> None:
    if not source.exists():
        raise UsageError(f"{source}: source model not found", "give the BF16 GGUF the variants were made from")
    if problem := file_problem(source):
        raise UsageError(f"{source}{problem}", "give the BF16 GGUF the variants were made from")
    if not text.exists():
        raise UsageError(f"{text}: evaluation text not found", "give a UTF-8 text file")
    if problem := file_problem(text, text=True):
        raise UsageError(f"{text}{problem}", "give a UTF-8 text file")
    if ctx < 16 or chunks < 1:
        raise UsageError(f"eval needs ctx >= 16 and chunks >= 1, got ctx={ctx}, chunks={chunks}")


def eval_variant(tc: Toolchain, source: Path, variant_gguf: Path, base_kld: Path | BaseLogits, text: Path,
                 ctx: int, chunks: int, log: Path, *, threads: int | None = None, attempts: int = 5) -> dict:
    """KLD/PPL of one variant against the saved base logits; the dict receipts/eval-<variant>.json holds.

    llama-perplexity (515e855) never flushes its asynchronous log before exiting; `perplexity_env` preloads a drain
    for it, and where that library cannot be built the statistics at the end of stdout are sometimes lost with exit
    code 0: such a run is repeated, up to `attempts` runs in all. Too few scored tokens (< 100) means no statistics
    at all, and is not retried.
    """
    variant_gguf, text = Path(variant_gguf), Path(text)
    base = base_kld if isinstance(base_kld, BaseLogits) else None
    base_path = base.path if base else Path(base_kld)
    if not variant_gguf.is_file():
        raise UsageError(f"{variant_gguf}: variant GGUF not found")
    if not base_path.is_file():
        raise UsageError(f"{base_path}: base logits file not found",
                         "save the source's logits first (kld_base_info)")
    argv = perplexity_argv(tc, variant_gguf, text, ctx, chunks, base_path, compare=True, threads=threads)
    stats, runs = _statistics(argv, variant_gguf, ctx, chunks, log, attempts)
    return {
        "file": variant_gguf.name,
        "source": Path(source).name,
        "text": {"file": text.name, "sha256": text_sha256(text)},
        "ctx": ctx, "batch": ctx, "chunks": chunks,
        "stats": stats,
        "runs": runs,
        "base_logits": {"file": base_path.name, "key": base.key if base else None,
                        "ppl": base.ppl if base else None},
        "commands": {"base": list(base.command) if base else None, "variant": shown_argv(argv)},
        "env": {"OMP_WAIT_POLICY": perplexity_env()["OMP_WAIT_POLICY"],
                "log_drain": drain.name if (drain := log_drain_library()) else None},
        "log": log.name,
    }


def _statistics(argv: list, variant_gguf: Path, ctx: int, chunks: int, log: Path, attempts: int) -> tuple[dict, int]:
    """The parsed statistics of the first run that printed them, and how many runs that took."""
    too_few = scored_tokens(ctx, chunks) < 100
    attempt = 1
    while True:
        run = run_perplexity(argv, log)
        try:
            return parse_kld_output(run.stdout, log), attempt
        except EvalError:
            if attempt < attempts and not too_few:
                attempt += 1
                continue
            hint = (f"it prints statistics only for >= 100 scored tokens and {chunks} chunk(s) of {ctx} score "
                    f"{scored_tokens(ctx, chunks)}: raise chunks or ctx" if too_few else
                    "its output was cut short (llama.cpp does not flush its log at exit); run the step again")
            raise EvalError(f"llama-perplexity printed no '{STATS_HEADER}' section for {variant_gguf.name} "
                            f"(exit code 0, {attempt} run(s)); log: {log}", hint) from None


# ----------------------------------------------------------------------------------------------- run directories

def run_source(run: RunDir) -> tuple[Path, str]:
    """The source GGUF (and its sha256) a run directory was built from, as receipts/source.json records it."""
    r = run.read(SourceReceipt)
    if r is not None:
        for candidate in (Path(r.location), run.root / "source" / r.file, run.root / r.file):
            if candidate.is_file():
                return candidate, r.sha256
    raise UsageError(f"{run.root}: cannot find the source model from receipts/source.json",
                     "pass --source BF16.gguf")


def eval_run(tc: Toolchain, run_root: Path, source: Path | None = None, text: Path | None = None,
             ctx: int = DEFAULT_CTX, chunks: int = DEFAULT_CHUNKS, *, threads: int | None = None,
             force: bool = False, progress: ProgressFn = no_progress,
             source_sha256: str | None = None, artifacts: Sequence[Artifact] | None = None) -> dict[str, EvalReceipt]:
    """Evaluate every variant of a run directory (or those `artifacts` name) into receipts/eval-<variant>.json
    (unchanged ones skipped)."""
    run = RunDir(Path(run_root))
    run.ensure()
    if source is None:
        source, src_sha = run_source(run)
    else:
        source, src_sha = Path(source), source_sha256 or sha256_file(Path(source))
    text = Path(text) if text else default_text()
    _check_inputs(source, text, ctx, chunks)
    key = base_key(tc, src_sha, text, ctx, chunks)

    @functools.cache
    def base() -> BaseLogits:  # the source's logits: saved once, and only if some variant is evaluated
        progress("eval base", 0, 1)
        logits = kld_base_info(tc, source, text, ctx, chunks, run.work / "eval" / f"base-{key[:16]}.kld",
                               run.logs / "eval-base.log", source_sha256=src_sha, threads=threads, key=key)
        progress("eval base", 1, 1)
        return logits

    def evaluate(art: Artifact) -> EvalReceipt:
        log = run.logs / f"eval-{art.variant}.log"
        log.unlink(missing_ok=True)
        result = eval_variant(tc, source, art.path, base(), text, ctx, chunks, log, threads=threads)
        return EvalReceipt(input_key=variant_key(key, art.sha256), variant_sha256=art.sha256,
                           source_sha256=src_sha, base_reused=base().reused, **result)

    artifacts = list(artifacts) if artifacts is not None else run.artifacts()
    out = {}
    for i, art in enumerate(artifacts):
        progress("eval", i, len(artifacts))
        step = Step(f"eval:{art.variant}", EvalReceipt, art.variant, variant_key(key, art.sha256),
                    functools.partial(evaluate, art))
        out[art.variant] = run_step(run, step, force).receipt
    progress("eval", len(artifacts), len(artifacts))
    return out


def variant_key(base: str, variant_sha256: str | None) -> str:
    """What decides a variant's eval receipt: the base logits' key and the variant's bytes."""
    return sha256_json({"base": base, "variant": variant_sha256})


def eval_file(tc: Toolchain, variant_gguf: Path, source: Path, text: Path | None, ctx: int, chunks: int,
              cache_dir: Path, *, threads: int | None = None) -> dict:
    """Evaluate one GGUF outside a run directory; the base logits are cached in cache_dir by key."""
    text = Path(text) if text else default_text()
    source = Path(source)
    _check_inputs(source, text, ctx, chunks)
    src_sha = sha256_file(source)
    key = base_key(tc, src_sha, text, ctx, chunks)
    base = kld_base_info(tc, source, text, ctx, chunks, cache_dir / f"base-{key[:16]}.kld",
                         cache_dir / f"base-{key[:16]}.log", source_sha256=src_sha, threads=threads, key=key)
    log = cache_dir / f"{Path(variant_gguf).stem}.log"
    log.unlink(missing_ok=True)
    result = eval_variant(tc, source, Path(variant_gguf), base, text, ctx, chunks, log, threads=threads)
    result["source_sha256"] = src_sha
    return result


FLOOR_NATS = 16  # the KLD pass reads the base's log-probabilities floored this far below each position's top logit
SAME_PPL = 1e-3  # two PPL(base) figures closer than this (relative) are the same measurement


def ppl_ratio(stats: dict, own_base: float | None) -> tuple[float, float | None, float, bool]:
    """PPL(Q)/PPL(base) of an eval's `stats` (ppl_q, ppl_base, ppl_ratio, ppl_ratio_err) as (ratio, its ± or None,
    the PPL(base) used, whether the KLD pass's base was floored).

    The KLD pass (llama-perplexity 515e855, `log_softmax` in tools/perplexity/perplexity.cpp) stores the base's
    log-probabilities floored FLOOR_NATS below each position's top logit, so a text token the base put lower counts
    with too small an NLL and that pass's PPL(base) and ratio are off (rare tokens; every token of a synthetic model).
    The pass that saved the base logits measured its PPL from full logits over the same tokens (`own_base`): when the
    two differ, the ratio is PPL(Q) over it, without a paired ± (the passes keep no per-token figures)."""
    if own_base is None or abs(math.log(own_base / stats["ppl_base"])) <= SAME_PPL:
        return stats["ppl_ratio"], stats["ppl_ratio_err"], stats["ppl_base"], False
    return stats["ppl_q"] / own_base, None, own_base, True


def format_results(results: dict[str, dict]) -> str:
    """One line per variant: mean KLD, PPL(Q), PPL ratio, same-top-token share (each as eval_variant returns it)."""
    lines = [f"{'variant':<14} {'mean KLD':>19} {'PPL(Q)':>11} {'PPL(Q)/PPL(base)':>19} {'same top':>16}"]
    ratios = {tag: ppl_ratio(r["stats"], (r.get("base_logits") or {}).get("ppl")) for tag, r in results.items()}
    for tag, r in results.items():
        st = r["stats"]
        ratio, err, _, _ = ratios[tag]
        kld = f"{st['kld_mean']:.6f} ± {st['kld_mean_err']:.6f}"
        shown = f"{ratio:.5f} ± {err:.5f}" if err is not None else f"{ratio:.5f} (no ±)"
        top = f"{100 * st['same_top_share']:.2f} ± {100 * st['same_top_share_err']:.2f} %"
        lines.append(f"{tag:<14} {kld:>19} {st['ppl_q']:>11.6g} {shown:>19} {top:>16}")
    if results:
        tag, r = next(iter(results.items()))
        lines.append(f"text {r['text']['file']} (sha256 {r['text']['sha256'][:12]}), ctx {r['ctx']}, "
                     f"{r['stats']['chunks_evaluated']} chunk(s); PPL(base) {ratios[tag][2]:.6g}")
    if any(floored for *_, floored in ratios.values()):
        lines.append(f"PPL(base) is the source's own pass: the text has tokens more than {FLOOR_NATS} nats below the "
                     "source's top logit, where the KLD pass floors the stored base (its ratio would be wrong)")
    return "\n".join(lines)
