"""Minibatch retraining (SGD, momentum, Adam): the vmapped engine against torch.optim one model at a
time, the paired data order, replicates and their noise ceiling, scratch mode, OOM halving, the
BatchNorm fallback, and the errors for recipes that cannot run."""

import warnings

import numpy as np
import pytest
import torch
from helpers import blobs as _blobs
from helpers import minibatch_setting as _setting
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from influence_bench.api.loading import build_context
from influence_bench.groundtruth import GroundTruthStore, build, engine
from influence_bench.groundtruth.builder import store_key
from influence_bench.models.flat import FlatModel, mlp
from influence_bench.spec.settings import GroundTruthSpec, Setting
from influence_bench.training import minibatch as mb

RECIPES = [mb.Recipe("sgd", 0.1, 16, 40), mb.Recipe("sgd", 0.05, 16, 40, momentum=0.9), mb.Recipe("adam", 0.01, 16, 40)]


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    fm = FlatModel(mlp(4, 3, 1, 8).double())
    ds = _blobs(64, 16)
    return fm, ds


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.optimizer}-m{r.momentum}")
def test_batched_equals_torch_optim_one_model_at_a_time(small, recipe):
    fm, ds = small
    w = torch.ones(4, 64, dtype=torch.float64)
    w[1, 3] = 0
    w[2, 40] = 0
    w[3, :10] = 0
    a = mb.train_batched(fm, fm.flat(), w, ds.x_train, ds.y_train, 1e-3, recipe, seed=5)
    b = mb.train_sequential(fm, fm.flat(), w, ds.x_train, ds.y_train, 1e-3, recipe, seed=5)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert (a[0] - a[1]).abs().max() > 1e-6  # the removal changed the model


@pytest.mark.parametrize("model", ["mlp", "logreg"])
def test_closed_form_gradients_take_the_steps_vmap_takes(model, monkeypatch):
    """Tanh MLPs and softmax-linear models step on the hand-written batched gradients (``closed_form``),
    the same models as vmap's to rounding; other models keep vmap."""
    from influence_bench.curvature import linear
    from influence_bench.curvature import mlp as mlp_fast
    from influence_bench.models.flat import LogisticRegression

    torch.manual_seed(0)
    fm = FlatModel(mlp(4, 3, 2, 8).double() if model == "mlp" else LogisticRegression(4, 3).double())
    assert mb.closed_form(fm) is (mlp_fast if model == "mlp" else linear)
    ds = _blobs(64, 16)
    w = torch.ones(3, 64, dtype=torch.float64)
    w[1, 3] = w[2, 40] = 0
    r = mb.Recipe("sgd", 0.05, 16, 40, momentum=0.9)
    fast = mb.train_batched(fm, fm.flat(), w, ds.x_train, ds.y_train, 1e-3, r, seed=2)
    monkeypatch.setattr(mb, "closed_form", lambda fm: None)
    slow = mb.train_batched(fm, fm.flat(), w, ds.x_train, ds.y_train, 1e-3, r, seed=2)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    assert not torch.equal(fast[0], fast[1])
    assert mb.closed_form(FlatModel(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                                         torch.nn.Linear(8, 3)).double())) is None


@hsettings(max_examples=15, deadline=None)
@given(n=st.integers(5, 80), bs=st.integers(1, 5), steps=st.integers(0, 60), seed=st.integers(0, 2**31 - 1))
def test_data_order_is_a_permutation_per_epoch_and_depends_on_the_seed_alone(n, bs, steps, seed):
    order = mb.data_order(n, bs, steps, seed).numpy()
    assert order.shape == (steps, bs)
    per_epoch = n // bs
    for e in range(0, steps, per_epoch):
        block = order[e:e + per_epoch].ravel()
        assert len(np.unique(block)) == len(block) and block.min(initial=0) >= 0 and block.max(initial=0) < n
    np.testing.assert_array_equal(order, mb.data_order(n, bs, steps, seed).numpy())


def test_a_model_does_not_depend_on_its_chunk(small):
    fm, ds = small
    w = torch.ones(3, 64, dtype=torch.float64)
    w[1, 7] = 0
    w[2, 8] = 0
    r = RECIPES[1]
    together = mb.train_batched(fm, fm.flat(), w, ds.x_train, ds.y_train, 1e-3, r, seed=1)
    alone = mb.train_batched(fm, fm.flat(), w[1:2], ds.x_train, ds.y_train, 1e-3, r, seed=1)
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-12)


