"""What every executor shares: a task (independent, idempotent work with declared resources), the record of where
and when it ran, and what the nodes must all see before anything is scheduled."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mtpquant.core.errors import UsageError
from mtpquant.core.progress import ProgressFn

CPU, GPU = "cpu", "gpu"  # the two kinds of step the local executor overlaps


@dataclass(frozen=True)
class Task:
    """One unit of a build that may run anywhere: its steps go through core.steps.run_step where it runs, so a
    task run twice (a retry, a second build) redoes nothing that is already done."""

    name: str  # e.g. "quantize:Q4_K_M", as progress and the schedule call it
    work: Callable[..., Any]  # work(progress, *values of `after`); pickled to remote engines (use partials)
    kind: str = CPU
    cpus: int = 0  # 0: the engine's default for the kind (a whole node for llama-quantize on Ray)
    gpus: int = 0
    after: tuple[str, ...] = ()  # names of tasks whose outputs this one reads


@dataclass(frozen=True)
class TaskRecord:
    """Where and when one task ran (wall-clock seconds since the epoch, comparable between nodes)."""

    name: str
    kind: str
    node: str
    pid: int
    cpus: list[int]  # the CPU set its processes were allowed on
    gpus: list[str]  # the GPU ids it was given (CUDA_VISIBLE_DEVICES), [] for none
    started: float
    ended: float
    attempts: int = 1

    def overlaps(self, other: TaskRecord) -> float:
        """Seconds during which both tasks ran."""
        return max(0.0, min(self.ended, other.ended) - max(self.started, other.started))

    def to_json(self) -> dict:
        return {"task": self.name, "kind": self.kind, "node": self.node, "pid": self.pid, "cpus": self.cpus,
                "gpus": self.gpus, "started": round(self.started, 3), "ended": round(self.ended, 3),
                "seconds": round(self.ended - self.started, 3), "attempts": self.attempts}


@dataclass(frozen=True)
class Outcome:
    """A task's return value and its record."""

    value: Any
    record: TaskRecord


@dataclass
class Schedule:
    """Every task an executor ran for a build, in the order they finished."""

    executor: dict
    records: list[TaskRecord] = field(default_factory=list)

    def during(self, name: str) -> list[dict]:
        """What else ran while task `name` ran: each other task, where, on which CPUs, and for how long."""
        mine = next((r for r in self.records if r.name == name), None)
        if mine is None:
            return []
        return [{"task": r.name, "node": r.node, "cpus": r.cpus, "gpus": r.gpus,
                 "overlap_seconds": round(mine.overlaps(r), 3)}
                for r in self.records if r.name != name and mine.overlaps(r) > 0]

    def to_json(self) -> dict:
        return {**self.executor, "tasks": [r.to_json() for r in self.records]}


@dataclass(frozen=True)
class NodeNeeds:
    """What every node must see before a task is placed on it: the run directory (shared storage), the source
    with its sha256, and the pinned toolchain."""

    run_root: Path
    probe: str  # a file in the run directory the driver wrote, with `token` in it
    token: str
    source_files: dict[Path, str]  # every shard of the source (absolute path) -> sha256
    hash_cache: dict  # core.files.stat_key -> sha256, from the source receipt: an unchanged file is not re-read
    toolchain: dict  # the driver's Toolchain.describe()
    mtpquant: str
    gpus: int = 0  # what the GPU steps ask for, each: some node must have as many


class Executor(Protocol):
    """An engine that runs a build's tasks: `local` (this machine) and `ray` (a Ray cluster)."""

    name: str
    remote: bool  # tasks run on other machines, which check_nodes asks first
    records: list[TaskRecord]  # every task it ran, in the order they finished

    def check_nodes(self, needs: NodeNeeds, progress: ProgressFn) -> list[dict]:
        """Every node's answer to `needs`, or one clear line (UsageError) naming a node that cannot run tasks."""

    def run(self, tasks: Sequence[Task], progress: ProgressFn,
            on_done: Callable[[str, Any], None] | None = None) -> dict[str, Outcome]:
        """Run independent tasks (each after the ones it names); `on_done(name, value)` on the driver as each one
        finishes; every task's outcome, or the first task's error once the others have stopped."""

    def describe(self) -> dict:
        """What the manifest and the schedule record of this executor."""

    def close(self) -> None:
        """Let go of the engine (a cluster connection)."""


def check_order(tasks: Sequence[Task]) -> None:
    """Task names are unique and every task comes after the tasks it needs (a programming error otherwise)."""
    seen: set[str] = set()
    for t in tasks:
        missing = [a for a in t.after if a not in seen]
        if t.name in seen or missing:
            raise ValueError(f"task {t.name}: duplicate, or listed before {missing}")
        seen.add(t.name)


def this_node() -> str:
    """The host name, as task records name a machine."""
    return socket.gethostname()


def cpu_set() -> list[int]:
    """The CPUs this thread (and the processes it starts) may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def gpu_ids() -> list[str]:
    """The GPUs given to this process (CUDA_VISIBLE_DEVICES), [] when none are."""
    ids = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [i for i in ids.split(",") if i.strip()]


def record(task: Task, started: float, attempts: int = 1, node: str | None = None) -> TaskRecord:
    """The record of a task that ran on this thread from `started` until now."""
    return TaskRecord(task.name, task.kind, node or this_node(), os.getpid(), cpu_set(), gpu_ids(), started,
                      time.time(), attempts)


def split_cpus(cpus: Sequence[int], reserved: int) -> tuple[list[int], list[int]]:
    """(the CPUs reserved for GPU steps, the rest for CPU steps); one clear line if there are too few."""
    cpus = sorted(cpus)
    if len(cpus) < 2:
        raise UsageError(f"--overlap needs at least 2 CPUs, this process may use {len(cpus)}",
                         "run without --overlap")
    if not 1 <= reserved < len(cpus):
        raise UsageError(f"--overlap reserves {reserved} CPU(s) for the smoke of {len(cpus)}",
                         f"set smoke.threads between 1 and {len(cpus) - 1}")
    return cpus[:reserved], cpus[reserved:]
