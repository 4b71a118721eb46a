"""The one distributed bootstrap of every stage that can run on several processes (torchrun or submitit).

``distributed_stage("finetune.device")`` turns ``body(params, ctx, tracker, device)`` into a stage ``run``:
it reads RANK / WORLD_SIZE / LOCAL_RANK, picks this rank's device from the named params key, shares the
CPU cores out between the local ranks (when nothing set OMP_NUM_THREADS), joins the process group (NCCL on
CUDA, gloo otherwise), runs the body, and leaves the group: after a final barrier when every rank succeeded,
without it when this rank failed (a barrier would then wait forever for it). A single process runs the body
as it is.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from ijepa.device import pick_device
from ijepa.distributed import env_from_os, init_distributed, shutdown

from .params import section

Body = Callable[..., dict]


def distributed_stage(device_key: str) -> Callable[[Body], Callable[[dict, object, object], dict]]:
    """Decorator for a stage body ``(params, ctx, tracker, device) -> metrics``; ``device_key`` is
    ``"<section>.<key>"`` of the device preference (auto | cuda | mps | cpu)."""
    section_name, key = device_key.split(".")

    def decorate(body: Body):
        @functools.wraps(body)
        def run(params: dict, ctx, tracker) -> dict:
            denv = env_from_os()
            device = pick_device(getattr(section(params, section_name), key), denv.local_rank)
            if denv.distributed and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
                # N CPU ranks on one machine each default to every core (torchrun sets OMP_NUM_THREADS=1)
                local = int(os.environ.get("LOCAL_WORLD_SIZE", denv.world_size))
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
            init_distributed(denv, device)
            try:
                metrics = body(params, ctx, tracker, device)
            except BaseException:
                shutdown(barrier=False)
                raise
            shutdown()
            return metrics

        return run

    return decorate