def test_batchnorm_in_training_mode_falls_back_to_sequential_with_a_warning():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                                 torch.nn.Linear(8, 3)).double().train()
    fm = FlatModel(module)
    ds = _blobs(32, 4)
    w = torch.ones(2, 32, dtype=torch.float64)
    w[1, 0] = 0
    r = mb.Recipe("sgd", 0.1, 8, 5)
    with pytest.warns(UserWarning, match="BatchNorm in training mode.*one model at a time"):
        got = mb.train(fm, fm.flat(), w, ds.x_train, ds.y_train, 0.0, r, 0, what="bn-model")
    want = mb.train_sequential(fm, fm.flat(), w, ds.x_train, ds.y_train, 0.0, r, 0)
    torch.testing.assert_close(got, want)


def test_convolutions_give_the_same_models_batched_and_sequential():
    from influence_bench.models.cnn import AllConvCNN

    torch.manual_seed(0)
    fm = FlatModel(AllConvCNN(1, 3, width=2).double())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.arange(24) % 3
    w = torch.ones(2, 24, dtype=torch.float64)
    w[1, 5] = 0
    r = mb.Recipe("sgd", 0.1, 8, 6, momentum=0.9)
    a = mb.train_batched(fm, fm.flat(), w, x, y, 1e-3, r, 0)
    b = mb.train_sequential(fm, fm.flat(), w, x, y, 1e-3, r, 0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert mb.prefer_sequential(fm, torch.device("cpu"))


def test_models_trained_side_by_side_in_threads_are_bitwise_the_ones_trained_one_after_another(monkeypatch):
    """The engine's CPU path for convolutions trains one model per core (``model_workers``), each on its
    own copy of the module: the same bits as one model after another, in order, with any number of
    workers; and ``train`` takes that path with the machine's core count."""
    from influence_bench.models.cnn import AllConvCNN
    from influence_bench.training.fit import reproducible_threads

    fm = FlatModel(AllConvCNN(1, 3, width=2))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 1, 28, 28, generator=g)
    y = torch.arange(24) % 3
    w = torch.ones(5, 24)
    w[torch.arange(1, 5), torch.tensor([0, 5, 9, 23])] = 0
    theta0 = fm.flat() + 0.01 * torch.randn(5, fm.n_params, generator=g)  # a start per model
    r = mb.Recipe("adam", 0.01, 8, 9)
    with reproducible_threads(True):
        one = mb.train_sequential(fm, theta0, w, x, y, 1e-3, r, 3)
        for workers in (2, 3, 8):
            torch.testing.assert_close(mb.train_sequential(fm, theta0, w, x, y, 1e-3, r, 3, workers=workers), one,
                                       rtol=0, atol=0)
        assert not torch.equal(one[0], one[1])  # the rows differ: a mix-up between threads would show
        seen = []
        real = mb._in_threads
        monkeypatch.setattr(mb, "model_workers", lambda device: 2)
        monkeypatch.setattr(mb, "_in_threads", lambda *a: seen.append(a[3]) or real(*a))
        torch.testing.assert_close(mb.train(fm, theta0, w, x, y, 1e-3, r, 3), one, rtol=0, atol=0)
    assert seen == [2]
    assert mb.model_workers(torch.device("cpu")) >= 1


def test_warm_minibatch_ground_truth_replicates_and_ceiling(tmp_path):
    ctx = build_context(_setting(), _blobs(96, 24), use_cache=False)
    assert engine.stochastic(ctx) and engine.n_replicates(ctx) == 2
    store = GroundTruthStore(tmp_path, shipped=None)
    removed = np.arange(0, 96, 3)
    e = build(ctx, "loo", removed, store)
    r0 = store.load(store_key(ctx, "loo", replicate=0)).select(removed).delta
    r1 = store.load(store_key(ctx, "loo", replicate=1)).select(removed).delta
    np.testing.assert_allclose(e.delta, (r0 + r1) / 2)
    assert np.abs(r0 - r1).max() > 0  # different data orders
    assert 0 < e.noise_ceiling <= 1
    # the same replicate recomputed: bit-identical (the data order is a function of the seed)
    np.testing.assert_array_equal(engine.compute(ctx, removed[:4], replicate=1).delta, r1[:4])
    assert store_key(ctx, "loo", replicate=0).digest != store_key(ctx, "loo", replicate=1).digest


def test_scratch_control_of_replicate_zero_is_theta_star():
    ctx = build_context(_setting(mode="scratch"), _blobs(96, 24), use_cache=False)
    res = engine.retrain(ctx, np.array([-1, 5]))
    torch.testing.assert_close(res.theta[0], ctx.theta, rtol=0, atol=1e-10)
    assert (res.theta[1] - ctx.theta).abs().max() > 1e-6


