"""The DDP environment of a training process: rank, world size, device, process group.

Inside a submitit job (local or SLURM, any number of tasks) the rendezvous variables come from
``submitit.helpers.TorchDistributedEnvironment``; outside (debug executor, plain python) the
process is alone: world size 1, no process group, so the same training code runs everywhere.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands. device: ``cuda:<local_rank>`` with CUDA, else ``cpu``.
    backend: ``nccl`` / ``gloo`` when a process group exists, None when alone."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _in_submitit_job() -> bool:
    try:
        import submitit

        submitit.JobEnvironment()
        return True
    except RuntimeError:
        return False


def init_distributed(*, timeout_s: float = 1800.0, backend: str | None = None) -> DistEnv:
    """Join the job's process group (or stay alone) and pick the device.

    In a submitit job with several tasks: exports MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK
    (``set_cuda_visible_devices=False``: each rank uses ``cuda:<local_rank>``) and initialises
    the process group, ``nccl`` if CUDA is available else ``gloo`` (``backend`` overrides).
    Idempotent: a second call returns the existing environment.
    """
    use_cuda = torch.cuda.is_available()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local}" if use_cuda else "cpu"
        return DistEnv(rank, local, world, device, dist.get_backend())
    world = 1
    if _in_submitit_job():
        import submitit

        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        rank, local, world = env.rank, env.local_rank, env.world_size
    elif "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:  # torchrun
        rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if world == 1:
        device = "cuda:0" if use_cuda else "cpu"
        return DistEnv(0, 0, 1, device, None)
    if use_cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    be = backend or ("nccl" if use_cuda else "gloo")
    dist.init_process_group(be, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    device = f"cuda:{local % torch.cuda.device_count()}" if use_cuda else "cpu"
    log.info("rank %d/%d (local %d) joined the %s process group on %s", rank, world, local, be, device)
    return DistEnv(rank, local, world, device, be)


def cleanup() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op when alone)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor | float:
    """Mean of ``value`` over ranks (a float in -> float out; a tensor in -> new tensor out)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    is_float = not isinstance(value, torch.Tensor)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(float(value), dtype=torch.float64, device=device) if is_float else value.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return float(t.item()) if is_float else t


def all_gather_object(obj: object) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` when alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, *, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
