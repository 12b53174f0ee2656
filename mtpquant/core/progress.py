"""The library reports progress through a callback; the CLI draws it (tqdm on stderr)."""

from __future__ import annotations

from collections.abc import Callable

# progress(label, done, total): `label` names the step, done/total are in the step's own unit.
ProgressFn = Callable[[str, int, int], None]


def no_progress(label: str, done: int, total: int) -> None:
    return None
