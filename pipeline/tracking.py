"""MLflow tracking for stages: one run per stage, tagged and grouped per pipeline run; rank > 0 logs nothing.

The store defaults to ``sqlite:///<DVC_ROOT>/mlflow.db`` (``MLFLOW_TRACKING_URI`` overrides) and the
experiment's artifact location is set explicitly to ``<DVC_ROOT>/mlruns`` when it is created, so runs
started from DVC's temporary queue folders keep their artifacts. ``mlflow`` is imported lazily.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ijepa.errors import UserError

from .context import StageContext, params_hash

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
T = TypeVar("T")


class TrackingError(UserError, RuntimeError):
    """The tracking store cannot be used; raised before any work is done."""


def _locked(e: BaseException) -> bool:
    """True for sqlite's "database is locked" / "busy", however MLflow and SQLAlchemy wrap it."""
    while e is not None:
        text = str(e).lower()
        if "database is locked" in text or "database is busy" in text or "database table is locked" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def retry_locked(call: Callable[[], T], what: str, *, timeout: float = 300.0, first_wait: float = 0.2) -> T:
    """Run ``call``, retrying while the sqlite store is locked by another writer (experiments run side by side
    share one ``mlflow.db``); waits grow to 5 s. After ``timeout`` seconds the lock error is raised as a
    ``TrackingError``: a metric is never dropped silently."""
    deadline, wait = time.monotonic() + timeout, first_wait
    while True:
        try:
            return call()
        except Exception as e:
            if not _locked(e):
                raise
            if time.monotonic() + wait > deadline:
                raise TrackingError(f"MLflow store stayed locked for {timeout:.0f} s while trying to {what}") from e
            time.sleep(wait * (0.5 + random.random()))
            wait = min(wait * 2, 5.0)


@contextlib.contextmanager
def _quiet_store():
    """MLflow's store logs a full SQLAlchemy traceback before raising; the preflight reports one line instead."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


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
    def log_model(self, model: Any, name: str, example: Any, alias: str | None = None) -> None: ...


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
        """Open the store, find or create the experiment and write to it (a tag naming this stage), so that an
        unreachable, corrupt or read-only store is one clear error before any work is done."""
        from mlflow.tracking import MlflowClient

        def find_or_create(client) -> str:
            exp = client.get_experiment_by_name(self.experiment)
            if exp is not None:
                return exp.experiment_id
            try:
                return client.create_experiment(
                    self.experiment, artifact_location=(self.ctx.dvc_root / "mlruns").resolve().as_uri()
                )
            except Exception:  # a stage run side by side created it first: use theirs
                exp = client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
                return exp.experiment_id

        try:
            with _quiet_store():
                client = MlflowClient(self.uri)
                exp_id = retry_locked(lambda: find_or_create(client), "open the experiment")
                retry_locked(
                    lambda: client.set_experiment_tag(exp_id, "ijepa.last_stage_started", self.ctx.stage),
                    "write the preflight tag",
                )
        except Exception as e:  # any store failure: report it with the URI, before training starts
            reason = " ".join(str(e).split("[SQL:")[0].split())[:300]
            raise TrackingError(
                f"MLflow tracking store {self.uri} is unreachable, unreadable or read-only ({type(e).__name__}: "
                f"{reason}); fix it or set MLFLOW_TRACKING_URI, or set tracking.enabled=false"
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
        name = f"{self.group}/{self.ctx.stage}"
        run = retry_locked(lambda: self.client.create_run(exp_id, run_name=name, tags=tags), "create the run")
        self.run_id = run.info.run_id
        self.log_params(flatten(self.params))
        return self

    def __exit__(self, exc_type, exc, tb):
        self.flush()
        status = "FAILED" if exc_type is not None else "FINISHED"
        retry_locked(lambda: self.client.set_terminated(self.run_id, status), "end the run")
        return False

    def log_params(self, params: Mapping) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            retry_locked(lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk), "log params")

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(metric_name(k), float(v), now, step or 0) for k, v in metrics.items()]
        if len(self._buffer) >= 900:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:900], self._buffer[900:]
            retry_locked(lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk), "log metrics")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)

    def log_model(self, model: Any, name: str, example: Any, alias: str | None = None) -> None:
        """Log ``model`` (a torch module taking one tensor) as an MLflow model of this run, with a signature and
        an input example, register it as a new version of ``name`` and point ``alias`` at that version.

        The model is pickled with the ``ijepa`` package beside it (``code_paths``), so
        ``mlflow.pyfunc.load_model("models:/<name>@<alias>")`` works wherever torch and mlflow are installed.
        """
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        signature = infer_signature(example, output)
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"]
        code = str(Path(__file__).resolve().parent.parent / "ijepa")
        self.flush()
        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id):  # resumes this stage's run (the tracker ends it)
            info = mlflow.pytorch.log_model(
                model, name=name, signature=signature, input_example=example, registered_model_name=name,
                pip_requirements=requirements, code_paths=[code], await_registration_for=0,
            )  # fmt: skip
        version = info.registered_model_version
        if alias:
            retry_locked(lambda: self.client.set_registered_model_alias(name, alias, version), "set the alias")
        retry_locked(lambda: self.client.set_tag(self.run_id, f"ijepa.model.{name}", str(version)), "tag the run")
        print(f"{self.ctx.stage}: registered {name} version {version}" + (f" as @{alias}" if alias else ""))


def make_tracker(ctx: StageContext, *, enabled: bool, experiment: str, params: Mapping, all_params: Mapping):
    """MLflow on rank 0 when enabled, otherwise a no-op.

    Args:
        params: the stage's sections (logged as MLflow params); all_params: the whole file (run grouping).
    """
    if not enabled or not ctx.is_main:
        return NullTracker()
    return MlflowTracker(ctx, experiment=experiment, params=params, all_params=all_params)
