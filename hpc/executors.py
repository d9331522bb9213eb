"""submitit executors from an :class:`~sepnet.hpc.resources.ExecutorConfig`, checked before queueing.

Three kinds, one interface (a submitit ``Executor``):

- ``debug``: :class:`submitit.DebugExecutor`, runs the function in this process when its result is
  asked for (pdb works; ``tasks_per_node`` is ignored: one task).
- ``local``: :class:`submitit.LocalExecutor`, subprocesses on this machine, ``tasks_per_node``
  processes per job (DDP over gloo/nccl), ``gpus_per_node`` GPUs.
- ``slurm``: :class:`submitit.AutoExecutor` on SLURM with partition/account/qos/time/nodes/gpus/
  tasks/cpus/mem/constraint/exclude/array parallelism; ``extra`` goes verbatim to sbatch.

Requests that cannot fit (more nodes, CPUs, GPUs or memory than the partition has, an unknown
partition, GPUs that this machine lacks) raise :class:`SubmissionError` before anything is queued.
Every job gets its own log folder ``<folder>/<name>/<job id>``: logs are never shared.
SLURM jobs get the rendezvous settings (interface, port, timeout) of the config in their environment
(:func:`job_environment`); local jobs (one node, loopback) inherit the submitting process's
environment instead (submitit's local ``setup`` would put a shell between the job and its signals).
Multi-node jobs: docs/multinode.md.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from sepnet.core.errors import SubmissionError
from sepnet.hpc.resources import ExecutorConfig

log = logging.getLogger(__name__)

KINDS = ("debug", "local", "slurm")
# states after which a job will not run again (sacct names; submitit reports them upper case)
_FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


# --------------------------------------------------------------------------- partition checks

@dataclass(frozen=True)
class NodeGroup:
    """One line of ``sinfo -h -p PART -o "%c %m %G %D"``: nodes sharing CPUs, memory (MB) and GPUs."""

    cpus: int
    mem_mb: int
    gpus: int
    count: int


def _parse_gres_gpus(gres: str) -> int:
    """GPU count of a GRES string: ``(null)`` -> 0, ``gpu:4`` -> 4, ``gpu:a100:8(S:0-1),shard:2`` -> 8."""
    total = 0
    for item in gres.split(","):
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if m:
            total += int(m.group(1))
    return total


def parse_sinfo(text: str) -> list[NodeGroup]:
    """Parse the output of ``sinfo -h -o "%c %m %G %D"`` (``+`` suffixes such as ``2+`` are minima)."""
    groups = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 4:
            continue
        cpus, mem, gres, count = parts
        groups.append(
            NodeGroup(
                cpus=int(cpus.rstrip("+")),
                mem_mb=int(re.sub(r"\D.*", "", mem) or 0),
                gpus=_parse_gres_gpus(gres),
                count=int(count.rstrip("+")),
            )
        )
    return groups


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SubmissionError(f"executor.kind slurm: {cmd[0]!r} not found on PATH (not a SLURM login node?)") from None
    except subprocess.TimeoutExpired:
        raise SubmissionError(f"executor.kind slurm: {' '.join(cmd)} did not answer within 60 s") from None
    if out.returncode:
        raise SubmissionError(f"executor.kind slurm: {' '.join(cmd)} failed: {out.stderr.strip() or out.returncode}")
    return out.stdout


def default_partition() -> str:
    """The partition marked default (``*``) by ``sinfo``."""
    for line in _run(["sinfo", "-h", "-o", "%P"]).split():
        if line.endswith("*"):
            return line[:-1]
    raise SubmissionError("executor.partition: not set and the cluster has no default partition")


def check_slurm_fit(cfg: ExecutorConfig, *, where: str = "executor") -> str:
    """Raise SubmissionError unless ``cfg`` fits its partition; return the partition name.

    A request fits when enough nodes (``cfg.nodes``) each have ``tasks_per_node * cpus_per_task``
    CPUs, ``gpus_per_node`` GPUs and ``mem_gb`` memory.
    """
    part = cfg.partition or default_partition()
    groups = parse_sinfo(_run(["sinfo", "-h", "-p", part, "-o", "%c %m %G %D"]))
    if not groups:
        known = sorted({p.rstrip("*") for p in _run(["sinfo", "-h", "-o", "%P"]).split()})
        raise SubmissionError(f"{where}.partition: unknown partition {part!r}; known: {', '.join(known)}")
    cpus = cfg.tasks_per_node * cfg.cpus_per_task
    mem_mb = int(cfg.mem_gb * 1024) if cfg.mem_gb else 0
    fitting = [g for g in groups if g.cpus >= cpus and g.gpus >= cfg.gpus_per_node and g.mem_mb >= mem_mb]
    if not fitting:
        best = max(groups, key=lambda g: (g.cpus, g.gpus, g.mem_mb))
        if best.cpus < cpus:
            why = (f"tasks_per_node x cpus_per_task = {cfg.tasks_per_node} x {cfg.cpus_per_task} = {cpus} CPUs "
                   f"per node, but its nodes have at most {best.cpus}")
        elif max(g.gpus for g in groups) < cfg.gpus_per_node:
            why = f"gpus_per_node = {cfg.gpus_per_node}, but its nodes have at most {max(g.gpus for g in groups)}"
        else:
            why = f"mem_gb = {cfg.mem_gb}, but its nodes have at most {max(g.mem_mb for g in groups)} MB"
        raise SubmissionError(f"{where}: the request does not fit partition {part!r}: {why}")
    available = sum(g.count for g in fitting)
    if cfg.nodes > available:
        raise SubmissionError(
            f"{where}.nodes: {cfg.nodes} nodes requested, but partition {part!r} has {available} that fit"
        )
    return part


def _check_common(cfg: ExecutorConfig, where: str = "executor") -> None:
    if cfg.kind not in KINDS:
        raise SubmissionError(f"{where}.kind: unknown kind {cfg.kind!r}; known: {', '.join(KINDS)}")
    for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min", "array_parallelism"):
        if getattr(cfg, key) < 1:
            raise SubmissionError(f"{where}.{key}: must be >= 1, got {getattr(cfg, key)}")
    if cfg.gpus_per_node < 0:
        raise SubmissionError(f"{where}.gpus_per_node: must be >= 0, got {cfg.gpus_per_node}")
    if cfg.master_port is not None and not 1024 <= cfg.master_port <= 65535:
        raise SubmissionError(f"{where}.master_port: must be in 1024..65535 (or null), got {cfg.master_port}")
    if not cfg.rendezvous_timeout_s > 0:
        raise SubmissionError(f"{where}.rendezvous_timeout_s: must be > 0, got {cfg.rendezvous_timeout_s}")
    for key in ("gloo_socket_ifname", "nccl_socket_ifname"):
        value = getattr(cfg, key)
        if value is not None and not re.fullmatch(r"[\^=]?[A-Za-z0-9_.:-]+(,[A-Za-z0-9_.:-]+)*", value):
            raise SubmissionError(f"{where}.{key}: {value!r} is not an interface name or a comma-separated list")
    if cfg.kind in ("debug", "local") and cfg.nodes != 1:
        raise SubmissionError(f"{where}.nodes: the {cfg.kind} executor runs on one node, got nodes={cfg.nodes}")
    if cfg.kind == "local" and cfg.gpus_per_node:
        import torch

        have = torch.cuda.device_count()
        if cfg.gpus_per_node > have:
            raise SubmissionError(
                f"{where}.gpus_per_node: {cfg.gpus_per_node} GPUs requested, this machine has {have}"
            )


def check_config(cfg: ExecutorConfig, *, stage_defaults: dict[str, dict[str, Any]] | None = None) -> None:
    """Raise SubmissionError for what no cluster can fix: kind, counts, nodes/GPUs of local runs (at config load).

    Every stage in ``cfg.stages`` (and in ``stage_defaults``, stage -> the caller's defaults of
    :meth:`ExecutorConfig.for_stage`) is checked as resolved, its errors naming ``executor.stages.<stage>``.
    """
    _check_common(cfg)
    stage_defaults = stage_defaults or {}
    for stage in sorted(set(cfg.stages) | set(stage_defaults)):
        over = cfg.stages.get(stage)
        if over is not None and over.array is not None and over.array < 1:
            raise SubmissionError(f"executor.stages.{stage}.array: must be >= 1, got {over.array}")
        _check_common(cfg.for_stage(stage, **stage_defaults.get(stage, {})), where=f"executor.stages.{stage}")


# --------------------------------------------------------------------------- factory

def job_environment(cfg: ExecutorConfig) -> dict[str, str]:
    """The variables every task of a SLURM job gets (rendezvous interface, port and timeout)."""
    from sepnet.hpc.distributed import RENDEZVOUS_TIMEOUT_ENV

    env = {RENDEZVOUS_TIMEOUT_ENV: f"{cfg.rendezvous_timeout_s:g}"}
    for key, value in (("GLOO_SOCKET_IFNAME", cfg.gloo_socket_ifname), ("NCCL_SOCKET_IFNAME", cfg.nccl_socket_ifname),
                       ("MASTER_PORT", cfg.master_port)):
        if value is not None:
            env[key] = str(value)
    return env


def _setup_lines(cfg: ExecutorConfig) -> list[str]:
    """``export`` lines of the sbatch script, run before ``srun`` starts the tasks."""
    return [f"export {k}={shlex.quote(v)}" for k, v in sorted(job_environment(cfg).items())]


def make_executor(cfg: ExecutorConfig, *, folder: str | Path, name: str,
                  where: str = "executor") -> submitit.Executor:
    """Build a submitit executor for ``cfg`` whose jobs log into ``<folder>/<name>/<job id>``.

    folder: the study's log root (``<study>/logs``). name: the job name (also the SLURM job name).
    where: the config key the errors name (``executor.stages.evaluate`` for a stage's config).
    Raises SubmissionError if the request cannot run here (checked against ``sinfo`` for SLURM).
    """
    _check_common(cfg, where)
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*", name) or ".." in name.split("/"):
        raise SubmissionError(f"job name {name!r}: use letters, digits, _ . + - and / between parts only")
    logdir = Path(folder) / name / "%j"
    if cfg.kind == "debug":
        ex = submitit.AutoExecutor(folder=logdir, cluster="debug")
        ex.update_parameters(name=name, timeout_min=cfg.time_min)
        return ex
    if cfg.kind == "local":
        ex = submitit.AutoExecutor(folder=logdir, cluster="local")
        ex.update_parameters(
            name=name, timeout_min=cfg.time_min, nodes=1, tasks_per_node=cfg.tasks_per_node,
            gpus_per_node=cfg.gpus_per_node, cpus_per_task=cfg.cpus_per_task,
        )
        return ex
    if shutil.which("sbatch") is None:
        raise SubmissionError("executor.kind slurm: sbatch is not on PATH (is this a SLURM login node?)")
    partition = check_slurm_fit(cfg, where=where)
    ex = submitit.AutoExecutor(folder=logdir, cluster="slurm")
    params: dict[str, Any] = dict(
        name=name, timeout_min=cfg.time_min, nodes=cfg.nodes, tasks_per_node=cfg.tasks_per_node,
        cpus_per_task=cfg.cpus_per_task, gpus_per_node=cfg.gpus_per_node,
        slurm_partition=partition, slurm_array_parallelism=cfg.array_parallelism,
        slurm_additional_parameters=dict(cfg.extra), slurm_setup=_setup_lines(cfg),
        # one rank failing (e.g. no rendezvous) ends the whole step at once instead of leaving the others waiting
        slurm_srun_args=["--kill-on-bad-exit=1"],
    )
    if cfg.mem_gb:
        params["mem_gb"] = cfg.mem_gb
    for key, value in (("account", cfg.account), ("qos", cfg.qos), ("constraint", cfg.constraint),
                       ("exclude", cfg.exclude)):
        if value:
            params[f"slurm_{key}"] = value
    ex.update_parameters(**params)
    return ex


def _kind(executor: submitit.Executor) -> str:
    return getattr(executor, "cluster", None) or {
        submitit.DebugExecutor: "debug", submitit.LocalExecutor: "local", submitit.SlurmExecutor: "slurm",
    }.get(type(executor), "unknown")


# --------------------------------------------------------------------------- submission helpers

def submit_tasks(executor: submitit.Executor, tasks: Sequence[Callable[[], Any]], *,
                 after: Sequence[Any] = ()) -> list:
    """Submit zero-argument callables (e.g. checkpointable ``TrainTask`` instances, which submitit
    can requeue) as one batch / SLURM job array. Returns the jobs in input order.

    after: SLURM jobs the whole array waits for (``--dependency=afterok``); SLURM executors only.
    """
    jobs: list = []
    if not tasks:
        return jobs
    if after and _kind(executor) != "slurm":
        raise SubmissionError("submit_tasks: dependencies need the slurm executor (use submit_after)")
    base = dict(executor._executor.parameters.get("additional_parameters", {}) or {}) if after else {}
    if after:
        executor.update_parameters(slurm_additional_parameters={**base, "dependency":
                                                                f"afterok:{':'.join(_job_ids(after))}"})
    try:
        with executor.batch():
            for task in tasks:
                jobs.append(executor.submit(task))
    finally:
        if after:
            executor.update_parameters(slurm_additional_parameters=base)
    return jobs


def _job_ids(jobs: Sequence[Any]) -> list[str]:
    return [str(j.job_id) for j in jobs]


def submit_after(executor: submitit.Executor, fn: Callable[..., Any], *args: Any, after: Sequence[Any] = ()) -> Any:
    """Submit ``fn(*args)`` to start only after every job in ``after`` succeeded.

    SLURM: ``--dependency=afterok:<ids>`` (the job is queued at once and never runs if one fails).
    local/debug: waits for ``after`` here, then submits; raises SubmissionError if one of them failed.
    """
    kind = _kind(executor)
    if not after:
        return executor.submit(fn, *args)
    if kind == "slurm":
        base = dict(executor._executor.parameters.get("additional_parameters", {}) or {})
        deps = ":".join(_job_ids(after))
        executor.update_parameters(slurm_additional_parameters={**base, "dependency": f"afterok:{deps}"})
        try:
            return executor.submit(fn, *args)
        finally:
            executor.update_parameters(slurm_additional_parameters=base)
    report = wait(after)
    if report.failed:
        jid, msg = next(iter(report.failed.items()))
        raise SubmissionError(f"dependency job {jid} failed, not submitting {getattr(fn, '__name__', fn)}: {msg}")
    return executor.submit(fn, *args)


# --------------------------------------------------------------------------- waiting

@dataclass
class WaitReport:
    """What :func:`wait` saw. ``results``: job id -> result (first task's); ``failed``: job id -> message;
    ``states``: job id -> final scheduler state (``COMPLETED``, ``FAILED``, ``CANCELLED``, ...)."""

    results: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def _outcome(job: Any) -> tuple[str, Any, str | None]:
    """(state, result, error message or None) of a finished job."""
    if isinstance(job, submitit.DebugJob):
        # exception() runs the function without the debug job's pdb post-mortem: wait() reports
        exc = job.exception()
        if exc is None:
            return "COMPLETED", job.result(), None
        return "FAILED", None, f"{type(exc).__name__}: {exc}"
    try:
        results = job.results()  # all tasks; with tasks_per_node > 1 job.result() is not enough
        state = "COMPLETED"
        return state, results[0] if results else None, None
    except Exception as exc:  # noqa: BLE001 - any job failure is reported, not raised
        # sacct says e.g. "CANCELLED by 0": keep the state word
        state = (str(getattr(job, "state", "FAILED") or "FAILED").upper().split() or ["FAILED"])[0]
        if state not in _FAILED_STATES:
            state = "FAILED"
        return state, None, task_error(job, str(exc)) or type(exc).__name__


def task_error(job: Any, text: str) -> str:
    """The error line of a failed job: from submitit's message, else from the stderr of any of its tasks
    (with ``--kill-on-bad-exit`` the task submitit reads first may be one that was killed, not the one that
    raised)."""
    line = _error_line(text, exception_only=True)
    if line:
        return line
    for t in range(int(getattr(job, "num_tasks", 1) or 1)):
        try:
            line = _error_line(job.task(t).stderr() or "", exception_only=True)
        except Exception:  # noqa: BLE001 - a task without a log: look at the next one
            continue
        if line:
            return line
    return _error_line(text)


def _error_line(text: str, *, exception_only: bool = False) -> str:
    """The line naming the exception in a submitit error (``ValueError: ...``), else the first line;
    the log paths follow it."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", ln)]
    if errs:
        return errs[-1]
    return "" if exception_only or not lines else lines[0]


