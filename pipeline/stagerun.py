"""What every long stage (pretrain, finetune, seg_train, attnprobe) repeats around its training loop, once: the
resumable state under the run's key, the stop request its loop polls, the line it returns when stopped, and
publishing its outputs on the main rank (which seg_eval uses too)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from . import preemption
from .models import register_model
from .outputs import write_json
from .resume import EpochState, run_key


class StageRun:
    """One run of ``stage`` on this rank (``ctx``), tracked by ``tracker``, training on ``device``."""

    def __init__(self, stage: str, ctx, tracker, device):
        self.stage, self.ctx, self.tracker = stage, ctx, tracker
        self.should_stop = preemption.stop_requested(device)  # every loop's should_stop: any rank's request

    def key(self, params: Mapping, sections: Iterable[str], *, exclude: Mapping = (), **inputs) -> str:
        """What a saved run must match to be continued: ``sections`` of ``params`` less the ``exclude``d keys
        (they change no weight), the world size and ``inputs`` (keys of the data and checkpoints)."""
        return run_key(params, sections, exclude=exclude, world_size=self.ctx.world_size, **inputs)

    def state(self, params: Mapping, sections: Iterable[str], *, name: str | None = None, **key) -> EpochState:
        """The run's saved state, ``models/resume/<name>.pt`` (``pipeline.resume``'s policy), under ``self.key``."""
        key = self.key(params, sections, **key)
        return EpochState(self.ctx.root, name or self.stage, key, stage=self.stage, is_main=self.ctx.is_main)

    def stopped(self, resumes: EpochState | str, **extra) -> dict:
        """The stage's return after its loop stopped for a preemption, with one line saying where it resumes."""
        if isinstance(resumes, EpochState):
            resumes = f"{resumes.path} resumes from the last finished epoch"
        return preemption.stopped(self.stage, resumes, **extra)

    def publish(
        self,
        metrics: dict,
        *,
        plots: Iterable[Path] = (),
        files: Iterable[Path] = (),
        model: Callable[[], tuple] | None = None,
    ) -> dict:
        """On the main rank: ``metrics/<stage>.json``, each of ``plots`` as an MLflow artifact under plots/ and of
        ``files`` under metrics/, and the model ``model()`` returns as (tracking params, kind, module, example
        images) registered (``pipeline.models.register_model``). Returns ``metrics``."""
        if not self.ctx.is_main:
            return metrics
        write_json(self.ctx.root / f"metrics/{self.stage}.json", metrics)
        for path in plots:
            self.tracker.log_artifact(path, "plots")
        for path in files:
            self.tracker.log_artifact(path, "metrics")
        if model is not None:
            register_model(self.tracker, self.ctx, *model())
        return metrics
