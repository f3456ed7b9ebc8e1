"""What a person at a terminal sees while a run trains: one live rich bar (step / total, img/s, loss parts, lr,
eta, latest kNN) instead of a scrolling line per ``log_every``.

The training worker (rank 0, maybe on another node) writes its latest numbers to ``progress.json`` in the run dir
(temp name, then rename); the driver polls that file and redraws. Without a terminal (a log file, a CI job, Ray
job logs), or with remote storage, the worker prints its concise step lines instead, each once.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

from reddino.paths import write_json_atomic

PROGRESS_FILE = "progress.json"


def live_wanted() -> bool:
    from reddino.runtime import verbose

    return sys.stdout.isatty() and not verbose()


def write_progress(path: str | Path, status: dict[str, Any]) -> None:
    """The worker's side: the latest numbers, replaced atomically (the driver never reads half a file)."""
    write_json_atomic(path, status)


def step_text(status: dict[str, Any]) -> str:
    parts = " ".join(f"{k} {v:.3f}" for k, v in status.get("parts", {}).items())
    knn = f" kNN-{status.get('knn_k', 20)} {status['knn']:.3f}" if status.get("knn") is not None else ""
    return f"loss {status['loss']:.4f} {parts} lr {status['lr']:.2e} {status['ips']:.1f} img/s{knn}"


class LiveProgress:
    """The driver's side: a rich progress bar fed from ``progress.json`` by a polling thread."""

    def __init__(self, path: str | Path, total: int, label: str, interval: float = 1.0):
        self.path, self.total, self.label, self.interval = Path(path), int(total), label, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mtime = None

    def __enter__(self) -> "LiveProgress":
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.path.unlink(missing_ok=True)  # a previous run's numbers are not this run's
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[text]}"), redirect_stdout=True,
                            redirect_stderr=True, transient=False)
        self.task = self.bar.add_task(self.label, total=self.total, text="starting Ray Train ...")
        self.bar.start()
        self._thread = threading.Thread(target=self._poll, name="reddino-progress", daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()

    def refresh(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._mtime:
            return
        try:
            status = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return
        self._mtime = mtime
        self.bar.update(self.task, completed=status.get("step", 0), text=step_text(status))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.refresh()
        self.bar.stop()
