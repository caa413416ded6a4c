import numpy as np
import pytest
import scipy.stats
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from influence_bench import metrics

rows = st.integers(1, 4)
cols = st.integers(3, 30)


@st.composite
def pairs(draw):
    r, c = draw(rows), draw(cols)
    # small integer values make ties common, which is where rank code goes wrong
    elems = st.one_of(st.integers(-3, 3).map(float), st.floats(-1e3, 1e3, allow_nan=False))
    x = draw(arrays(np.float64, (r, c), elements=elems))
    y = draw(arrays(np.float64, (r, c), elements=elems))
    return x, y


def test_correlations_over_no_removals_are_undefined_not_an_error():
    """Every removal of a test point left out (none converged): NaN, as for a constant row."""
    for f in (metrics.pearson, metrics.spearman):
        r = f(np.zeros((3, 0)), np.zeros((3, 0)))
        assert r.shape == (3,) and np.isnan(r).all()


@settings(max_examples=200, deadline=None)
@given(pairs())
@example((np.array([[0.0, 0.0, 1.0]]), np.full((1, 3), 0.1)))  # a constant whose mean rounds off it
def test_spearman_and_pearson_equal_scipy(xy):
    x, y = xy
    sp, pe = metrics.spearman(x, y), metrics.pearson(x, y)
    for k in range(x.shape[0]):
        if np.ptp(x[k]) == 0 or np.ptp(y[k]) == 0:
            assert np.isnan(sp[k]) and np.isnan(pe[k])
            continue
        ref_s = scipy.stats.spearmanr(x[k], y[k]).statistic
        ref_p = scipy.stats.pearsonr(x[k], y[k]).statistic
        if np.isnan(ref_s):  # scipy: ranks constant although values differ is impossible; keep honest
            assert np.isnan(sp[k])
        else:
            assert sp[k] == pytest.approx(ref_s, abs=1e-9)
        assert pe[k] == pytest.approx(ref_p, abs=1e-9)


@given(arrays(np.float64, st.integers(1, 40), elements=st.integers(-5, 5).map(float)))
def test_rankdata_equals_scipy_average_ranks(a):
    np.testing.assert_allclose(metrics.rankdata(a), scipy.stats.rankdata(a, method="average"))


def test_aggregate_mean_t_interval_median_min_and_undefined_points():
    vals = np.array([0.9, 0.5, np.nan, 0.7, 0.1])
    agg = metrics.aggregate(vals)
    ok = vals[np.isfinite(vals)]
    assert agg.mean == pytest.approx(ok.mean())
    assert agg.median == pytest.approx(np.median(ok))
    assert agg.min == pytest.approx(0.1)
    assert (agg.n, agg.n_undefined) == (4, 1)
    assert agg.per_test[2] is None and agg.per_test[0] == 0.9
    # the Student t interval with n - 1 = 3 degrees of freedom, by hand and by scipy
    half = 3.182446305284263 * ok.std(ddof=1) / 2.0
    assert (agg.ci_low, agg.ci_high) == pytest.approx((ok.mean() - half, ok.mean() + half), abs=1e-12)
    ref = scipy.stats.t.interval(0.95, df=3, loc=ok.mean(), scale=scipy.stats.sem(ok))
    assert (agg.ci_low, agg.ci_high) == pytest.approx(ref, abs=1e-12)
    # one defined point: no interval; none: everything undefined; no spread: a point interval
    one = metrics.aggregate(np.array([0.4, np.nan]))
    assert one.mean == 0.4 and np.isnan(one.ci_low) and np.isnan(one.ci_high)
    assert np.isnan(metrics.aggregate(np.array([np.nan, np.nan])).mean)
    assert (metrics.aggregate(np.full(5, 0.3)).ci_low, metrics.aggregate(np.full(5, 0.3)).ci_high) == \
        pytest.approx((0.3, 0.3))


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.integers(2, 20), elements=st.floats(-1, 1, allow_nan=False)),
       st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_t_interval_equals_scipy_and_inverts_the_one_sample_t_test(v, level):
    agg = metrics.aggregate(v, level=level)
    sem = scipy.stats.sem(v)
    if sem == 0 or not np.isfinite(sem):
        assert agg.ci_low == pytest.approx(agg.mean, abs=1e-12) and agg.ci_high == pytest.approx(agg.mean, abs=1e-12)
        return
    lo, hi = scipy.stats.t.interval(level, df=v.size - 1, loc=v.mean(), scale=sem)
    assert agg.ci_low == pytest.approx(lo, abs=1e-9) and agg.ci_high == pytest.approx(hi, abs=1e-9)
    assert agg.ci_low <= agg.mean <= agg.ci_high
    # duality: a value on the interval's edge is exactly at the two-sided test's alpha; inside, p > alpha
    if hi - lo > 1e-6:
        assert scipy.stats.ttest_1samp(v, hi).pvalue == pytest.approx(1 - level, abs=1e-6)
        assert scipy.stats.ttest_1samp(v, (lo + hi) / 2).pvalue > 1 - level


def test_t_interval_covers_the_truth_about_95_percent_of_the_time_at_n_10():
    rng = np.random.default_rng(0)
    hits = sum(agg.ci_low <= 0.5 <= agg.ci_high
               for agg in (metrics.aggregate(rng.normal(0.5, 0.2, size=10)) for _ in range(2000)))
    # exact for normal data: 1900 of 2000 expected, binomial sd ~10
    assert 1865 <= hits <= 1935


