"""The local executor: this machine. One task after another (the default), or with `overlap` two lanes: the CPU
steps of the next variant (quantize, verify) run while the GPU steps of the previous one (smoke, eval) run, each
lane on its own CPU set so the quantize does not take the cores the smoke's timings depend on."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from mtpquant.core.progress import ProgressFn
from mtpquant.pipeline.executors.base import (
    CPU,
    GPU,
    NodeNeeds,
    Outcome,
    Task,
    TaskRecord,
    check_order,
    cpu_set,
    record,
    split_cpus,
    this_node,
)


class Executor:
    """Tasks on this machine: in order, or in a CPU lane and a GPU lane on disjoint CPU sets (`overlap`)."""

    name = "local"
    remote = False  # tasks run in this process: nothing for other nodes to check

    def __init__(self, overlap: bool = False, reserve: int | None = None):
        self.overlap = overlap
        self.records: list[TaskRecord] = []  # every task run, in the order they finished
        self.lanes: dict[str, list[int]] = {}
        if overlap:
            cpus = cpu_set()
            gpu_cpus, cpu_cpus = split_cpus(cpus, reserve or max(1, len(cpus) // 2))
            self.lanes = {GPU: gpu_cpus, CPU: cpu_cpus}

    def describe(self) -> dict:
        """The engine, its mode and, overlapping, each lane's CPUs."""
        return {"executor": self.name, "mode": "overlap" if self.overlap else "sequential", "node": this_node(),
                **({"lanes": self.lanes} if self.overlap else {})}

    def check_nodes(self, needs: NodeNeeds, progress: ProgressFn) -> list[dict]:
        """One machine: the plan already checked the source and the toolchain here."""
        return []

    def run(self, tasks: Sequence[Task], progress: ProgressFn,
            on_done: Callable[[str, Any], None] | None = None) -> dict[str, Outcome]:
        check_order(tasks)
        out = self._lanes(tasks, progress, on_done) if self.overlap else self._in_order(tasks, progress, on_done)
        self.records += [o.record for o in out.values()]
        return out

    def close(self) -> None:
        """Nothing to let go of."""

    def _in_order(self, tasks: Sequence[Task], progress: ProgressFn,
                  on_done: Callable[[str, Any], None] | None) -> dict[str, Outcome]:
        out: dict[str, Outcome] = {}
        for task in tasks:
            started = time.time()
            value = task.work(progress, *[out[a].value for a in task.after])
            out[task.name] = Outcome(value, record(task, started))
            if on_done:
                on_done(task.name, value)
        return out

    def _lanes(self, tasks: Sequence[Task], progress: ProgressFn,
               on_done: Callable[[str, Any], None] | None) -> dict[str, Outcome]:
        """A thread per lane; progress and results come back to this thread, which alone draws and records."""
        events: queue.Queue = queue.Queue()
        finished = {t.name: threading.Event() for t in tasks}
        values: dict[str, Any] = {}
        failed = threading.Event()

        def forward(label: str, done: int, total: int) -> None:
            events.put(("progress", (label, done, total)))

        def lane(kind: str, mine: list[Task]) -> None:
            # On Linux the affinity is the calling thread's, and the programs this thread starts inherit it.
            os.sched_setaffinity(0, self.lanes[kind])
            for task in mine:
                for name in task.after:
                    while not finished[name].wait(0.2):
                        if failed.is_set():
                            return
                if failed.is_set():
                    return
                started = time.time()
                try:
                    value = task.work(forward, *[values[a] for a in task.after])
                except Exception as exc:  # noqa: BLE001 -- handed to the driver thread, which raises it
                    failed.set()
                    events.put(("error", exc))
                    return
                values[task.name] = value
                events.put(("done", Outcome(value, record(task, started))))
                finished[task.name].set()

        threads = [threading.Thread(target=lane, args=(kind, [t for t in tasks if t.kind == kind]), daemon=True,
                                    name=f"mtpquant-{kind}-lane") for kind in (CPU, GPU)]
        for t in threads:
            t.start()
        out: dict[str, Outcome] = {}
        error: BaseException | None = None
        try:
            while any(t.is_alive() for t in threads) or not events.empty():
                try:
                    what, item = events.get(timeout=0.2)
                except queue.Empty:
                    continue
                if what == "progress":
                    progress(*item)
                elif what == "error":
                    error = error or item
                else:
                    out[item.record.name] = item
                    if on_done and error is None:
                        on_done(item.record.name, item.value)
        except BaseException:  # Ctrl-C or a failing on_done: the lanes start nothing more
            failed.set()
            raise
        if error is not None:
            raise error
        return out
