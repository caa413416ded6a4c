"""The limits of one estimator call: ``Limits`` (time and memory per estimator, and how calls are
isolated; parsed from ``--time-limit`` / ``--memory-limit`` / ``--isolation``), the time limit as
``SIGALRM`` in the main thread, the memory limit as the soft address-space limit (Linux, CPU)."""

from __future__ import annotations

import os
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_SECONDS = 3600.0  # generous: the slowest built-in call on the CPU tiers takes minutes
ISOLATIONS = ("inline", "process")


class EstimatorTimeout(BaseException):
    """Raised inside the call at its time limit. A ``BaseException``, so that an estimator's own
    ``except Exception`` cannot swallow it."""


@dataclass(frozen=True)
class Limits:
    """Time and memory limits of every estimator call, and how calls are isolated. ``seconds`` and
    ``memory_mb`` map estimator names (``"*"``: every estimator) to limits; ``None`` as a value: no
    limit."""

    seconds: dict = field(default_factory=dict)
    memory_mb: dict = field(default_factory=dict)
    isolation: str = "inline"

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {self.isolation!r}")

    def for_estimator(self, est) -> tuple[float | None, float | None]:
        """(seconds, memory MB) for ``est``: its own entry, else ``"*"``, else the class's
        ``time_limit_s`` / ``memory_limit_mb``, else the defaults."""
        def pick(table: dict, attr: str, default):
            for key in (est.name, "*"):
                if key in table:
                    return table[key]
            own = getattr(type(est), attr, None)
            return default if own is None else own

        return pick(self.seconds, "time_limit_s", DEFAULT_SECONDS), pick(self.memory_mb, "memory_limit_mb", None)

    @classmethod
    def parse(cls, seconds: list[str] | None = None, memory_mb: list[str] | None = None,
              isolation: str | None = None) -> "Limits":
        """From option values: each ``VALUE`` (every estimator) or ``NAME=VALUE``; ``VALUE`` is a
        positive number or ``none``. Raises ``ValueError`` naming the option and the value."""
        return cls(_parse_table("--time-limit", seconds or []), _parse_table("--memory-limit", memory_mb or []),
                   isolation or os.environ.get("INFLUENCE_BENCH_ISOLATION") or "inline")


def _parse_table(option: str, values: list[str]) -> dict:
    out: dict = {}
    for raw in values:
        name, _, value = raw.rpartition("=")
        name = name.strip() or "*"
        v = value.strip().lower()
        if v in ("none", "off", "0"):
            out[name] = None
            continue
        try:
            number = float(v)
        except ValueError:
            raise ValueError(f"{option} {raw!r}: expected SECONDS or NAME=SECONDS with a positive number "
                             "(or 'none')") from None
        if not np.isfinite(number) or number <= 0:
            raise ValueError(f"{option} {raw!r}: the limit must be a positive number (or 'none')")
        out[name] = number
    return out


@contextmanager
def time_limit(seconds: float | None, notes: list[str]):
    if not seconds:
        yield
        return
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        notes.append(f"time limit {seconds:g} s not enforced (not the main thread); use --isolation process")
        yield
        return

    def fire(signum, frame):
        raise EstimatorTimeout()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _vm_size_bytes() -> int | None:
    try:
        m = re.search(r"VmSize:\s+(\d+)", open("/proc/self/status").read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def physical_memory_mb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        return None


@contextmanager
def memory_limit(memory_mb: float | None, device: torch.device, notes: list[str]):
    """The soft address-space limit at what is mapped now plus ``memory_mb`` (default: the machine's
    physical memory), so that an estimator that allocates more fails inside its own call instead of
    bringing the out-of-memory killer to the whole run. Linux and CPU only: CUDA maps huge address
    ranges of its own."""
    try:
        import resource
    except ImportError:  # pragma: no cover - non-POSIX
        yield None
        return
    vm = _vm_size_bytes()
    limit_mb = memory_mb if memory_mb is not None else physical_memory_mb()
    cuda_on = torch.cuda.is_available() and torch.cuda.is_initialized()
    if vm is None or limit_mb is None or device.type != "cpu" or cuda_on:
        if memory_mb is not None:
            notes.append(f"memory limit {memory_mb:g} MB not enforced on {device} here")
        yield None
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    new = vm + int(limit_mb * 2**20)
    for cap in (soft, hard):
        if cap != resource.RLIM_INFINITY:
            new = min(new, cap)
    resource.setrlimit(resource.RLIMIT_AS, (new, hard))
    try:
        yield limit_mb
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "Cannot allocate memory" in str(exc)
