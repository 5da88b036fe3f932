"""Progress of a counted job on stderr: a live bar with its ETA on a terminal; plain lines in a log (stderr to a
file or a pipe), where a live display shows nothing until the end."""
from __future__ import annotations

import sys
import time
from datetime import timedelta

LINE_SECONDS = 30.0  # in a log, a progress line at least this often while work goes on


class CountProgress:
    """`progress(done, total)` callback: a rich bar on a terminal; in a log, a line at the start, at the end and
    at least every `line_seconds` in between."""

    def __init__(self, label: str, unit: str, enabled: bool = True, line_seconds: float = LINE_SECONDS):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.label, self.unit, self.line_seconds = label, unit, line_seconds
        console = Console(stderr=True)
        self.lines = enabled and not console.is_terminal
        self.bar = Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                            disable=not enabled or self.lines)
        self.task = None
        self.t0 = self.last = time.perf_counter()

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.bar.add_task(self.label, total=total)
        self.bar.update(self.task, completed=done, total=total)
        now = time.perf_counter()
        if self.lines and (done in (0, total) or now - self.last >= self.line_seconds):
            self.last = now
            print(f"{self.label}: {done:,}/{total:,} {self.unit}, {timedelta(seconds=int(now - self.t0))}",
                  file=sys.stderr, flush=True)
