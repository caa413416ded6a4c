"""Fingerprints of what an estimator can reach (``scoring/context_guard.py``): any in-place change of
one element is seen, whatever the layout; kinds that cannot be read as bytes never raise."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from influence_bench.scoring.context_guard import _crc


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), i=st.integers(0, 10_000), value=st.floats(-1e6, 1e6, width=32),
       seed=st.integers(0, 2**16), kind=st.sampled_from(["tensor", "transposed", "ndarray", "reversed"]))
def test_changing_one_element_changes_the_fingerprint(n, i, value, seed, kind):
    base = np.random.default_rng(seed).standard_normal((n, 3)).astype(np.float32)
    if kind == "tensor":
        a = torch.from_numpy(base.copy())
    elif kind == "transposed":
        a = torch.from_numpy(base.copy()).t()
    elif kind == "ndarray":
        a = base.copy()
    else:
        a = base.copy()[::-1]
    before = _crc(a)
    assert _crc(a) == before  # reading does not change it
    flat_idx = np.unravel_index(i % int(np.prod(a.shape)), a.shape)
    old = float(a[flat_idx])
    if np.float32(value) == np.float32(old):
        return
    a[flat_idx] = value  # a 4-byte change: a CRC-32 sees every burst of up to 32 bits
    assert _crc(a) != before


def test_kinds_that_cannot_be_read_as_bytes_do_not_raise():
    assert _crc(np.array([object()], dtype=object)) == ("object", (1,))
    assert _crc(torch.randn(3, dtype=torch.complex64).conj())[0] == "torch.complex64"
    assert _crc(torch.randn(4, 4).to_sparse())[1] == (4, 4)
    assert _crc(np.float64(1.0))[0] == "unread"
