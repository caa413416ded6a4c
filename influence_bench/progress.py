"""Progress events from deep inside a run (training theta*, retraining ground truth, an estimator's
call) to whichever front end listens: ``influence-bench score`` draws them as a progress bar on a
terminal (``cli/bars.py``); with nobody listening an event costs one list lookup.

Events are ``(phase, done, total)``: ``phase`` a short name ("training theta*", "ground truth",
"estimator"), ``done``/``total`` units of work (``total`` None: unknown). ``phase(...)`` marks the start
and the end of a phase; ``advance(...)`` reports work inside it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

Listener = Callable[[str, int, "int | None"], None]
_LISTENERS: list[Listener] = []


@contextmanager
def listening(fn: Listener) -> Iterator[None]:
    _LISTENERS.append(fn)
    try:
        yield
    finally:
        _LISTENERS.remove(fn)


def advance(phase_name: str, done: int, total: int | None = None) -> None:
    for fn in list(_LISTENERS):
        try:
            fn(phase_name, done, total)
        except Exception:  # noqa: BLE001 - a display must never break a run
            pass


@contextmanager
def phase(name: str, total: int | None = None) -> Iterator[None]:
    advance(name, 0, total)
    try:
        yield
    finally:
        if total is not None:
            advance(name, total, total)
