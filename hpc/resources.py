"""Executor and resource settings, in the words of ``sbatch`` users.

This dataclass is embedded in the study config (``executor:`` section) and consumed by
``sepnet.hpc.executors.make_executor``. It knows nothing of organs or models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageResources:
    """Per-stage overrides of :class:`ExecutorConfig` (``executor.stages.<stage>``); None = inherit.

    The same sbatch words as the top level. ``array``: how many array tasks the stage splits into
    (the caller decides what one task does; None = 1).
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    constraint: str | None = None
    exclude: str | None = None
    array_parallelism: int | None = None
    array: int | None = None
    extra: dict[str, Any] | None = None

    def set_fields(self) -> dict[str, Any]:
        """The fields given (not None), except ``array``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "array" and getattr(self, f.name) is not None}


@dataclass
class ExecutorConfig:
    """Where and how jobs run.

    kind: ``debug`` (in-process, for pdb), ``local`` (submitit LocalExecutor, subprocesses on this
    machine) or ``slurm`` (submitit SlurmExecutor).
    time_min: wall-clock limit in minutes. mem_gb: memory per node in GB (None = cluster default).
    gpus_per_node: GPUs per node (0 = CPU jobs). tasks_per_node: DDP processes per node (one per GPU).
    extra: any other sbatch option, passed through verbatim (e.g. ``{"reservation": "abc"}``).

    Multi-node rendezvous (exported into every job's environment, see docs/multinode.md):
    gloo_socket_ifname / nccl_socket_ifname: the network interface(s) that gloo / NCCL bind to
    (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``, e.g. ``ib0``; None = the library's own choice,
    the interface of the address the node's hostname resolves to). master_port: a fixed TCP port
    for rank 0's rendezvous store (``MASTER_PORT``); None = derived from the job id, so that two
    jobs on one node do not collide. rendezvous_timeout_s: seconds the ranks wait for each other at
    start before the job fails with a one-line ``RendezvousError`` (never a hang).

    stages: per-stage overrides (stage name -> :class:`StageResources`); the top level is the
    default of every stage. ``for_stage`` resolves one.
    """

    kind: str = "local"  # a ``sepnet.hpc.executors.KINDS`` name (checked by check_config)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 60
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    mem_gb: float | None = None
    constraint: str | None = None
    exclude: str | None = None
    array_parallelism: int = 16
    extra: dict[str, Any] = field(default_factory=dict)
    gloo_socket_ifname: str | None = None
    nccl_socket_ifname: str | None = None
    master_port: int | None = None
    rendezvous_timeout_s: float = 300.0
    stages: dict[str, StageResources] = field(default_factory=dict)

    def for_stage(self, stage: str, **defaults: Any) -> ExecutorConfig:
        """The config of one stage: the top level, then ``defaults`` (the caller's per-stage defaults,
        e.g. ``gpus_per_node=0``), then ``stages[stage]``. The result has no stages of its own."""
        over = self.stages.get(stage)
        values = {**defaults, **(over.set_fields() if over else {})}
        return dataclasses.replace(self, stages={}, **values)

    def array_of(self, stage: str) -> int:
        """``stages[stage].array``, 1 when not set."""
        over = self.stages.get(stage)
        return over.array if over and over.array is not None else 1


def peak_rss_gib() -> float:
    """Peak resident memory of this job's largest process so far, GiB: this process or the largest child
    it waited for (a preprocessing worker, a data-loader worker); ``getrusage`` ru_maxrss is KiB on Linux,
    bytes on macOS. Jobs print it in their last line, so the job logs hold it. On Linux a process's figure
    is at least its forking parent's peak at the fork (a local job's parent is the small `sepnet cv`)."""
    import resource
    import sys

    rss = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20
