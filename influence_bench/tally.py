"""What this process trained and retrained, per setting, so that a run can say so.

Counted: ``TRAINED``, every theta* fitted (not loaded from the shipped layer or the cache);
``COMPUTED``, every ground-truth entry (one retrained model per removed index or LDS subset, per
replicate) a build computed because no store held it; ``VERIFIED``, entries recomputed only to
check stored ones (``ground-truth ship --check``). The pytest plugin prints the totals of the
fidelity suites at the end of a session and fails a shipped smoke case that trained or retrained.
"""

from __future__ import annotations

from collections import Counter

TRAINED = "models trained"
COMPUTED = "ground-truth entries computed"
VERIFIED = "ground-truth entries recomputed to verify"

_COUNTS: Counter = Counter()  # (what, setting id) -> count


def add(what: str, setting_id: str, n: int = 1) -> None:
    if n:
        _COUNTS[(what, setting_id)] += int(n)


def snapshot() -> Counter:
    return Counter(_COUNTS)


def since(before: Counter) -> Counter:
    """What was counted after ``before`` (a ``snapshot()``)."""
    out = Counter(_COUNTS)
    out.subtract(before)
    return +out


def total(counts: Counter, what: str) -> int:
    return sum(n for (w, _), n in counts.items() if w == what)
