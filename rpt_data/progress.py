"""Progress (records, tokens, tokens/s) and the end-of-run summary table, on stderr: a live line on a terminal,
plain lines in a log (a line per shard written, and one at least every LINE_SECONDS while a shard is scored)."""
from __future__ import annotations

import sys
import time
from datetime import timedelta

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from rpt_common.progress import LINE_SECONDS


class TagProgress:
    def __init__(self, enabled: bool = True, line_seconds: float = LINE_SECONDS):
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.lines = enabled and not self.console.is_terminal  # stderr is a file or a pipe: no live display
        self.line_seconds = line_seconds
        self.token_count = 0
        self._records = 0
        self._t0 = self._last_line = time.perf_counter()
        self._bar = Progress(
            SpinnerColumn(), TextColumn("[bold]tagging[/]"), TextColumn("{task.fields[records]:,} records"),
            TextColumn("{task.fields[tokens]:,} tokens"), TextColumn("{task.fields[rate]:,.0f} tok/s"),
            TimeElapsedColumn(), console=self.console, disable=not enabled or self.lines, transient=False,
        )
        self._task = self._bar.add_task("tag", records=0, tokens=0, rate=0.0)

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        self._bar.__exit__(*exc)

    def records(self, n: int) -> None:
        self._records = n
        if n % 64 == 0:
            self._bar.update(self._task, records=n)

    def tokens(self, n: int) -> None:
        self.token_count += n
        self._bar.update(self._task, records=self._records, tokens=self.token_count, rate=self._rate())
        if self.lines and time.perf_counter() - self._last_line >= self.line_seconds:
            self._line("scoring")

    def shard(self, name: str, done: int) -> None:
        """A shard was written (`done` shards of this run's output are complete)."""
        if self.lines:
            self._line(f"{name} written ({done} shard{'s' if done > 1 else ''} done)")

    def _rate(self) -> float:
        return self.token_count / max(time.perf_counter() - self._t0, 1e-9)

    def _line(self, what: str) -> None:
        self._last_line = time.perf_counter()
        elapsed = timedelta(seconds=int(self._last_line - self._t0))
        print(f"tagging: {what}: {self._records:,} records, {self.token_count:,} tokens, {self._rate():,.0f} tok/s, "
              f"{elapsed}", file=sys.stderr, flush=True)

    def summary(self, manifest: dict, seconds: float, tokens: int, peak_rss_mib: float) -> None:
        t = manifest["totals"]
        table = Table(title=f"rpt-data tag: {len(manifest['shards'])} shards", show_header=False)
        rows = [
            ("records read", f"{manifest['records']:,}"), ("bad records (rejects.jsonl)", f"{manifest['bad_records']:,}"),
            ("windows", f"{t['rows']:,}"), ("tokens", f"{t['positions']:,}"), ("scored positions", f"{t['scored']:,}"),
            ("NaN stats (stored as null)", f"{t['nan']:,}"),
            (f"selected (> {manifest['config']['select_above']} nats)", f"{t['selected']:,}"),
        ]
        rows += [(f"bucket {b}", f"{n:,}") for b, n in t["buckets"].items()]
        rows += [("tokens computed this run", f"{tokens:,}"), ("seconds", f"{seconds:.1f}"),
                 ("tokens/s", f"{tokens / max(seconds, 1e-9):,.0f}"), ("peak RSS", f"{peak_rss_mib:,.0f} MiB")]
        for k, v in rows:
            table.add_row(k, v)
        self.console.print(table)