def _topk_direct(x, y, k):
    """Direct definition for tie-free rows: the k largest by sorting, intersected."""
    def top(a):
        return set(np.argsort(-a)[:k].tolist())

    return len(top(x) & top(y)) / k


def test_topk_overlap_against_a_direct_computation():
    rng = np.random.default_rng(3)
    for m in (4, 7, 40, 100, 250):
        x, y = rng.normal(size=(5, m)), rng.normal(size=(5, m))
        y[0] = x[0] + 0.1 * y[0]  # one nearly agreeing row
        k = metrics.topk_size(m)
        assert k == max(1, min(10, m // 4))
        got = metrics.topk_overlap(x, y)
        np.testing.assert_allclose(got, [_topk_direct(x[r], y[r], k) for r in range(5)])
    assert metrics.topk_size(40) == 10 and metrics.topk_size(100) == 10 and metrics.topk_size(20) == 5
    # by hand: k = 1 for m = 4; the largest of x is index 3, of y index 0
    assert metrics.topk_overlap(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1]))[()] == 0.0
    # signed, not |value|: the most negative predictions are not "top"
    assert metrics.topk_overlap(np.array([-9.0, 1, 2, 3]), np.array([-9.0, 3, 2, 1]), k=1)[()] == 0.0
    # ties at the k-th value: every tied index is in the set; overlap over the larger set
    assert metrics.topk_overlap(np.array([5.0, 5, 1, 0]), np.array([5.0, 4, 3, 0]), k=1)[()] == pytest.approx(1 / 2)
    # constant rows are undefined, like the correlations
    assert np.isnan(metrics.topk_overlap(np.ones(8), np.arange(8.0)))
    with pytest.raises(ValueError, match="shape"):
        metrics.topk_overlap(np.ones(8), np.ones(9))
    assert "topk-overlap" in metrics.METRICS


@settings(max_examples=200, deadline=None)
@given(pairs(), st.randoms(use_true_random=False))
def test_topk_overlap_properties(xy, rnd):
    x, y = xy
    got = metrics.topk_overlap(x, y)
    perm = np.array(rnd.sample(range(x.shape[1]), x.shape[1]))
    np.testing.assert_array_equal(metrics.topk_overlap(x[:, perm], y[:, perm]), got)  # removal order is irrelevant
    np.testing.assert_array_equal(metrics.topk_overlap(y, x), got)  # symmetric
    same = metrics.topk_overlap(x, x)
    for r in range(x.shape[0]):
        if np.ptp(x[r]) == 0 or np.ptp(y[r]) == 0:
            assert np.isnan(got[r])
        else:
            assert 0.0 <= got[r] <= 1.0
        if np.ptp(x[r]) > 0:
            assert same[r] == 1.0
            # a strictly increasing transform keeps the top set (doubling is exact in floating point;
            # a shift such as -7 for negatives rounds tiny values onto each other and makes ties)
            np.testing.assert_array_equal(metrics.topk_overlap(2.0 * x[r], y[r]), got[r])


def test_split_half_ceiling_matches_hand_computation():
    from influence_bench.metrics import noise_ceiling, spearman_brown, split_half_ceiling

    # two replicates, one test point: ranks [1,2,3,4] vs [1,3,2,4], sum d^2 = 2,
    # rho = 1 - 6*2 / (4*15) = 0.8; Spearman-Brown: 2*0.8 / 1.8 = 0.8889
    rep = np.array([[[1.0, 2.0, 3.0, 4.0]], [[10.0, 30.0, 20.0, 40.0]]])
    np.testing.assert_allclose(split_half_ceiling(rep), [16 / 18])
    # four replicates: halves are the means of replicates (0, 2) and (1, 3)
    rep4 = np.array([[[1.0, 2.0, 3.0, 4.0]], [[1.0, 2.0, 3.0, 4.0]],
                     [[1.0, 2.0, 3.0, 4.0]], [[1.0, 5.0, 3.0, 4.0]]])
    # half A = [1,2,3,4]; half B = [1,3.5,3,4] -> ranks [1,3,2,4]: rho 0.8 again
    np.testing.assert_allclose(split_half_ceiling(rep4), [16 / 18])
    # identical replicates: ceiling 1; anti-correlated halves: no reliable signal, ceiling 0
    assert noise_ceiling(np.stack([rep[0], rep[0]])) == pytest.approx(1.0)
    assert noise_ceiling(np.stack([rep[0], -rep[0]])) == 0.0
    assert np.isnan(split_half_ceiling(np.zeros((2, 1, 4))))[0]
    assert spearman_brown(0.5) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="R >= 2"):
        split_half_ceiling(rep[:1])


def test_attainable_correlation_is_the_square_root_of_the_reliability():
    # ground truth G = T + noise with var T / var G = rho: the best estimator (T itself) reaches sqrt(rho)
    rng = np.random.default_rng(0)
    t = rng.normal(size=200_000)
    g = t + rng.normal(scale=np.sqrt(1 / 0.64 - 1), size=t.size)  # reliability 0.64
    assert metrics.pearson(t, g)[()] == pytest.approx(metrics.attainable_correlation(0.64), abs=0.01)
    assert metrics.attainable_correlation(0.64) == pytest.approx(0.8)
    assert metrics.attainable_correlation(1.0) == 1.0 and metrics.attainable_correlation(0.0) == 0.0
    assert np.isnan(metrics.attainable_correlation(float("nan")))
