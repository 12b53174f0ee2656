#!/usr/bin/env python3
"""Build overhead benchmark, side by side in one run (issue 3 targets).

1. One Q4_K_M variant: `mtpquant build` vs bare `llama-quantize` + `sha256sum` on the same BF16 input, alternating,
   N repetitions each; prints the median ratio (target <= 1.03).
2. mtpquant's own peak RSS (its Python process, not llama-quantize's) for two model sizes (target <= 1 GiB and
   independent of model size).
3. A 4-variant ladder with a computed imatrix vs four separate single-variant builds (target ratio <= 0.8).

Usage: python scripts/bench_build.py [--reps 5] [--big-hidden 1024] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "imatrix" / "codemath-chat-v1.txt"
EH = r"nextn\.eh_proj\.weight$"

# The child runs one build in-process and reports its own peak RSS: VmHWM of its own address space (it excludes
# llama.cpp's processes, and unlike ru_maxrss it does not carry over the parent's peak through fork + exec).
CHILD = """
import json, re, sys
from pathlib import Path
from mtpquant.pipeline import build as pipeline
from mtpquant import recipe as recipe
from mtpquant.llamacpp.toolchain import locate
r = recipe.load(Path(sys.argv[1]))
pipeline.build(r, Path(sys.argv[2]), locate(), force=True)
hwm = re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)
print(json.dumps({"maxrss_kib": int(hwm)}))
"""


def timed(argv: list[str], **kw) -> tuple[float, str]:
    t = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        sys.exit(f"{argv[:3]} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t, done.stdout


def recipe_file(folder: Path, name: str, src: Path, variants: list[str], imatrix: bool) -> Path:
    lines = [f"name: {name}", f"source: {{path: {src}}}",
             "policy:", f"  - {{block: nextn, match: '{EH}', type: Q8_0}}",
             "variants: [" + ", ".join(f"{{type: {v}}}" for v in variants) + "]"]
    if imatrix:
        lines += ["imatrix:", f"  compute: {{corpus: {CORPUS}, chunks: 16, ctx: 256, nextn: true}}"]
    p = folder / f"{name}.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def mtpquant_build(recipe: Path, out: Path) -> tuple[float, int]:
    secs, stdout = timed([sys.executable, "-c", CHILD, str(recipe), str(out)])
    return secs, json.loads(stdout.strip().splitlines()[-1])["maxrss_kib"]


def bare_build(quantize: Path, src: Path, tensor_types: Path, out: Path) -> float:
    t = time.perf_counter()
    subprocess.run([str(quantize), "--tensor-type-file", str(tensor_types), str(src), str(out), "Q4_K_M", "2"],
                   check=True, capture_output=True)
    subprocess.run(["sha256sum", str(out)], check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--big-hidden", type=int, default=1024)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()

    from mtpquant import synth
    from mtpquant.llamacpp.toolchain import locate

    tc = locate()
    work = args.work or Path(tempfile.mkdtemp(prefix="mtpquant-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = {
        "small": synth.SynthSpec(seed=1),
        "large": synth.SynthSpec(seed=1, hidden_size=args.big_hidden, n_layer=4, n_head=8, n_head_kv=2, head_dim=128,
                                 linear_key_heads=4, linear_value_heads=8, linear_key_head_dim=128,
                                 linear_value_head_dim=128, n_expert=8, expert_ff=512, shared_expert_ff=512),
    }
    print(f"machine: {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores; "
          f"llama.cpp {tc.identity.get('llama_cpp_commit', '?')} from {tc.source}; work dir {work}")
    rss = {}
    for label, spec in sizes.items():
        src = work / f"{label}-BF16.gguf"
        if not src.exists():
            synth.write_gguf(src, spec)
        size_mib = src.stat().st_size / (1 << 20)
        recipe = recipe_file(work, f"bench-{label}", src, ["Q4_K_M"], imatrix=False)
        out = work / f"run-{label}"
        mtpquant_build(recipe, out)  # warm-up, and produces the tensor-type file the bare run uses
        tensor_types = out / "work" / "Q4_K_M.tensor-types.txt"
        ours, bare, peaks = [], [], []
        for _ in range(args.reps):
            s, peak = mtpquant_build(recipe, out)
            ours.append(s)
            peaks.append(peak)
            bare.append(bare_build(tc.tool("llama-quantize"), src, tensor_types, work / f"bare-{label}.gguf"))
        ratio = statistics.median(o / b for o, b in zip(ours, bare))
        rss[label] = max(peaks)
        print(f"[{label} {size_mib:.1f} MiB BF16] mtpquant build median {statistics.median(ours):.2f}s, "
              f"bare llama-quantize+sha256sum median {statistics.median(bare):.2f}s, "
              f"median ratio {ratio:.3f} (target <= 1.03); mtpquant peak RSS {max(peaks) / 1024:.1f} MiB")
    print(f"peak RSS small vs large: {rss['small'] / 1024:.1f} MiB vs {rss['large'] / 1024:.1f} MiB "
          f"(target <= 1024 MiB, independent of model size)")

    src = work / "small-BF16.gguf"
    ladder = ["IQ3_XXS", "IQ4_XS", "Q4_K_M", "Q5_K_M"]
    t_ladder, _ = mtpquant_build(recipe_file(work, "ladder", src, ladder, imatrix=True), work / "run-ladder")
    t_single = 0.0
    for v in ladder:
        s, _ = mtpquant_build(recipe_file(work, f"single-{v}", src, [v], imatrix=True), work / f"run-single-{v}")
        t_single += s
    print(f"[ladder] 4-variant ladder {t_ladder:.2f}s vs 4 single-variant builds {t_single:.2f}s: ratio "
          f"{t_ladder / t_single:.3f} (target <= 0.8); shared: source hashing and inspection, the imatrix "
          f"(computed once), the toolchain probe")


if __name__ == "__main__":
    main()
