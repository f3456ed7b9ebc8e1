"""Progress of an embedding pass: a rich bar on a terminal, a line per finished shard otherwise (log files)."""

from __future__ import annotations

import sys
import time
from typing import Callable

LINE_EVERY_S = 30.0  # without a terminal: a progress line this often (besides one per finished shard)


class EmbedProgress:
    """Rows done of ``total_rows``; ``on_rows`` (when given) hears every advance instead of the bar / lines."""

    def __init__(self, total_rows: int, done_rows: int, label: str, enabled: bool,
                 on_rows: Callable[[int], None] | None = None):
        self.enabled, self.total, self.t0 = enabled and on_rows is None, total_rows, time.time()
        self.rows = self.start_rows = done_rows
        self.last_line = time.time()
        self.on_rows = on_rows
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console  # noqa: PLC0415
            from rich.progress import (  # noqa: PLC0415
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[speed]}"), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task(label, total=total_rows, completed=done_rows, speed="")
            self.bar.start()

    def rate(self) -> float:
        return (self.rows - self.start_rows) / max(time.time() - self.t0, 1e-9)

    def advance(self, n: int) -> None:
        self.rows += n
        if self.on_rows is not None:
            self.on_rows(n)
        elif self.bar is not None:
            self.bar.update(self.task, advance=n, speed=f"{self.rate():.0f} img/s")
        elif self.enabled and time.time() - self.last_line >= LINE_EVERY_S:
            self.last_line = time.time()
            print(f"embedding: {self.rows:,}/{self.total:,} rows, {self.rate():.1f} img/s", file=sys.stderr, flush=True)

    def shard_done(self, name: str, index: int, count: int) -> None:
        if self.enabled and self.bar is None:
            print(f"embedded {name} ({index}/{count} shards, {self.rows:,}/{self.total:,} rows, "
                  f"{self.rate():.1f} img/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
