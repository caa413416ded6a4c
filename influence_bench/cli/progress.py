"""A progress line for long builds: ``label: done/total models, rate, ETA`` on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
    """``label: done/total models, rate, ETA`` on stderr (redrawn in place on a terminal)."""

    def __init__(self, label: str, total: int, done: int = 0, stream=None):
        self.label, self.total, self.done, self.start_done = label, total, done, done
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.draw()

    def update(self, n: int) -> None:
        self.done += n
        self.draw()

    def draw(self, final: bool = False) -> None:
        dt = time.perf_counter() - self.t0
        new = self.done - self.start_done
        rate = new / dt if dt > 0 and new else 0.0
        eta = f"{(self.total - self.done) / rate:.0f}s" if rate else "?"
        line = f"{self.label}: {self.done}/{self.total} models, {rate:.1f} models/s, ETA {eta}"
        if final:
            line = f"{self.label}: {self.done}/{self.total} models, {new} computed in {dt:.1f}s"
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r\x1b[K" if self.tty else "") + line + end)
        self.stream.flush()
