"""Time and memory of one block: the peak is the block's own, not the process lifetime's."""

import numpy as np

from influence_bench.scoring.measure import measure


def _touch(mb: int) -> float:
    a = np.ones(mb * 2**20 // 8)  # written, so resident
    return float(a[::4096].sum())


def test_peak_memory_is_scoped_to_the_block():
    for _ in range(3):  # memory freed earlier in the process (other tests) must not hide the block's own
        _touch(600)
    with measure("cpu") as big:
        _touch(300)
    assert big.seconds > 0
    if big.memory_scope != "block":  # not Linux: only the lifetime peak is available
        assert big.peak_memory_mb is not None
        return
    assert big.extra_memory_mb > 250, big
    with measure("cpu") as small:  # the 300 MB are freed: a later small block must not report them
        _touch(20)
    assert small.extra_memory_mb < 150, small
    assert small.peak_memory_mb < big.peak_memory_mb - 150
