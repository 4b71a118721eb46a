"""Loader worker processes: how they start, the shared-memory batch buffers they reuse, and the watchdog that
stops a loader whose workers went silent.

Workers start from a fork server (``worker_context``), never as forks of the training process. Each reuses
a few shared-memory batch buffers (``BatchSlots``) once the consuming process has let go of the batch in
one. A loader with workers that delivers no batch for ``stall_timeout`` seconds raises ``LoaderStalled``,
one line naming each worker's pid, state, CPU time and last batch.
"""

from __future__ import annotations

import functools
import hashlib
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import get_worker_info

from ..errors import UserError

STALL_TIMEOUT = 300.0  # seconds without a batch before a loader with workers gives up (``LoaderStalled``)


class LoaderStalled(UserError, RuntimeError):
    """A loader's workers delivered no batch for its stall timeout (stuck, not dead: a dead worker is
    reported by the DataLoader itself)."""


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method of every loader's worker processes: a fork server, not ``fork``.

    A forked worker inherits the training process's memory but not its threads. OpenCV's thread pool (used
    in the parent by the health monitor, segmentation, a user's own code), OpenMP's and others keep locks
    that a pool thread may hold at the moment of the fork; in the child nobody ever releases them, and the
    first OpenCV call there (``cv2.setNumThreads`` in ``_seed_worker``) waited forever: every worker hung
    at step 0 while the parent waited on their queue. Setting OpenCV's threads before any use would only
    cover OpenCV, and only when no other code used it first. Workers forked from a server process instead
    start from a process that has imported the loader's modules (``set_forkserver_preload``) but never ran
    a thread pool, whatever the training process did (Python 3.14 makes this start method the default on
    Linux for the same reason). Start-up stays a fork (the server is started once per process), and the
    workers get the loader's dataset by pickling, as with ``spawn``.

    As with ``spawn``, the training script's module is imported in the server: a script that builds a
    loader must keep its top-level work under ``if __name__ == "__main__":``. Stages and the CLI do. For the
    same reason (Python's, for every start method but ``fork``) a script read from standard input
    (``python - < script.py``) cannot start workers: run it from a file.
    """
    ctx = multiprocessing.get_context("forkserver")
    preload = [f"{__package__}.loaders"]  # what the workers run: imported once, in the server
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name and not name.endswith("__main__"):  # ``python -m stages.pretrain``
        # each worker runs the module again as ``__mp_main__`` (Python's rule for every start method but fork),
        # so the server imports what the module imports, not the module itself: runpy warns ("found in
        # sys.modules ... may result in unpredictable behaviour") when a worker runs a module already imported
        preload += _imports_of(main)
    elif getattr(main, "__file__", None):  # a script: the server imports it once, the workers inherit it
        preload.append("__main__")
    ctx.set_forkserver_preload(preload)  # effective once, when the server starts
    return ctx


def _imports_of(module: ModuleType) -> list[str]:
    """The Python modules that ``module``'s top-level names come from (what it imports), itself excluded."""
    own = {"__main__", "__mp_main__", module.__name__, getattr(module.__spec__, "name", None)}
    names = set()
    for key, value in vars(module).items():
        if key.startswith("__"):  # its loader, spec, builtins
            continue
        name = value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)
        if (
            isinstance(name, str)
            and name not in own
            and str(getattr(sys.modules.get(name), "__file__", "")).endswith(".py")
        ):
            names.add(name)
    return sorted(names)


def _proc_state(pid: int) -> str:
    """A worker's state for a stall report: its scheduler state and CPU seconds (Linux), or 'gone'."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return "gone"
        return "alive"
    state = {"R": "running", "S": "sleeping", "D": "in I/O", "Z": "exited", "T": "stopped"}.get(fields[0], fields[0])
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return f"{state}, {cpu:.1f} s CPU"


def mix_seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def worker_info() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class BatchSlots:
    """Shared-memory batch buffers that each loader worker reuses once the consuming process has let go of
    the batch written into one.

    A fresh shared-memory batch pays a page fault per 4 KiB page on first write, plus creating and mapping
    the segment (``benchmarks/bench_data.py`` measures it against a JPEG decode; docs/benchmarks.md). Each
    worker keeps ``slots`` buffers. A flag per (worker, slot) in shared
    memory says whether the batch in it may still be read: the worker sets it when it fills the slot, the
    consuming process clears it once no tensor there views that batch any more (``recycled``: a weak
    reference to the batch's storage has expired). While every slot is held (a consumer that keeps its
    batches) the worker writes into a fresh buffer instead, so no batch is ever overwritten while it can
    still be read.
    """

    def __init__(self, num_workers: int, slots: int = 4, name: str = "loader", stall_timeout: float = 0.0):
        self.shape = (max(num_workers, 1), slots)
        self.name, self.stall_timeout = name, stall_timeout
        self.flags: torch.Tensor | None = None  # shared, new for each pass (``recycled``)
        # shared, new for each pass: per worker (pid, batches begun, time of its start or last batch begun)
        self.progress: torch.Tensor | None = None
        self.pooled = 0  # batches that came in a pool slot, in the consumer's last pass
        self._buffers: dict[int, torch.Tensor] = {}  # this worker's own buffers (empty in the consumer)

    def started(self, worker: int) -> None:
        """In a worker, first thing: record its pid and start time (for ``LoaderStalled``'s report)."""
        self.progress[worker] = torch.tensor([os.getpid(), 0, time.time()], dtype=torch.float64)

    def take(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """In a worker: a uint8 shared-memory buffer of ``shape`` and its (worker, slot) tag (None: a fresh
        buffer outside the pool, every slot being held)."""
        worker = worker_info()[0]
        self.progress[worker, 1] += 1
        self.progress[worker, 2] = time.time()
        row = self.flags[worker].numpy()
        free = np.flatnonzero(row == 0)
        if len(free) == 0:
            return shared_uint8(shape), None
        slot = int(free[0])
        buf = self._buffers.get(slot)
        if buf is None or tuple(buf.shape) != shape:
            buf = self._buffers[slot] = shared_uint8(shape)
        row[slot] = 1
        return buf, (worker, slot)

    def recycled(self, loader: Iterable, images: Callable[[Any], torch.Tensor]) -> Iterator:
        """In the consumer: one pass over ``loader`` (its workers yield ``(tag, batch)``) -> batches, numpy
        leaves as tensors; a slot is freed once ``images(batch)`` and every view of it are gone.

        Each pass starts new workers, with empty pools and new flags (a pass still running keeps its own).
        Raises ``LoaderStalled`` when the loader's stall timeout passes without a batch."""
        flags = self.flags = torch.zeros(self.shape, dtype=torch.int32).share_memory_()
        self.progress = torch.zeros((self.shape[0], 3), dtype=torch.float64).share_memory_()
        self.pooled = 0
        held: list[tuple[tuple[int, int], StorageWeakRef]] = []
        for tag, batch in self._stall_checked(loader):
            for h in [h for h in held if h[1].expired()]:
                flags[h[0]] = 0
                held.remove(h)
            if tag is not None:
                held.append((tag, StorageWeakRef(images(batch).untyped_storage())))
                self.pooled += 1
            yield map_tree(batch, lambda a: torch.from_numpy(a) if isinstance(a, np.ndarray) else a)

    def _stall_checked(self, loader: Iterable) -> Iterator:
        it = iter(loader)
        while True:
            stalled = False
            try:
                item = next(it)
            except StopIteration:
                return
            except RuntimeError as e:  # the DataLoader's own timeout (``timeout=stall_timeout``)
                if not str(e).startswith("DataLoader timed out"):
                    raise
                stalled = True
            if stalled:
                report = self.stall_report()
                # dropping the iterator (outside the except block, whose traceback refers to it) shuts its
                # workers down now: the DataLoader asks each to stop, waits up to 5 s, then terminates it
                del it
                raise LoaderStalled(report)
            yield item

    def stall_report(self) -> str:
        """One line: the loader, its stall timeout, and each worker's pid, state and last batch begun."""
        now, workers = time.time(), []
        for w, (pid, begun, last) in enumerate(self.progress.tolist()):
            if not pid:
                workers.append(f"worker {w}: not started")
                continue
            since = "none begun" if not begun else f"{int(begun)} begun, the last"
            workers.append(f"worker {w} (pid {int(pid)}, {_proc_state(int(pid))}): {since} {now - last:.0f} s ago")
        return (
            f"{self.name}: no batch in {self.stall_timeout:g} s (the stall timeout) from {len(workers)} "
            f"worker(s) [{'; '.join(workers)}]: the workers are stuck (a deadlock, a hung file system or a "
            "sample that never finishes decoding); a slow but healthy start needs a longer stall timeout"
        )


def map_tree(obj, fn: Callable):
    """``fn`` applied to every leaf of nested tuples and lists."""
    if isinstance(obj, tuple | list):
        return type(obj)(map_tree(o, fn) for o in obj)
    return fn(obj)


def keep_batch(batch):
    """``collate_fn`` of the loaders: batches leave the workers as built (torch's default would turn the
    numpy labels and masks into tensors, each then sent through its own shared-memory segment)."""
    return batch


def shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class Recycling:
    """Re-iterable consumer side of a loader whose workers yield ``(tag, batch)`` (``BatchSlots``)."""

    def __init__(self, loader, slots: BatchSlots, images: Callable[[Any], torch.Tensor]):
        self.loader, self.slots, self.images = loader, slots, images

    def __iter__(self) -> Iterator:
        return self.slots.recycled(self.loader, self.images)


def _seed_worker(worker_id: int, base: int, slots: BatchSlots) -> None:
    slots.started(worker_id)
    cv2.setNumThreads(1)  # one thread per worker: the workers are the parallelism
    torch.manual_seed(mix_seed("torch", base, worker_id) % 2**63)


def worker_options(num_workers: int, base: int, slots: BatchSlots) -> dict:
    """DataLoader arguments shared by the loaders: the fork server, the stall timeout and worker seeding."""
    if num_workers == 0:
        return {}
    return {
        "multiprocessing_context": worker_context(),
        "timeout": slots.stall_timeout,
        "worker_init_fn": functools.partial(_seed_worker, base=base, slots=slots),
    }
