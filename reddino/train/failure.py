"""A run that fails after it started says so: FAILED in MLflow (with the error as a tag) and ``error.txt`` in
its run dir, then the error goes on to the caller."""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

ERROR_FILE = "error.txt"


@contextlib.contextmanager
def failure_recorded(run_dir: Path | None, tracking_uri: str | None, mlflow_run_id: str | None):
    if run_dir is not None:
        (run_dir / ERROR_FILE).unlink(missing_ok=True)  # a resumed run: the earlier failure is history
    try:
        yield
    except BaseException as exc:
        summary = f"{type(exc).__name__}: {exc}".strip()
        if run_dir is not None:
            try:
                (run_dir / ERROR_FILE).write_text(summary + "\n\n" + traceback.format_exc())
            except OSError:
                pass
        if mlflow_run_id is not None:
            try:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(tracking_uri=tracking_uri)
                client.set_tag(mlflow_run_id, "reddino.status", "failed")
                client.set_tag(mlflow_run_id, "reddino.error", summary[:4000])
                client.set_terminated(mlflow_run_id, status="KILLED" if isinstance(exc, KeyboardInterrupt)
                                      else "FAILED")
            except Exception as err:  # noqa: BLE001 - the training error is the one to report
                print(f"[reddino] WARNING MLflow at {tracking_uri}: run {mlflow_run_id} not marked FAILED "
                      f"({type(err).__name__})", flush=True)
        raise
