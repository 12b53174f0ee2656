#!/usr/bin/env python3
"""How often llama-perplexity loses its statistics, with and without the log drain `perplexity_env` preloads,
side by side in one run: under N busy loops (default 2, on this 2-core machine), R runs of the KLD pass on a tiny
synthetic Q4_K_M through mtpquant's own runner, alternating the environment with and without LD_PRELOAD; a run
counts as lost when parse_kld_output finds no statistics.

Usage: python scripts/bench_eval_drain.py [--runs 40] [--load 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mtpquant import synth  # noqa: E402
from mtpquant.core.errors import EvalError  # noqa: E402
from mtpquant.core.procs import run_tool  # noqa: E402
from mtpquant.llamacpp import perplexity as ppl  # noqa: E402
from mtpquant.llamacpp.toolchain import locate  # noqa: E402
from mtpquant.measure import kld  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--load", type=int, default=2, help="busy Python loops running meanwhile")
    a = ap.parse_args()
    tc = locate()
    with tempfile.TemporaryDirectory(prefix="mtpquant-drain-") as tmp:
        d = Path(tmp)
        src, q = d / "tiny-BF16.gguf", d / "tiny-Q4_K_M.gguf"
        synth.write_gguf(src, synth.SynthSpec(arch="qwen35moe", seed=0))
        run_tool([tc.tool("llama-quantize"), src, q, "Q4_K_M"], log_path=d / "quantize.log")
        base = kld.kld_base_info(tc, src, kld.default_text(), 128, 4, d / "base.kld", d / "base.log")
        argv = ppl.perplexity_argv(tc, q, kld.default_text(), 128, 4, base.path, compare=True)
        drained = ppl.perplexity_env()
        if "LD_PRELOAD" not in drained:
            sys.exit("the log drain could not be built here (no C compiler?): nothing to compare")
        arms = {"with the drain": drained, "without": {k: v for k, v in drained.items() if k != "LD_PRELOAD"}}
        lost = dict.fromkeys(arms, 0)
        load = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(a.load)]
        try:
            for i in range(a.runs):
                for name, env in arms.items():
                    r = run_tool(argv, log_path=d / "run.log", env=env)
                    try:
                        ppl.parse_kld_output(r.stdout)
                    except EvalError:
                        lost[name] += 1
                print(f"\r{i + 1}/{a.runs} pairs", end="", file=sys.stderr, flush=True)
        finally:
            for p in load:
                p.kill()
        print(file=sys.stderr)
    for name, n in lost.items():
        print(f"statistics lost {name}: {n}/{a.runs} runs")


if __name__ == "__main__":
    main()
