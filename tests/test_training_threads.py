"""theta* must not depend on the machine's thread count (shipped ground truth is keyed on it)."""

import torch

from influence_bench.data import datasets as data
from influence_bench.spec import catalog
from influence_bench.training import fit as training


def _theta(setting, threads: int) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        theta = training.train(setting, data.load(setting.data), use_cache=False).theta
        assert torch.get_num_threads() == threads  # the fit restores the caller's thread count
        return theta
    finally:
        torch.set_num_threads(before)


def test_fit_without_weight_decay_is_identical_on_one_and_two_threads():
    # no minimiser without weight decay: the end point of the fit is where rounding leads it
    s = catalog.get_setting("iris-mlp-d4-w16-wd0")
    assert torch.equal(_theta(s, 1), _theta(s, 2))
