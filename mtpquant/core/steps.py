"""The one Step shape: what decides a step's result (its input key), the receipt that records it, how to run it.

`run_step` is the only place that decides skip or redo: a step is skipped when its receipt has the same kind
version and input key and every output the receipt vouches for is intact; otherwise it runs, its receipt is
written, and only then are its outputs moved into place (a kill in between leaves a receipt without its file,
redone next run, never a complete-looking file that no receipt vouches for).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from mtpquant.core.files import sha256_file
from mtpquant.core.receipts import Receipt, file_name
from mtpquant.core.rundir import RunDir


@dataclass(frozen=True)
class Step:
    name: str  # what progress and the manifest call it, e.g. "quantize:Q4_K_M"
    kind: type[Receipt]
    variant: str | None
    key: str  # sha256 of everything that decides the step's outputs
    run: Callable[[], Receipt]
    finish: Callable[[], None] | None = None  # moves outputs into place, after the receipt is written


@dataclass(frozen=True)
class Done:
    step: Step
    receipt: Receipt
    skipped: bool
    seconds: float

    def manifest_entry(self) -> dict:
        """What manifest.json says of the step: its receipt, whether it ran, and the files it vouches for."""
        return {"receipt": f"receipts/{file_name(self.receipt.KIND, self.step.variant)}", "skipped": self.skipped,
                "seconds": self.seconds, "outputs": self.receipt.outputs()}


def intact(run: RunDir, receipt: Receipt) -> bool:
    """Every output the receipt vouches for is in the run directory with its recorded sha256."""
    for name, sha in receipt.outputs().items():
        path = run.root / name
        if not path.is_file() or sha256_file(path) != sha:
            return False
    return True


def run_step(run: RunDir, step: Step, force: bool = False) -> Done:
    """Skip the step if its receipt shows the same inputs and intact outputs; else run it and record it."""
    previous = None if force else run.read(step.kind, step.variant, stale_ok=True)
    if previous is not None and getattr(previous, "input_key", None) == step.key and intact(run, previous):
        return Done(step, previous, True, 0.0)
    started = time.monotonic()
    receipt = step.run()
    run.write(receipt, step.variant)
    if step.finish is not None:
        step.finish()
    return Done(step, receipt, False, round(time.monotonic() - started, 3))
