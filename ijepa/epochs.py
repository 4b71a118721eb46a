"""The epochs of a resumable training loop, shared by finetuning, segmentation and the streaming attentive probe.

    loop = EpochLoop(epochs, state, should_stop)
    if loop.saved is not None:
        ...restore the model and optimiser from loop.saved...
    for epoch in loop:
        ...train and evaluate one epoch...
        loop.end(epoch, {"model": ..., "optimizer": ...})
    if loop.stopped:
        return None

``state`` is any object with ``load() -> dict | None`` and ``save(dict)`` (``pipeline.resume.EpochState`` sets
aside a state saved under other params). The loop starts at the first epoch not yet done, saves after every
epoch (with ``epochs_done`` and, unless ``rng=False``, every rank's random generators, so a resumed run draws
what the uninterrupted one drew), and stops at an epoch's end when ``should_stop`` (the same answer on every
rank) asks, never after the last epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .rng import every_rank_rng_state, set_this_rank_rng_state


class EpochLoop:
    def __init__(self, epochs: int, state=None, should_stop: Callable[[], bool] | None = None, *, rng: bool = True):
        self.epochs, self.state, self.should_stop, self.rng = epochs, state, should_stop, rng
        self.saved: dict | None = state.load() if state is not None else None
        self.start = int(self.saved["epochs_done"]) if self.saved is not None else 0
        if self.saved is not None and rng:
            set_this_rank_rng_state(self.saved["rng"])
        self.stopped = False

    def __iter__(self) -> Iterator[int]:
        for epoch in range(self.start, self.epochs):
            yield epoch
            if self.should_stop is not None and epoch + 1 < self.epochs and self.should_stop():
                self.stopped = True
                return

    def end(self, epoch: int, snapshot: dict) -> None:
        """Save the run after ``epoch`` (every rank calls it: the generators are gathered from all)."""
        if self.state is not None:
            rng = {"rng": every_rank_rng_state()} if self.rng else {}
            self.state.save(snapshot | {"epochs_done": epoch + 1} | rng)
