"""What a node checks before any task is placed on it: that it sees the run directory the driver sees (shared
storage), the source with the plan's sha256, and the driver's pinned toolchain (built here from the sdist when the
node has none). Run on the node itself by a remote engine; every problem is one line."""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from pathlib import Path

from mtpquant import __version__
from mtpquant.core.errors import MtpquantError
from mtpquant.core.files import sha256_file, stat_key, write_text_atomic
from mtpquant.core.progress import ProgressFn, no_progress
from mtpquant.core.receipts import SourceReceipt
from mtpquant.core.rundir import RunDir
from mtpquant.llamacpp.toolchain import BuildConfig, install, toolchain_dir
from mtpquant.pipeline.executors.base import NodeNeeds

PROBE = ".nodes-probe"
SAME_BUILD = ("package", "llama_cpp_commit", "sdist_sha256", "cmake_flags", "compiler", "machine")


def needs_of(run: RunDir, source: Path, files: dict[str, str], toolchain: dict, gpus: int = 0) -> NodeNeeds:
    """What every node must see for this run; writes the probe file the nodes read back."""
    token = uuid.uuid4().hex
    write_text_atomic(run.work / PROBE, token)
    receipt = run.read(SourceReceipt, stale_ok=True)
    shards = {Path(source).absolute().parent / name: sha for name, sha in files.items()}
    return NodeNeeds(run.root, f"work/{PROBE}", token, shards, receipt.hash_cache if receipt else {}, toolchain,
                     __version__, gpus)


def check_here(needs: NodeNeeds, build: bool = True, progress: ProgressFn = no_progress) -> tuple[list[str], dict]:
    """(every reason this machine cannot run the build's tasks, [] when it can; the sha256 of its binaries)."""
    if __version__ != needs.mtpquant:
        return [f"runs mtpquant {__version__}, the driver {needs.mtpquant}: install the same mtpquant everywhere"], {}
    problems = _storage(needs)
    if problems:
        return problems, {}
    problems = _source(needs) + _toolchain(needs.toolchain, build, progress)
    return problems, _binaries(Path(needs.toolchain.get("bin_dir", "")), needs.toolchain) if not problems else {}


def _binaries(bin_dir: Path, ident: dict) -> dict[str, str]:
    return {name: sha256_file(bin_dir / name) for name in sorted(ident.get("binaries") or {"llama-quantize": {}})}


def _storage(needs: NodeNeeds) -> list[str]:
    probe = needs.run_root / needs.probe
    try:
        seen = probe.read_text(encoding="utf-8")
    except OSError:
        return [(f"does not see the run directory {needs.run_root} (put it on storage every node mounts at the "
                 f"same path)")]
    if seen != needs.token:
        return [(f"sees another {needs.run_root} than the driver's (a local folder of the same name?): put the "
                 f"run directory on storage every node mounts at the same path")]
    try:
        fd, name = tempfile.mkstemp(prefix=".node-write-", dir=needs.run_root)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return [f"cannot write in the run directory {needs.run_root} ({exc.strerror or exc})"]
    return []


def _source(needs: NodeNeeds) -> list[str]:
    for path, sha in needs.source_files.items():
        if not path.is_file():
            return [f"does not see the source {path} (put it on storage every node mounts at the same path)"]
        # the driver's hash of the same file (same real path, size and mtime on shared storage) is not re-read
        seen = needs.hash_cache.get(stat_key(path)) or sha256_file(path)
        if seen != sha:
            return [(f"sees {path} with sha256 {seen[:12]}..., the plan has {sha[:12]}... (a different copy of "
                     f"the source: put one copy on shared storage)")]
    return []


def _toolchain(ident: dict, build: bool, progress: ProgressFn) -> list[str]:
    bin_dir = Path(ident.get("bin_dir", ""))
    wrong = _wrong_binary(bin_dir, ident)
    if wrong is None:
        return []
    config = _build_config(ident)
    if not build or config is None or toolchain_dir(config) != bin_dir.parent:
        return [(f"{wrong}, and it cannot build the driver's toolchain at the same path (install the pinned "
                 f"llama.cpp there: mtpquant toolchain install, with the same cache folder as the driver)")]
    try:
        built = install(config, progress).identity
    except MtpquantError as exc:
        return [f"{wrong}; building it here failed: {exc.one_line()}"]
    # Two builds of the same sdist differ in bytes (build paths are compiled in), so a node's own build is taken
    # when it is the same source, flags and compiler; the manifest's node list records its binaries.
    differs = [k for k in SAME_BUILD if built.get(k) != ident.get(k)]
    why = f"built the pinned llama.cpp here, but its {', '.join(differs)} differ from the driver's build"
    return [f"{why} (share the driver's cache folder with this node)"] if differs else []


def _wrong_binary(bin_dir: Path, ident: dict) -> str | None:
    """What is wrong with this node's copy of the driver's binaries, or None when each has the driver's sha256."""
    binaries = ident.get("binaries") or {"llama-quantize": {}}
    for name, meta in sorted(binaries.items()):
        path = bin_dir / name
        if not path.is_file():
            return f"has no {path}"
        if meta.get("sha256") and sha256_file(path) != meta["sha256"]:
            return f"has another {path} than the driver (sha256 differs)"
    return None


def _build_config(ident: dict) -> BuildConfig | None:
    """The BuildConfig that made the driver's cached toolchain, or None when it was not built by mtpquant."""
    if ident.get("source") != "cache" or "==" not in ident.get("package", ""):
        return None
    flags = ident.get("cmake_flags") or []
    arch = next((m.group(1) for f in flags if (m := re.match(r"-DCMAKE_CUDA_ARCHITECTURES=(.+)", f))), None)
    return BuildConfig(version=ident["package"].split("==", 1)[1], cuda="-DGGML_CUDA=ON" in flags,
                       cuda_architectures=arch, native="-DGGML_NATIVE=ON" in flags)
