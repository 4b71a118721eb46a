"""torch.distributed for every stage: one process per device, launched by torchrun or submitit.

Both launchers export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``init_distributed`` reads them (NCCL on CUDA, gloo on CPU). Gradients are averaged by DDP, so with every
rank holding an equal share of the batch a step equals one step over the combined batch: the effective
batch is ``batch_size x world_size``. Evaluation and extraction give every rank a disjoint share of the
samples and combine the results (``all_reduce_sum``, ``gather_to_main``). Without a process group every
helper here is the identity, so single-process code calls them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .jepa import JEPA


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_from_os() -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (all optional: a plain run is rank 0 of 1)."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from e
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return DistEnv(rank, world, local)


def init_distributed(env: DistEnv, device: torch.device) -> None:
    """Join the process group (no-op for one process or when already joined).

    Args:
        env: from ``env_from_os``.
        device: this rank's device (``pick_device(pref, env.local_rank)``): NCCL for CUDA, gloo otherwise.
    """
    if not env.distributed or dist.is_initialized():
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={env.world_size} but {', '.join(missing)} not set: launch with torchrun or "
            "a submitit job (launcher.kind: local or slurm), which set them"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, **kwargs)


def shutdown(barrier: bool = True) -> None:
    """Leave the process group, after a final barrier unless a rank failed (a barrier would then hang)."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


class DistributedJEPA(DistributedDataParallel):
    """DDP around a ``JEPA`` (or ``DMTJEPA``) that still exposes ``update_target``.

    The target encoder (and DMT-JEPA's target head) have ``requires_grad=False``: DDP leaves them out of
    gradient sync, and since every rank applies the same EMA to identical weights they stay identical.
    """

    def update_target(self, momentum: float) -> None:
        self.module.update_target(momentum)


def wrap_ddp(jepa: JEPA, device: torch.device) -> DistributedJEPA:
    """DDP with rank 0's initial weights broadcast to every rank (a no-op when all use the same seed)."""
    ids = [device.index] if device.type == "cuda" else None
    return DistributedJEPA(jepa, device_ids=ids, output_device=ids[0] if ids else None)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a copy; the input is untouched). Identity without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    out = t.detach().clone().float()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on at least one (so all ranks stop at the same step)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around any trained module when a process group of more than one rank is up, else the module.

    On CUDA its BatchNorm layers become SyncBatchNorm (statistics over the global batch, as one process
    would compute them); SyncBatchNorm has no CPU kernel, so gloo ranks keep per-rank statistics.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return module
    if device.type == "cuda":
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a copy). Identity without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_to_main(obj) -> list | None:
    """Every rank's ``obj`` (picklable) as a list on rank 0, in rank order; None on the other ranks.
    ``[obj]`` without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank, so that all ranks end holding the same
    model (DDP broadcasts them before each forward, which leaves the last step's local update behind)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def barrier() -> None:
    """Wait for every rank (no-op without a process group): e.g. before reading a file rank 0 wrote."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
