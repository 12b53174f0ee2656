"""The machine a measurement ran on: CPU, memory, GPUs (from nvidia-smi where there is one), as receipts record it."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

from mtpquant.core.files import sha256_json
from mtpquant.core.procs import capture

GPU_FIELDS = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.mem",
              "power.limit", "power.default_limit", "pstate", "persistence_mode")


def proc_field(path: str, *names: str) -> str | None:
    """The first value of one of these `key: value` fields of a /proc file (None where it cannot be read)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in names:
            return value.strip()
    return None


def gpus() -> list[dict]:
    """One record per NVIDIA GPU (the fields of GPU_FIELDS as nvidia-smi words them); empty without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    code, out = capture([exe, "--query-gpu=" + ",".join(GPU_FIELDS), "--format=csv,noheader"], timeout=30)
    if code != 0:
        return [{"error": out.strip().splitlines()[-1] if out.strip() else f"nvidia-smi exit code {code}"}]
    return [dict(zip(GPU_FIELDS, (v.strip() for v in line.split(",")))) for line in out.splitlines() if line.strip()]


def cuda_version() -> str | None:
    """The CUDA version the driver reports in nvidia-smi's banner."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    code, out = capture([exe], timeout=30)
    for part in out.split("|") if code == 0 else []:
        if "CUDA Version:" in part:
            return part.split("CUDA Version:")[1].strip().split()[0]
    return None


def describe() -> dict:
    """CPU model and cores, memory, OS, GPUs and CUDA: what a skeptic needs to place a speed figure."""
    mem_kib = proc_field("/proc/meminfo", "MemTotal")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": proc_field("/proc/cpuinfo", "model name", "Model") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "cores_usable": usable,
        "memory_gib": round(int(mem_kib.split()[0]) / (1 << 20), 1) if mem_kib else None,
        "os": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
        "gpus": gpus(), "cuda": cuda_version(),
    }


def fingerprint(machine: dict) -> str:
    """What makes two machines the same for a speed figure: CPU, cores, GPU models and driver (not clocks)."""
    return sha256_json({"cpu": machine.get("cpu"), "cores": machine.get("cores_usable"),
                        "gpus": [(g.get("name"), g.get("driver_version")) for g in machine.get("gpus") or []]})
