"""The Ray executor: a build's tasks on a Ray cluster (`mtpquant build RECIPE --executor ray`, the cluster from
--ray-address or RAY_ADDRESS). The driver plans, checks every node, and places each task with its resources: a
whole node's CPUs for llama-quantize, one GPU for a smoke or eval when the recipe asks for GPU layers. Ray retries
a task whose worker died; the task's steps decide skip or redo where it runs, so a retry redoes only what did not
finish. Progress from every worker comes back to one display on the driver.

Imported only when --executor ray is chosen: ray is an optional dependency (`pip install 'mtpquant[ray]'`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mtpquant.core.errors import MtpquantError, UsageError
from mtpquant.core.progress import ProgressFn
from mtpquant.pipeline.executors.base import NodeNeeds, Outcome, Task, TaskRecord, check_order, record
from mtpquant.pipeline.executors.nodes import check_here

ENV_ADDRESS = "RAY_ADDRESS"
MAX_RETRIES = 3
POLL_S = 0.2
CONNECT_S = 5.0
THROTTLE_S = 0.2  # a worker sends a progress line at most this often per label (and always the last one)


@ray.remote(num_cpus=0)
class ProgressHub:
    """Collects progress and task starts from every worker; the driver drains it into one display."""

    def __init__(self) -> None:
        self.events: list = []
        self.starts: dict[str, list] = {}

    def report(self, label: str, done: int, total: int) -> None:
        """A worker's progress line."""
        self.events.append((label, done, total))

    def started(self, name: str, node: str, pid: int, at: float) -> None:
        """A task attempt began (a retried task starts more than once)."""
        self.starts.setdefault(name, []).append({"node": node, "pid": pid, "at": at})

    def drain(self) -> tuple[list, dict]:
        """The progress lines since the last drain, and every start so far."""
        events, self.events = self.events, []
        return events, self.starts


class _Forward:
    """A worker's progress function: throttled, fire-and-forget calls to the hub."""

    def __init__(self, hub) -> None:
        self.hub = hub
        self.last: dict[str, float] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last.get(label, 0.0) < THROTTLE_S:
            return
        self.last[label] = now
        self.hub.report.remote(label, done, total)


def _node_label() -> str:
    ctx = ray.get_runtime_context()
    return f"{ray.util.get_node_ip_address()}/{ctx.get_node_id()[:8]}"


@ray.remote
def _run_task(task: Task, hub, *inputs) -> tuple[str, Any, dict]:
    """One task on a worker, given what the tasks it needs returned: ("ok", value, record) or ("error", (class,
    state, args), record) for an error the user can act on (mtpquant's errors do not all survive plain pickling,
    so they travel as their parts)."""
    node, started = _node_label(), time.time()
    failed = next((i for i in inputs if i[0] != "ok"), None)
    if failed is not None:  # a task this one needs failed: its error, not this task's, is the build's
        return failed
    hub.started.remote(task.name, node, os.getpid(), started)
    try:
        value = task.work(_Forward(hub), *[value for _, value, _ in inputs])
    except MtpquantError as exc:
        return "error", (type(exc), dict(exc.__dict__), exc.args), record(task, started, node=node).__dict__
    return "ok", value, record(task, started, node=node).__dict__


@ray.remote(num_cpus=0)
def _check_node(needs: NodeNeeds) -> tuple[str, list[str], dict]:
    return _node_label(), *check_here(needs)


