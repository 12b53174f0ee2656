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
MIN_UNITS = 10  # fewer independent prompts than this: no interval is printed at all


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
    """BCa bootstrap CI of stat(*arrays), resampling the units (the last axis) jointly with replacement.

    Bias-corrected and accelerated (the acceleration from the jackknife): it keeps its coverage for skewed
    statistics such as ratios, where the plain percentile interval does not. `stat` must accept arrays with a
    leading resample axis. None when no resample gives a finite value.
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
    theta = float(stat(*arrs))
    if not math.isfinite(theta) or values.min() == values.max():
        return float(values.min()), float(values.max())
    z0 = _norm_ppf(min(max(np.mean(values < theta) + 0.5 * np.mean(values == theta), 1e-6), 1 - 1e-6))
    jack = np.array([float(stat(*[np.delete(a, i, axis=-1) for a in arrs])) for i in range(n)]) if n > 1 else None
    accel = 0.0
    if jack is not None and np.all(np.isfinite(jack)):
        d = jack.mean() - jack
        den = 6.0 * float(np.sum(d ** 2)) ** 1.5
        accel = float(np.sum(d ** 3)) / den if den > 0 else 0.0
    qs = []
    for alpha in ((1 - level) / 2, (1 + level) / 2):
        z = _norm_ppf(alpha)
        qs.append(100 * _norm_cdf(z0 + (z0 + z) / (1 - accel * (z0 + z))))
    lo, hi = np.percentile(values, qs)
    return float(lo), float(hi)


def _norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _norm_ppf(p: float) -> float:
    """Inverse of the standard normal CDF (bisection: exact enough for interval end points)."""
    lo, hi = -10.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _norm_cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def figure(stat: Stat, arrays: Sequence[np.ndarray], digits: int = 4, clusters: Sequence | None = None,
           min_units: int = MIN_UNITS) -> dict:
    """{"value", "ci95", "n", "note"}: the statistic on all units and its bootstrap CI over the units.

    With `clusters` (the prompt of each unit) the bootstrap resamples whole clusters: at temperature 0 a prompt's
    seeds are replicates, not independent draws. `n` is the number of independent units (prompts); below
    `min_units` there is no interval at all ("n too small for an interval"), and when every unit gives the same
    value the note says so ("identical on all N prompts") instead of a zero-width interval passing for precision.
    """
    arrs = [np.asarray(a, dtype=float) for a in arrays]
    if arrs[0].size == 0:
        return {"value": None, "ci95": None, "n": 0, "note": "no units"}
    units = by_cluster(stat, arrs, clusters) if clusters is not None else arrs
    n = int(units[0].shape[-1])
    v = float(stat(*arrs))
    out = {"value": rounded(v, digits), "ci95": None, "n": n, "note": None}
    if not math.isfinite(v):
        out["note"] = "not defined"
    elif n < min_units:
        out["note"] = f"n too small for an interval: {n} prompts"
    elif _all_equal(stat, units):
        out["note"] = f"identical on all {n} prompts"
    else:
        ci = bootstrap_ci(stat, units)
        out["ci95"] = [rounded(ci[0], digits), rounded(ci[1], digits)] if ci else None
    return out


def _all_equal(stat: Stat, units: Sequence[np.ndarray]) -> bool:
    per_unit = [float(stat(*[u[..., i:i + 1] for u in units])) for i in range(units[0].shape[-1])]
    return max(per_unit) - min(per_unit) == 0 if all(map(math.isfinite, per_unit)) else False


def rounded(x: float | None, digits: int = 4) -> float | None:
    """x rounded to `digits`; None for None, nan and infinities (receipts hold no non-finite numbers)."""
    return None if x is None or not math.isfinite(x) else round(float(x), digits)
