"""The DDP environment of a training process: rank, world size, device, process group.

Inside a submitit job (local or SLURM, any number of tasks) the rendezvous variables come from
``submitit.helpers.TorchDistributedEnvironment``; outside (debug executor, plain python) the
process is alone: world size 1, no process group, so the same training code runs everywhere.
The rendezvous is bounded (:class:`RendezvousError` after ``SEPNET_RENDEZVOUS_TIMEOUT_S``) and its
port is per job (:func:`rendezvous_port`); multi-node requirements: docs/multinode.md.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


RENDEZVOUS_TIMEOUT_ENV = "SEPNET_RENDEZVOUS_TIMEOUT_S"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 300.0
PORT_LOW, PORT_SPAN = 20000, 20000  # derived rendezvous ports: 20000..39999


class RendezvousError(RuntimeError):
    """The ranks of a job did not meet within the rendezvous timeout (one-line message)."""


def _in_submitit_job() -> bool:
    try:
        import submitit

        submitit.JobEnvironment()
        return True
    except RuntimeError:
        return False


def rendezvous_port(job_id: str | int, *, low: int = PORT_LOW, span: int = PORT_SPAN) -> int:
    """Rank 0's TCP port for job ``job_id``: ``low + id % span``, the same on every rank and after a
    requeue; jobs whose numeric ids differ by less than ``span`` never share a port.
    ``job_id``: a SLURM job id (``"1234"``, array element ``"1234_5"``) or a local job's pid."""
    digits = "".join(ch for ch in str(job_id).split("_")[0] if ch.isdigit())
    if not digits:
        raise ValueError(f"job id {job_id!r} has no number to derive a port from")
    return low + int(digits) % span


def _rendezvous_timeout(value: float | None) -> float:
    if value is not None:
        return float(value)
    raw = os.environ.get(RENDEZVOUS_TIMEOUT_ENV)
    return float(raw) if raw else DEFAULT_RENDEZVOUS_TIMEOUT_S


def _export_submitit_env() -> tuple[int, int, int]:
    """Export the env:// variables of this submitit task; MASTER_PORT: the job's own
    (``executor.master_port``) or one derived from the SLURM job id. Returns (rank, local, world)."""
    import submitit

    env = submitit.helpers.TorchDistributedEnvironment()
    if "MASTER_PORT" not in os.environ:
        env.master_port = rendezvous_port(os.environ.get("SLURM_JOB_ID") or env._job_env.job_id)
    env.export(set_cuda_visible_devices=False, overwrite=True)
    return env.rank, env.local_rank, env.world_size


def _where() -> str:
    """Rank 0's address as this rank sees it, and the interface settings (for error messages)."""
    addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    try:
        ip = socket.gethostbyname(addr)
    except OSError:
        ip = "unresolvable"
    ifs = ", ".join(f"{k}={os.environ[k]}" for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k in os.environ)
    return f"{addr}:{port} ({addr} -> {ip}{'; ' + ifs if ifs else ''})"


def _abort_after(seconds: float, message: str) -> threading.Timer:
    """A watchdog: if the rendezvous is still blocked after ``seconds``, print ``message`` and exit 1
    (a collective stuck in native code does not see Python exceptions)."""
    def fire() -> None:
        print(message, file=sys.stderr, flush=True)
        os._exit(1)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


def _join(be: str, *, rank: int, world: int, rdv_s: float, timeout_s: float) -> None:
    """init_process_group + a first barrier (NCCL connects lazily) within ``rdv_s``, then the
    collectives' timeout ``timeout_s``. Raises RendezvousError with one line naming the address."""
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    what = f"rank {rank}/{world} on {node}: no {be} rendezvous with {_where()} within {rdv_s:g} s"
    watchdog = _abort_after(rdv_s + 30.0, f"RendezvousError: {what} (still blocked, exiting)")
    try:
        dist.init_process_group(be, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=rdv_s))
        dist.barrier()
    except Exception as exc:  # noqa: BLE001 - every failure to meet is reported the same way
        if dist.is_initialized():
            dist.destroy_process_group()
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise RendezvousError(f"{what}: {type(exc).__name__}: {cause} (check: the first node's name resolves on "
                              "every node, the port is open, executor.gloo_socket_ifname/nccl_socket_ifname name "
                              "the interface that joins the nodes; docs/multinode.md)") from None
    finally:
        watchdog.cancel()
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(datetime.timedelta(seconds=timeout_s))


def init_distributed(*, timeout_s: float = 1800.0, rendezvous_timeout_s: float | None = None,
                     backend: str | None = None) -> DistEnv:
    """Join the job's process group (or stay alone) and pick the device.

    In a submitit job with several tasks: exports MASTER_ADDR (the first node's hostname: it must
    resolve on every node), MASTER_PORT (``$MASTER_PORT`` if set, else :func:`rendezvous_port` of
    the job id), RANK, WORLD_SIZE, LOCAL_RANK (``set_cuda_visible_devices=False``: each rank uses
    ``cuda:<local_rank>``) and initialises the process group, ``nccl`` if CUDA is available else
    ``gloo`` (``backend`` overrides). The ranks must meet within ``rendezvous_timeout_s`` (None:
    ``$SEPNET_RENDEZVOUS_TIMEOUT_S``, else 300 s), or :class:`RendezvousError` is raised (a rank
    blocked in native code exits 1 with that line on stderr 30 s later); afterwards each
    collective may wait ``timeout_s``. On success every rank prints one line to stderr:
    ``rank R/W (local L) on NODE joined the gloo process group via ADDR:PORT (ADDR -> IP; ...)``.
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
        rank, local, world = _export_submitit_env()
    elif "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:  # torchrun
        rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if world == 1:
        device = "cuda:0" if use_cuda else "cpu"
        return DistEnv(0, 0, 1, device, None)
    if use_cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    be = backend or ("nccl" if use_cuda else "gloo")
    _join(be, rank=rank, world=world, rdv_s=_rendezvous_timeout(rendezvous_timeout_s), timeout_s=timeout_s)
    device = f"cuda:{local % torch.cuda.device_count()}" if use_cuda else "cpu"
    # one line per rank in the job's log (stderr), whatever the logging configuration
    print(f"rank {rank}/{world} (local {local}) on {os.environ.get('SLURMD_NODENAME') or socket.gethostname()} "
          f"joined the {be} process group via {_where()} on {device}", file=sys.stderr, flush=True)
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
