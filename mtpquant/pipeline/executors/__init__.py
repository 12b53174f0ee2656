"""Where a build's independent tasks run. `local` (this machine: in order, or overlapping CPU and GPU steps) is
the default; `ray` places them on a Ray cluster. An engine is one module here with an `Executor` class (see
base.Executor) and one line in ENGINES; it is imported only when chosen, so its dependencies stay optional."""

from __future__ import annotations

import importlib

from mtpquant.core.errors import UsageError

ENGINES = {"local": "mtpquant.pipeline.executors.local", "ray": "mtpquant.pipeline.executors.ray"}
EXTRAS = {"ray": "ray"}  # the pip extra that installs an engine's dependencies


def engine(name: str):
    """The module of an engine, imported now; one line when its optional dependency is not installed."""
    try:
        return importlib.import_module(ENGINES[name])
    except ModuleNotFoundError as exc:
        if name in EXTRAS and exc.name and exc.name.split(".")[0] == name:
            raise UsageError(f"--executor {name} needs {exc.name}, which is not installed",
                             f"pip install 'mtpquant[{EXTRAS[name]}]'") from None
        raise


def create(name: str, *, ray_address: str | None = None, overlap: bool = False, reserve: int | None = None):
    """The executor `mtpquant build --executor NAME` runs with; one line for options that do not fit it."""
    if name not in ENGINES:
        raise UsageError(f"--executor {name}: no such executor", f"choose one of {', '.join(sorted(ENGINES))}")
    if ray_address and name != "ray":
        raise UsageError("--ray-address is for --executor ray", "add --executor ray, or drop --ray-address")
    if overlap and name != "local":
        raise UsageError(f"--overlap is for --executor local ({name} places tasks by their declared resources)",
                         "drop --overlap")
    module = engine(name)
    return module.Executor(ray_address) if name == "ray" else module.Executor(overlap=overlap, reserve=reserve)
