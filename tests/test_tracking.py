"""The MLflow tracker against a real sqlite store held locked by another writer: it waits and loses nothing."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from pipeline.context import StageContext
from pipeline.tracking import MlflowTracker, TrackingError, retry_locked


def test_a_locked_store_is_retried_and_nothing_is_dropped(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ctx = StageContext("pretrain", tmp_path, tmp_path, None, None, 0, 1)
    tracker = MlflowTracker(ctx, experiment="ijepa", params={"optim": {"lr": 0.1}})
    hold = 8.0  # longer than sqlite's 5 s busy timeout, so the writes below fail with "database is locked"
    with tracker:
        locked, released = threading.Event(), []

        def lock_then_release():
            con = sqlite3.connect(tmp_path / "mlflow.db", timeout=30, isolation_level=None)
            con.execute("BEGIN EXCLUSIVE")
            locked.set()
            time.sleep(hold)
            con.execute("COMMIT")
            con.close()
            released.append(time.monotonic())

        t = threading.Thread(target=lock_then_release)
        t.start()
        locked.wait()
        for step in range(1000):  # more than one batch of 900
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        tracker.flush()
        done = time.monotonic()
        t.join()
    assert released and done >= released[0] - 0.5  # the writes waited for the lock instead of failing
    history = tracker.client.get_metric_history(tracker.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1000))
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"
    assert tracker.client.get_run(tracker.run_id).data.params == {"optim.lr": "0.1"}


def test_retry_gives_up_with_a_clear_error_and_passes_other_errors_through():
    calls = []

    def always_locked():
        calls.append(1)
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(TrackingError, match="stayed locked for 1 s while trying to log metrics"):
        retry_locked(always_locked, "log metrics", timeout=1.0, first_wait=0.05)
    assert len(calls) > 2

    def broken():
        raise sqlite3.OperationalError("no such table: runs")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        retry_locked(broken, "log metrics")