def _rebuild(cls: type, state: dict, args: tuple) -> MtpquantError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class Executor:
    """Tasks as Ray tasks on the cluster at `address` (else $RAY_ADDRESS)."""

    name = "ray"
    remote = True

    def __init__(self, address: str | None = None, max_retries: int = MAX_RETRIES):
        self.address = address or os.environ.get(ENV_ADDRESS)
        if not self.address:
            raise UsageError("--executor ray needs a Ray cluster",
                             "give --ray-address HOST:PORT or set RAY_ADDRESS; `ray start --head` starts one")
        self.max_retries = max_retries
        _reachable(self.address)
        try:
            ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING,
                     ignore_reinit_error=True)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UsageError(f"cannot connect to the Ray cluster at {self.address}: {exc}",
                             "check --ray-address / RAY_ADDRESS and that the cluster is up (ray status)") from None
        self.nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.hub = ProgressHub.remote()
        self.checked: list[dict] = []
        self.records: list[TaskRecord] = []  # every task run, in the order they finished

    def describe(self) -> dict:
        """The engine, the cluster's address and each node (with its binaries once checked)."""
        return {"executor": self.name, "address": self.address, "max_retries": self.max_retries,
                "nodes": self.checked or [{"node": f"{n['NodeManagerAddress']}/{n['NodeID'][:8]}",
                                           "resources": _resources(n)} for n in self.nodes]}

    def check_nodes(self, needs: NodeNeeds, progress: ProgressFn) -> list[dict]:
        """Each node that can take tasks checks itself, on itself; one line naming the first node that cannot."""
        workers = [n for n in self.nodes if n["Resources"].get("CPU", 0) or n["Resources"].get("GPU", 0)]
        if not workers:
            raise UsageError(f"the Ray cluster at {self.address} has no node with CPUs or GPUs",
                             "start worker nodes (ray start --address ...)")
        if needs.gpus and not any(n["Resources"].get("GPU", 0) >= needs.gpus for n in workers):
            raise UsageError(f"the recipe's smoke.gpu_layers asks for {needs.gpus} GPU(s) per smoke and eval, and no "
                             f"node of the cluster at {self.address} has as many", "add GPU nodes, or drop "
                             "smoke.gpu_layers")
        refs = [_check_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(needs) for n in workers]
        progress("check nodes", 0, len(refs))
        answers = []
        for i, ref in enumerate(refs):
            answers.append(ray.get(ref))
            progress("check nodes", i + 1, len(refs))
        for node, problems, _ in answers:
            if problems:
                raise UsageError(f"node {node}: {problems[0]}", "fix that node, or stop it, and run the build again")
        self.checked = [{"node": node, "resources": _resources(n), "binaries": binaries}
                        for (node, _, binaries), n in zip(answers, workers)]
        return self.checked

    def run(self, tasks: Sequence[Task], progress: ProgressFn,
            on_done: Callable[[str, Any], None] | None = None) -> dict[str, Outcome]:
        check_order(tasks)
        resources = [self._resources_for(t) for t in tasks]  # an infeasible task is refused before any starts
        refs: dict[str, ray.ObjectRef] = {}
        for t, (cpus, gpus) in zip(tasks, resources):
            # a task after others gets their results as arguments: Ray starts it once they are done
            refs[t.name] = _run_task.options(num_cpus=cpus, num_gpus=gpus, max_retries=self.max_retries,
                                             retry_exceptions=False, name=t.name).remote(
                t, self.hub, *[refs[a] for a in t.after])
        pending = {ref: name for name, ref in refs.items()}
        out: dict[str, Outcome] = {}
        progress("cluster tasks", 0, len(tasks))
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                starts = self._drain(progress)
                for ref in ready:
                    name = pending.pop(ref)
                    value, rec = self._result(name, ref)
                    attempts = len(starts.get(name, [])) or 1
                    out[name] = Outcome(value, TaskRecord(**{**rec, "attempts": attempts}))
                    self.records.append(out[name].record)
                    progress("cluster tasks", len(out), len(tasks))
                    if on_done:
                        on_done(name, value)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        self._drain(progress)
        return out

    def close(self) -> None:
        """Disconnect this driver; the cluster stays up."""
        ray.shutdown()

    def _resources_for(self, task: Task) -> tuple[float, float]:
        """(CPUs, GPUs) to ask Ray for; 0 CPUs means a whole node: the smallest node's CPU count."""
        if task.gpus and not any(n["Resources"].get("GPU", 0) >= task.gpus for n in self.nodes):
            raise UsageError(f"{task.name} needs {task.gpus} GPU(s) and no node of the cluster at {self.address} has "
                             f"as many", "add GPU nodes")
        if task.gpus:
            return task.cpus or 1, task.gpus
        whole = min((n["Resources"]["CPU"] for n in self.nodes if n["Resources"].get("CPU", 0)), default=1)
        return task.cpus or whole, 0

    def _drain(self, progress: ProgressFn) -> dict:
        events, starts = ray.get(self.hub.drain.remote())
        for label, done, total in events:
            progress(label, done, total)
        return starts

    def _result(self, name: str, ref) -> tuple[Any, dict]:
        try:
            status, value, rec = ray.get(ref)
        except ray.exceptions.RayTaskError:  # a bug in a task: raised with the task's own traceback in its text
            raise
        except ray.exceptions.RayError as exc:  # the worker or its node died, every attempt
            raise MtpquantError(f"task {name}: Ray gave up on it after {self.max_retries + 1} attempt(s) "
                                f"({type(exc).__name__})", "see the cluster's logs (ray logs)") from None
        if status == "error":
            raise _rebuild(*value)
        return value, rec


def _reachable(address: str) -> None:
    """One line at once for a HOST:PORT nobody answers on (ray.init would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", ray:// client addresses: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_S).close()
    except OSError as exc:
        raise UsageError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc})",
                         "check --ray-address / RAY_ADDRESS and that the cluster is up (ray status)") from None


def _resources(node: dict) -> dict:
    res = node.get("Resources", {})
    return {k: res[k] for k in ("CPU", "GPU") if k in res}
