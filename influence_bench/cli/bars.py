"""The progress bar of ``influence-bench score`` (rich, on stderr): setting i/N, estimator, phase,
the phase's units done and its ETA. Drawn only on a terminal; elsewhere (a log, CI) each (estimator,
setting) prints its one start line and nothing more."""

from __future__ import annotations

import sys

from influence_bench import progress

UNITS = {"training theta*": "steps", "ground truth": "models"}


class ScoreBar:
    def __init__(self, n_jobs: int, stream=None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.n = n_jobs
        self.enabled = getattr(self.stream, "isatty", lambda: False)() if enabled is None else enabled
        self.job, self.phase = "", None
        self._bar = self._task = self._listen = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(),
                                 console=Console(file=self.stream, width=100, force_terminal=True), transient=True,
                                 speed_estimate_period=3600)  # a chunk of retrained models can take minutes
            self._bar.start()
            self._task = self._bar.add_task("", total=None)
            self._listen = progress.listening(self._event)
            self._listen.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._listen is not None:
            self._listen.__exit__(*exc)
        if self._bar is not None:
            self._bar.stop()

    def start(self, i: int, estimator: str, setting: str, mode: str) -> None:
        """Job ``i`` (1-based) of ``n_jobs``: ``estimator`` on ``setting``."""
        self.job, self.phase = f"[{i}/{self.n}] {estimator} on {setting}", None
        if self._bar is None:
            print(f"{self.job} ({mode} ground truth) ...", file=self.stream, flush=True)
        else:
            self._bar.reset(self._task, description=self.job, completed=0, total=None)

    def say(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.stream, flush=True)

    def _event(self, phase: str, done: int, total: int | None) -> None:
        unit = UNITS.get(phase, "")
        what = f"{self.job} · {phase}" + (f" ({unit})" if unit and total else "")
        if phase != self.phase or done == 0:  # a new phase: its own count and rate (ETA)
            self.phase = phase
            self._bar.reset(self._task, description=what, completed=done, total=total)
        else:
            self._bar.update(self._task, description=what, completed=done, total=total)
