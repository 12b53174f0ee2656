"""Statistics of the smoke figures: ratio of sums, mean, geometric mean ratio, and percentile bootstrap CIs that
resample clusters (a prompt with all its seeds)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Stat = Callable[..., np.ndarray]
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20260529
LEVEL = 0.95


def ratio_of_sums(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """sum(num)/sum(den) along the last axis; nan where the denominator is 0."""
    n, d = np.sum(num, axis=-1), np.sum(den, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, n / np.where(d > 0, d, 1), np.nan)


def mean(x: np.ndarray) -> np.ndarray:
    """Mean along the last axis."""
    return np.mean(x, axis=-1)


def geomean_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Geometric mean of num/den along the last axis."""
    return np.exp(np.mean(np.log(num) - np.log(den), axis=-1))


def _geomean(x: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(x))))


# How each statistic folds the units of one cluster (one prompt's seeds) into one unit without changing its value
# when clusters are the same size: sums stay sums, means become means, geometric means geometric means.
_COLLAPSE = {ratio_of_sums: np.sum, mean: np.mean, geomean_ratio: _geomean}


def by_cluster(stat: Stat, arrays: Sequence[np.ndarray], clusters: Sequence) -> list[np.ndarray]:
    """The arrays with the units of each cluster folded into one (for a bootstrap over clusters)."""
    fold = _COLLAPSE[stat]
    keys = list(dict.fromkeys(clusters))
    where = {k: [i for i, c in enumerate(clusters) if c == k] for k in keys}
    return [np.array([fold(np.asarray(a, dtype=float)[where[k]]) for k in keys]) for a in arrays]


def bootstrap_ci(stat: Stat, arrays: Sequence[np.ndarray], resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile bootstrap CI of stat(*arrays), resampling the units (the last axis) jointly with replacement.

    `stat` must accept arrays with a leading resample axis. None when no resample gives a finite value.
    """
    arrs = [np.asarray(a, dtype=float) for a in arrays]
    n = arrs[0].shape[-1]
    if n == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    values = np.asarray(stat(*[a[idx] for a in arrs]), dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def figure(stat: Stat, arrays: Sequence[np.ndarray], digits: int = 4, clusters: Sequence | None = None) -> dict:
    """{"value", "ci95"}: the statistic on all units and its bootstrap CI (None where undefined).

    With `clusters` (the prompt of each unit) the bootstrap resamples whole clusters: at temperature 0 a prompt's
    seeds are replicates, not independent draws, and treating them as such would narrow the CI.
    """
    arrs = [np.asarray(a, dtype=float) for a in arrays]
    if arrs[0].size == 0:
        return {"value": None, "ci95": None}
    v = float(stat(*arrs))
    ci = bootstrap_ci(stat, by_cluster(stat, arrs, clusters) if clusters is not None else arrs)
    return {"value": rounded(v, digits), "ci95": [rounded(ci[0], digits), rounded(ci[1], digits)] if ci else None}


def rounded(x: float | None, digits: int = 4) -> float | None:
    """x rounded to `digits`; None for None, nan and infinities (receipts hold no non-finite numbers)."""
    return None if x is None or not math.isfinite(x) else round(float(x), digits)