def test_scratch_on_a_convex_full_batch_setting_is_the_leave_one_out_optimum():
    from influence_bench.api.loading import get_context
    from influence_bench.spec import catalog

    warm = get_context(catalog.get_setting("iris-logreg-wd1e-3"))
    scratch = get_context(warm.setting.with_mode("scratch"))
    assert not engine.stochastic(scratch) and engine.n_replicates(scratch) == 1
    res = engine.retrain(scratch, np.array([-1, 4]))
    torch.testing.assert_close(res.theta[0], scratch.theta, rtol=0, atol=1e-8)  # the control is theta*
    removed = np.array([4, 60, 111])
    np.testing.assert_allclose(engine.compute(scratch, removed).delta, engine.compute(warm, removed).delta,
                               rtol=1e-5, atol=1e-9)  # one optimum, reached from init or from theta*


def test_minibatch_ground_truth_without_a_learning_rate_is_refused():
    s = _setting()
    bad = Setting(**{**s.__dict__, "ground_truth": GroundTruthSpec(retrain="adam", batch_size=16, steps=5)})
    ctx = build_context(bad, _blobs(96, 24), use_cache=False)
    with pytest.raises(ValueError, match="needs lr > 0"):
        engine.compute(ctx, np.arange(2))


def test_out_of_memory_halves_the_chunk_and_gives_the_same_result(monkeypatch):
    ctx = build_context(_setting(), _blobs(96, 24), use_cache=False)
    removed = np.arange(10)
    want = engine.compute(ctx, removed, chunk=64).delta
    real = engine.retrain_weights
    sizes = []

    def limited(ctx_, w, *a, **k):
        sizes.append(w.shape[0])
        if w.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(ctx_, w, *a, **k)

    monkeypatch.setattr(engine, "retrain_weights", limited)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = engine.compute(ctx, removed, chunk=64).delta
    np.testing.assert_array_equal(got, want)
    assert max(s for s in sizes if s <= 3) == 2 or 3 in sizes
    assert any("halving the chunk" in str(w.message) for w in caught)


def test_modes_have_their_own_store_keys_and_pbrf_needs_no_control(tmp_path):
    from influence_bench.groundtruth import pbrf

    s = _setting(optimizer="lbfgs+newton", retrain="newton-cg", replicates=1)
    warm = build_context(s, _blobs(96, 24), use_cache=False)
    p = build_context(s.with_mode("pbrf"), _blobs(96, 24), use_cache=False)
    assert not engine.stochastic(warm) and not engine.stochastic(p)
    assert store_key(warm, "loo").digest != store_key(p, "loo").digest
    assert p.setting.ground_truth.max_steps >= 50 and p.setting.with_mode("pbrf") is p.setting
    got = build(p, "loo", np.arange(4), GroundTruthStore(tmp_path, shipped=None)).delta
    np.testing.assert_allclose(got, pbrf.compute(p, np.arange(4)).delta, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="unknown ground-truth mode 'exactish'"):
        s.with_mode("exactish")
    assert s.with_mode("pbrf").training_hash == s.training_hash  # one trained model for every mode


def test_a_model_that_fails_in_its_thread_stops_the_others_and_raises_its_error(monkeypatch):
    """One failing model (or Ctrl-C in the caller) ends the side-by-side training at the other threads'
    next step, and its error reaches the caller: no thread trains on in the background."""
    import threading

    from influence_bench.models.cnn import AllConvCNN
    from influence_bench.training.fit import reproducible_threads

    fm = FlatModel(AllConvCNN(1, 3, width=2))
    x = torch.randn(24, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    y = torch.arange(24) % 3
    w = torch.ones(4, 24)
    w[1, 7] = 0  # the failing model
    r = mb.Recipe("sgd", 0.01, 8, 300)
    calls, lock, real = [0], threading.Lock(), mb._batch_objective

    def failing(model, p, xb, yb, wb, *a):
        with lock:
            calls[0] += 1
        if len(wb) and wb.sum() < len(wb) and calls[0] > 40:  # the model without a point, after a while
            raise RuntimeError("model 1 diverged")
        return real(model, p, xb, yb, wb, *a)

    monkeypatch.setattr(mb, "_batch_objective", failing)
    with reproducible_threads(True), pytest.raises(RuntimeError, match="model 1 diverged"):
        mb.train_sequential(fm, fm.flat(), w, x, y, 1e-3, r, 0, workers=2)
    done = calls[0]
    assert done < 300  # stopped long before the 1200 steps of the four models (model 0 alone takes 300)
    assert threading.active_count() == 1 or all(not t.name.startswith("ThreadPoolExecutor")
                                                for t in threading.enumerate())
