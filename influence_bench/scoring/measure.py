"""Wall time and peak memory of one block of work, CUDA-synchronised on GPU.

CPU memory is the process's resident set: on Linux the high-water mark (``VmHWM``) is reset to the
current RSS before the block (``/proc/self/clear_refs``), so the peak is the block's own, not the
process lifetime's; where that is not possible the lifetime peak (``ru_maxrss``) is reported and
``memory_scope`` says so. GPU memory is ``torch.cuda.max_memory_allocated`` after a reset.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_memory_mb: float | None = None  # peak during the block (RSS on CPU, allocated on CUDA)
    start_memory_mb: float | None = None  # memory in use when the block started
    memory_scope: str = ""  # "block" | "process lifetime" | "cuda allocated"

    @property
    def extra_memory_mb(self) -> float | None:
        """Peak minus what was in use at the start: the block's own footprint."""
        if self.peak_memory_mb is None or self.start_memory_mb is None:
            return None
        return max(0.0, self.peak_memory_mb - self.start_memory_mb)


def _status_mb(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def _reset_cpu_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _lifetime_peak_mb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except Exception:  # pragma: no cover - non-POSIX
        return None


def _release_free_memory() -> None:
    """Hand memory freed earlier back to the OS (glibc ``malloc_trim``), so that a block's peak is
    what it allocates: otherwise a block can reuse freed-but-resident heap and show no growth at
    all (seen after earlier tests freed gigabytes: a 300 MB block measured 0 MB)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@contextmanager
def measure(device: torch.device | str = "cpu"):
    """``with measure(dev) as m: ...`` then read ``m.seconds``, ``m.peak_memory_mb``."""
    device = torch.device(device)
    m = Measurement()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        m.start_memory_mb = torch.cuda.memory_allocated(device) / 2**20
        m.memory_scope = "cuda allocated"
    else:
        _release_free_memory()
        block = _reset_cpu_peak()
        m.start_memory_mb = _status_mb("VmRSS")
        m.memory_scope = "block" if block and m.start_memory_mb is not None else "process lifetime"
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        if cuda:
            torch.cuda.synchronize(device)
        m.seconds = time.perf_counter() - t0
        if cuda:
            m.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
        elif m.memory_scope == "block":
            m.peak_memory_mb = _status_mb("VmHWM")
        else:
            m.peak_memory_mb = _lifetime_peak_mb()
