"""SLURM's warning signal turned into a clean stop at an optimizer-step boundary.

submitit installs a SIGUSR2 handler that, on rank 0, calls the job's ``checkpoint`` method, requeues the job
and exits *from inside the signal handler*, i.e. in the middle of whatever the training loop was doing.
Instead, ``install`` records the signal and keeps submitit's handler; the loop asks ``requested()`` after
every step (agreed across ranks), saves a checkpoint at that boundary, and only then ``hand_over`` runs
submitit's handler, which requeues the job (the checkpoint is already on disk) and exits.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

from ijepa.distributed import any_rank

_requested = threading.Event()
_previous: dict[int, object] = {}


def _record(signum, frame) -> None:
    print(f"preemption: caught {signal.Signals(signum).name}; stopping at the next step or epoch boundary", flush=True)
    _requested.set()


def install(signum: int = signal.SIGUSR2) -> None:
    """Route ``signum`` to the step-boundary flag, keeping the handler that was there for ``hand_over``."""
    if signum not in _previous:
        _previous[signum] = signal.getsignal(signum)
    signal.signal(signum, _record)


def requested() -> bool:
    """True once the signal arrived in this process."""
    return _requested.is_set()


def request() -> None:
    """Set the flag without a signal (tests, or a user's own stop condition)."""
    _requested.set()


def stop_requested(device) -> Callable[[], bool]:
    """The training loops' ``should_stop``: whether any rank has the flag (every rank gets the same answer, so
    all stop at the same boundary)."""
    return lambda: any_rank(requested(), device)


def stopped(stage: str, resumes: str, **extra) -> dict:
    """What a stage returns when its loop stopped for a preemption, after one line saying where it resumes."""
    print(f"{stage}: stopped; {resumes}", flush=True)
    return {"stopped": True, **extra}


def hand_over(signum: int = signal.SIGUSR2) -> None:
    """Run the handler ``install`` replaced (submitit: checkpoint, requeue, exit); exit if there was none."""
    handler = _previous.get(signum)
    if callable(handler):
        handler(signum, None)
        return
    sys.exit(f"preemption: stopped on {signal.Signals(signum).name} after saving a checkpoint; rerun to resume")
