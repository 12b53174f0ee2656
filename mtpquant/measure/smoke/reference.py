"""What quantizing the draft head cost: each variant's acceptance minus a reference head's, on the same prompts.

The reference (recipe `smoke.reference`) is another variant of the run (a Q8_0 made by the same build, say) or the
BF16 source itself. The difference is paired per prompt, in percentage points, at the gates' fixed k, with the
smoke's own interval rules (BCa over prompts, none below 10).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtpquant.core.errors import UsageError
from mtpquant.llamacpp.toolchain import Toolchain
from mtpquant.measure.smoke.acceptance import Settings, measure_head
from mtpquant.measure.smoke.stats import figure, mean
from mtpquant.measure.smoke.suite import Prompt

SOURCE = "source"


def counts_from_runs(runs: Sequence[dict], k: int) -> dict[str, tuple[int, int]]:
    """Per prompt: (accepted, drafted) of the chat requests at draft length k, summed over seeds."""
    out: dict[str, tuple[int, int]] = {}
    for r in runs:
        if r["server"] == f"k{k}" and r["mode"] == "chat":
            a, d = out.get(r["prompt"], (0, 0))
            out[r["prompt"]] = (a + r["draft_n_accepted"], d + r["draft_n"])
    return out


def measure_source(tc: Toolchain, source: Path, prompts: Sequence[Prompt], k: int, max_tokens: int, log: Path,
                   threads: int | None, gpu_layers: int | None) -> dict[str, tuple[int, int]]:
    """The source model's draft head on the same prompts (greedy, so one seed stands for all)."""
    got = measure_head(tc, source, prompts, Settings(k=k, max_tokens=max_tokens, slots=4, threads=threads,
                                                         gpu_layers=gpu_layers), log)
    return {r["prompt"]: (r["draft_n_accepted"], r["draft_n"]) for r in got["per_prompt"]}


def difference(variant: dict[str, tuple[int, int]], reference: dict[str, tuple[int, int]], name: str,
               k: int) -> dict:
    """The variant's acceptance minus the reference's, per prompt in percentage points, and its interval."""
    shared = [p for p in variant if p in reference and variant[p][1] and reference[p][1]]
    if not shared:
        raise UsageError(f"smoke.reference {name}: no prompt with drafts on both heads at k={k}")
    diff = np.array([100.0 * (variant[p][0] / variant[p][1] - reference[p][0] / reference[p][1]) for p in shared])
    return {"reference": name, "k": k, "prompts": len(shared),
            "difference_pp": figure(mean, (diff,), 2),
            "meaning": "variant acceptance minus reference acceptance, per prompt, in percentage points "
                       "(negative: quantizing cost acceptance)"}
