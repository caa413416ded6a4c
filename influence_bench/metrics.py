"""Fidelity metrics: per-test-point Spearman, Pearson and top-k overlap, aggregated over test points
as a mean with a Student t 95% CI; the noise ceiling of replicated ground truth."""

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
    """Row-wise Pearson correlation of ``[..., m]`` arrays; NaN where a row is constant (tested by
    its values, not its centred ones: the mean of equal values can round off them, e.g. of three times
    0.1, and would leave rounding noise to correlate)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape[-1] == 0:  # nothing to correlate (every removal left out)
        return np.full(np.broadcast_shapes(x.shape, y.shape)[:-1], np.nan)
    constant = (np.ptp(x, axis=-1) == 0) | (np.ptp(y, axis=-1) == 0)
    xc = _unit_scale(x - x.mean(-1, keepdims=True))
    yc = _unit_scale(y - y.mean(-1, keepdims=True))
    den = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(-1) / den
    r = np.where((den > 0) & ~constant, r, np.nan)
    return np.clip(r, -1.0, 1.0)


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Spearman rank correlation (Pearson of average ranks)."""
    return pearson(rankdata(x), rankdata(y))


def topk_size(m: int) -> int:
    """``k`` of the top-k overlap over ``m`` scored removals: ``min(10, m // 4)``, at least 1."""
    return max(1, min(10, m // 4))


def _top_set(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values, plus every value tied with the k-th largest."""
    kth = np.sort(row)[::-1][k - 1]
    return np.flatnonzero(row >= kth)


def topk_overlap(predicted: np.ndarray, actual: np.ndarray, k: int | None = None) -> np.ndarray:
    """Row-wise top-k overlap of ``[..., m]`` arrays: ``|T_k(predicted) ∩ T_k(actual)| / k``.

    ``T_k(x)`` is the set of the k removals of largest *signed* value (the k that raise the test loss
    most when removed: predicted, or retrained), with ``k = topk_size(m) = min(10, m // 4)`` (at least
    1) unless given. Where values tie with the k-th largest, ``T_k`` holds all of them and the overlap
    is divided by ``max(|T_k(predicted)|, |T_k(actual)|)`` instead of k, so the value does not
    depend on the order of the removals and is 1 exactly when the two sets are equal. NaN where a row
    is constant (like the correlations: no removal stands out).
    """
    x = np.asarray(predicted, dtype=np.float64)
    y = np.asarray(actual, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"predicted {x.shape} and actual {y.shape} differ in shape")
    m = x.shape[-1]
    k = topk_size(m) if k is None else int(k)
    if not 1 <= k <= m:
        raise ValueError(f"k = {k} must be in [1, {m}]")
    out = np.full(x.shape[:-1], np.nan)
    for row in np.ndindex(x.shape[:-1]):
        a, b = x[row], y[row]
        if not (np.isfinite(a).all() and np.isfinite(b).all()) or np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        ta, tb = _top_set(a, k), _top_set(b, k)
        out[row] = np.intersect1d(ta, tb).size / max(ta.size, tb.size)
    return out


METRICS = {"spearman": spearman, "pearson": pearson, "topk-overlap": topk_overlap}


@dataclass
class Aggregate:
    """A metric over test points: mean with its Student t 95% CI, median, min, and every value."""

    mean: float
    ci_low: float  # NaN with fewer than 2 defined test points
    ci_high: float
    median: float
    min: float
    n: int  # test points with a defined value
    n_undefined: int  # test points whose actual (or predicted) change was constant
    per_test: list = field(default_factory=list)  # None where undefined


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The Student t confidence interval of the mean of ``values`` (finite, n >= 2):
    ``mean ± t_{(1+level)/2, n-1} · s / sqrt(n)`` with ``s`` the sample standard deviation (ddof 1).
    Exact for normal values at any n, which is why it is used here: a case has about 10 test points,
    where a percentile bootstrap is too narrow. Zero spread gives ``(mean, mean)``; ``n < 2`` NaNs."""
    from scipy.special import stdtrit  # the t quantile, as scipy.stats.t.ppf computes it (0.8 s less to import)

    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return float("nan"), float("nan")
    mean, sem = float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size))
    half = float(stdtrit(v.size - 1, 0.5 + level / 2)) * sem
    return mean - half, mean + half


def aggregate(values: np.ndarray, level: float = 0.95) -> Aggregate:
    """Mean over the defined (finite) test-point values with its Student t CI (``t_interval``)."""
    values = np.asarray(values, dtype=np.float64)
    ok = values[np.isfinite(values)]
    per = [None if not np.isfinite(v) else float(v) for v in values]
    if ok.size == 0:
        nan = float("nan")
        return Aggregate(nan, nan, nan, nan, nan, 0, len(values), per)
    lo, hi = t_interval(ok, level)
    return Aggregate(float(ok.mean()), lo, hi, float(np.median(ok)), float(ok.min()),
                     int(ok.size), int(values.size - ok.size), per)


def spearman_brown(r: np.ndarray | float, factor: float = 2.0) -> np.ndarray:
    """Reliability of a ``factor`` times longer test from reliability ``r``: ``k r / (1 + (k-1) r)``."""
    r = np.asarray(r, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return factor * r / (1.0 + (factor - 1.0) * r)


def split_half_ceiling(replicates: np.ndarray) -> np.ndarray:
    """Split-half **reliability** per test point from ``[R, n_test, m]`` replicate ground truths (R >= 2).

    The replicates are split into two halves (even- and odd-numbered; with odd R the last one is
    left out), each half is averaged, and the Spearman correlation over the m removals between the
    two half-means is corrected by Spearman-Brown (``2 r / (1 + r)``) to the reliability of the
    full set. A negative split-half correlation means the replicates share no reliable signal:
    its reliability is 0 (Spearman-Brown is not defined for it). ``[n_test]``, NaN where a half-mean
    is constant.

    The name is historical: the ground-truth code (``groundtruth/compute.py``) stores this value as
    ``Entries.noise_ceiling``. The ceiling on the correlation an estimator can attain against that
    ground truth is its square root (``attainable_correlation``), which scoring reports.
    """
    rep = np.asarray(replicates, dtype=np.float64)
    if rep.ndim != 3 or rep.shape[0] < 2:
        raise ValueError(f"need [R >= 2, n_test, m] replicates, got shape {rep.shape}")
    half = rep.shape[0] // 2
    a, b = rep[0:2 * half:2].mean(0), rep[1:2 * half:2].mean(0)
    r = spearman(a, b)
    return np.where(np.isnan(r), np.nan, spearman_brown(np.clip(r, 0.0, 1.0)))


def noise_ceiling(replicates: np.ndarray) -> float:
    """Mean split-half reliability over test points (undefined test points are left out); see
    ``split_half_ceiling`` for why it carries this name, and ``attainable_correlation``."""
    c = split_half_ceiling(replicates)
    return float(np.nanmean(c)) if np.isfinite(c).any() else float("nan")


def attainable_correlation(reliability: float) -> float:
    """The noise ceiling on a correlation with ground truth of reliability ``rho``: ``sqrt(rho)``.

    Classical test theory: ground truth ``G = T + e`` with reliability ``rho = var T / var G``; an
    estimator can at best recover ``T``, and ``corr(T, G) = sqrt(rho)``. Reliability 1 (deterministic
    retraining) gives 1; reliability is clipped to [0, 1] first; NaN (unmeasured) stays NaN."""
    r = float(reliability)
    return float("nan") if not np.isfinite(r) else float(np.sqrt(min(max(r, 0.0), 1.0)))
