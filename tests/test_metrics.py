import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
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


@settings(max_examples=200, deadline=None)
@given(pairs())
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


def test_aggregate_mean_ci_median_min_and_undefined_points():
    vals = np.array([0.9, 0.5, np.nan, 0.7, 0.1])
    agg = metrics.aggregate(vals, n_boot=4000, seed=1)
    ok = vals[np.isfinite(vals)]
    assert agg.mean == pytest.approx(ok.mean())
    assert agg.median == pytest.approx(np.median(ok))
    assert agg.min == pytest.approx(0.1)
    assert (agg.n, agg.n_undefined) == (4, 1)
    assert agg.ci_low < agg.mean < agg.ci_high
    assert agg.ci_low >= ok.min() and agg.ci_high <= ok.max()
    assert agg.per_test[2] is None and agg.per_test[0] == 0.9
    # deterministic given the seed
    assert metrics.aggregate(vals, n_boot=4000, seed=1).ci_low == agg.ci_low


def test_bootstrap_ci_covers_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = 0
    for t in range(200):
        sample = rng.normal(0.5, 0.2, size=30)
        agg = metrics.aggregate(sample, n_boot=1000, seed=t)
        hits += agg.ci_low <= 0.5 <= agg.ci_high
    assert 0.88 <= hits / 200 <= 0.99


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
