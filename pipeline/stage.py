"""The one entry point every stage module uses: read params, validate, track, run, report."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ijepa.errors import USER_FACING, report

from .context import StageContext, seed_everything
from .params import load_params, section
from .tracking import make_tracker

RunFn = Callable[[dict, StageContext, object], dict]


def run_stage(
    name: str, run: RunFn, sections: Sequence[str], *, root: str | Path | None = None, params: dict | None = None
) -> dict:
    """Validate the stage's params sections, open tracking (failing early if the store is unusable), call
    ``run(params, ctx, tracker)`` and log its metrics.

    Args:
        name: stage name (MLflow tag, output names).
        run: the stage body; receives the whole params dict (it parses the sections it needs).
        sections: params sections the stage depends on (validated before any work, logged to MLflow).
        root: working directory (default: cwd); params: use this dict instead of ``root/params.yaml``.
    Returns:
        the stage's metrics dict.
    """
    ctx = StageContext.from_env(name, root)
    params = params if params is not None else load_params(ctx.root / "params.yaml")
    for s in sections:
        section(params, s)
    tracking = section(params, "tracking")
    subset = {s: params[s] for s in sections}
    seed_everything(section(params, "seed") if "seed" in params else 0)
    t0 = time.perf_counter()
    with make_tracker(
        ctx, enabled=tracking.enabled, experiment=tracking.experiment, params=subset, all_params=params
    ) as tracker:
        tracker.log_dict(subset, "params/resolved.json")
        metrics = run(params, ctx, tracker)
        metrics = {**metrics, "stage_seconds": round(time.perf_counter() - t0, 2)}
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    return metrics


def main(name: str, run: RunFn, sections: Sequence[str]) -> None:
    """CLI wrapper of a stage: user errors (``ijepa.errors.USER_FACING``) become one line on stderr and exit code 2;
    anything else keeps its traceback, since it is a bug."""
    try:
        metrics = run_stage(name, run, sections)
    except USER_FACING as e:
        report(name, e)
        sys.exit(2)
    print(f"{name}: done: {metrics}")
