"""Fidelity metrics: per-test-point Spearman and Pearson, aggregated with a bootstrap CI."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def rankdata(a: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) along the last axis; ties share the mean of their ranks."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, axis=-1, kind="stable")
    sorted_a = np.take_along_axis(a, order, -1)
    n = a.shape[-1]
    ranks_sorted = np.empty_like(sorted_a)
    for row in np.ndindex(a.shape[:-1]):
        s = sorted_a[row]
        # boundaries of runs of equal values
        new = np.r_[True, s[1:] != s[:-1]]
        starts = np.flatnonzero(new)
        ends = np.r_[starts[1:], n]
        avg = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1 .. end
        ranks_sorted[row] = np.repeat(avg, ends - starts)
    ranks = np.empty_like(ranks_sorted)
    np.put_along_axis(ranks, order, ranks_sorted, -1)
    return ranks


def _unit_scale(a: np.ndarray) -> np.ndarray:
    """Rows divided by their largest |value| (zero rows stay zero): squares of tiny values such as
    1e-264 would underflow to 0 and make a well-defined correlation NaN."""
    m = np.abs(a).max(-1, keepdims=True)
    return a / np.where(m > 0, m, 1.0)


def pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of ``[..., m]`` arrays; NaN where a row is constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xc = _unit_scale(x - x.mean(-1, keepdims=True))
    yc = _unit_scale(y - y.mean(-1, keepdims=True))
    den = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(-1) / den
    r = np.where(den > 0, r, np.nan)
    return np.clip(r, -1.0, 1.0)


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Spearman rank correlation (Pearson of average ranks)."""
    return pearson(rankdata(x), rankdata(y))


METRICS = {"spearman": spearman, "pearson": pearson}


@dataclass
class Aggregate:
    """A metric over test points: mean with bootstrap 95% CI, median, min, and every value."""

    mean: float
    ci_low: float
    ci_high: float
    median: float
    min: float
    n: int  # test points with a defined value
    n_undefined: int  # test points whose actual (or predicted) change was constant
    per_test: list = field(default_factory=list)  # None where undefined


def aggregate(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Aggregate:
    values = np.asarray(values, dtype=np.float64)
    ok = values[np.isfinite(values)]
    per = [None if not np.isfinite(v) else float(v) for v in values]
    if ok.size == 0:
        nan = float("nan")
        return Aggregate(nan, nan, nan, nan, nan, 0, len(values), per)
    rng = np.random.default_rng(seed)
    boots = ok[rng.integers(0, ok.size, size=(n_boot, ok.size))].mean(1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Aggregate(float(ok.mean()), float(lo), float(hi), float(np.median(ok)), float(ok.min()),
                     int(ok.size), int(values.size - ok.size), per)


def spearman_brown(r: np.ndarray | float, factor: float = 2.0) -> np.ndarray:
    """Reliability of a ``factor`` times longer test from reliability ``r``: ``k r / (1 + (k-1) r)``."""
    r = np.asarray(r, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return factor * r / (1.0 + (factor - 1.0) * r)


def split_half_ceiling(replicates: np.ndarray) -> np.ndarray:
    """Noise ceiling per test point from ``[R, n_test, m]`` replicate ground truths (R >= 2 seeds).

    The replicates are split into two halves (even- and odd-numbered; with odd R the last one is
    left out), each half is averaged, and the Spearman correlation over the m removals between the
    two half-means is corrected by Spearman-Brown (``2 r / (1 + r)``) to the reliability of the
    full set. A negative split-half correlation means the replicates share no reliable signal:
    its ceiling is 0 (Spearman-Brown is not defined for it). ``[n_test]``, NaN where a half-mean is
    constant.
    """
    rep = np.asarray(replicates, dtype=np.float64)
    if rep.ndim != 3 or rep.shape[0] < 2:
        raise ValueError(f"need [R >= 2, n_test, m] replicates, got shape {rep.shape}")
    half = rep.shape[0] // 2
    a, b = rep[0:2 * half:2].mean(0), rep[1:2 * half:2].mean(0)
    r = spearman(a, b)
    return np.where(np.isnan(r), np.nan, spearman_brown(np.clip(r, 0.0, 1.0)))


def noise_ceiling(replicates: np.ndarray) -> float:
    """Mean split-half ceiling over test points (undefined test points are left out)."""
    c = split_half_ceiling(replicates)
    return float(np.nanmean(c)) if np.isfinite(c).any() else float("nan")