def wait(jobs: Sequence[Any], *, poll_s: float = 5.0, progress: Callable[[str], None] | None = None) -> WaitReport:
    """Wait until every job has finished, one way or another, and report each outcome.

    A job cancelled (``scancel``), killed (OOM) or timed out ends as failed with its state and
    the last line of its error: it is not waited on forever (SLURM accounting must be on so that
    ``sacct`` knows the state). Debug jobs run here, in this process (without the debug executor's
    pdb post-mortem on failure). ``progress`` receives one line per finished job.
    """
    report = WaitReport()
    pending = list(jobs)
    while pending:
        # one forced sacct refresh per round covers every registered job of the watcher
        if pending and hasattr(pending[0], "watcher"):
            try:
                pending[0].watcher.update()
            except Exception as exc:  # noqa: BLE001 - sacct hiccups: retry next round
                log.debug("sacct update failed: %s", exc)
        still = []
        for job in pending:
            if _kind_of_job(job) != "debug" and not job.done():
                still.append(job)
                continue
            state, result, error = _outcome(job)
            jid = str(job.job_id)
            report.states[jid] = state
            if error is None:
                report.results[jid] = result
            else:
                report.failed[jid] = f"{state}: {error}"
            if progress:
                progress(f"job {jid}: {state}" + (f" ({error})" if error else ""))
        pending = still
        if pending:
            time.sleep(poll_s)
    return report


def _kind_of_job(job: Any) -> str:
    return "debug" if isinstance(job, submitit.DebugJob) else "other"
