"""MLflow tracking for stages: one run per stage, tagged and grouped per pipeline run; rank > 0 logs nothing.

The store defaults to ``sqlite:///<DVC_ROOT>/mlflow.db`` (``MLFLOW_TRACKING_URI`` overrides) and the
experiment's artifact location is set explicitly to ``<DVC_ROOT>/mlruns`` when it is created, so runs
started from DVC's temporary queue folders keep their artifacts. ``mlflow`` is imported lazily.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .context import StageContext, params_hash

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")


class TrackingError(RuntimeError):
    """The tracking store cannot be used; raised before any work is done."""


def tracking_uri(dvc_root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(dvc_root).resolve()}/mlflow.db"


def flatten(d: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested params -> {"a.b.c": "value"} strings for MLflow."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def metric_name(name: str) -> str:
    """MLflow allows letters, digits and ``_-. :/`` only: ``recall@1`` -> ``recall_at_1``."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name.replace("@", "_at_"))


class NullTracker:
    """Does nothing (ranks > 0, or tracking disabled)."""

    run_id = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def log_params(self, params: Mapping) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, obj: Any, name: str) -> None: ...
    def flush(self) -> None: ...


class MlflowTracker(NullTracker):
    """One MLflow run for one stage; metrics are buffered and written in batches (sqlite is slow per call)."""

    def __init__(self, ctx: StageContext, *, experiment: str, params: Mapping, all_params: Mapping | None = None):
        self.ctx, self.experiment, self.params = ctx, experiment, dict(params)
        self.uri = tracking_uri(ctx.dvc_root)
        # One pipeline run = one DVC experiment, or (plain dvc repro) one commit with one params.yaml.
        whole = params_hash(dict(all_params if all_params is not None else params))[:8]
        self.group = ctx.exp_name or f"{(ctx.commit or 'nogit')[:8]}-{whole}"
        self._buffer: list = []
        self.client = None
        self.run_id = None

    def preflight(self):
        """Open the store and find or create the experiment; a clear error if the store is unusable."""
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(self.uri)
            exp = client.get_experiment_by_name(self.experiment)
            exp_id = (
                exp.experiment_id
                if exp is not None
                else client.create_experiment(
                    self.experiment, artifact_location=(self.ctx.dvc_root / "mlruns").resolve().as_uri()
                )
            )
        except Exception as e:  # any store failure: report it with the URI, before training starts
            raise TrackingError(
                f"MLflow tracking store {self.uri} is unreachable or unusable ({type(e).__name__}: {e}); fix it or "
                "set MLFLOW_TRACKING_URI, or set tracking.enabled=false"
            ) from e
        return client, exp_id

    def __enter__(self):
        self.client, exp_id = self.preflight()
        tags = {
            "ijepa.stage": self.ctx.stage,
            "ijepa.pipeline_run": self.group,
            "ijepa.params_hash": params_hash(self.params),
            "dvc.stage": self.ctx.stage,
            "dvc.exp_name": self.ctx.exp_name or "",
            "git.commit": self.ctx.commit or "",
            "mlflow.source.git.commit": self.ctx.commit or "",
        }
        run = self.client.create_run(exp_id, run_name=f"{self.group}/{self.ctx.stage}", tags=tags)
        self.run_id = run.info.run_id
        self.log_params(flatten(self.params))
        return self

    def __exit__(self, exc_type, exc, tb):
        self.flush()
        self.client.set_terminated(self.run_id, "FAILED" if exc_type is not None else "FINISHED")
        return False

    def log_params(self, params: Mapping) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(metric_name(k), float(v), now, step or 0) for k, v in metrics.items()]
        if len(self._buffer) >= 900:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:900], self._buffer[900:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)


def make_tracker(ctx: StageContext, *, enabled: bool, experiment: str, params: Mapping, all_params: Mapping):
    """MLflow on rank 0 when enabled, otherwise a no-op.

    Args:
        params: the stage's sections (logged as MLflow params); all_params: the whole file (run grouping).
    """
    if not enabled or not ctx.is_main:
        return NullTracker()
    return MlflowTracker(ctx, experiment=experiment, params=params, all_params=all_params)
