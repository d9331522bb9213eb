"""Running a graph of jobs to the end: each job starts after the jobs it depends on succeeded.

Generic: a job is a name, a zero-argument callable, the submitit executor that runs it and the names
it waits for; nothing here knows what the jobs do.

- :func:`run_graph`: the scheduler for the local and debug executors. At most ``parallel`` jobs run
  at once; a job starts as soon as its dependencies are done; a job whose dependency failed is
  skipped. Ctrl-C cancels the running jobs (local jobs are children of this shell session).
- :func:`submit_graph_slurm` + :func:`follow_slurm`: on SLURM the whole graph is queued at once (jobs
  of one executor with the same dependencies as one job array, with ``--dependency=afterok`` on
  those), then followed until every job has ended. SLURM keeps a job whose dependency failed pending forever
  (``DependencyNeverSatisfied``): it is cancelled and reported skipped.

A dependency name that is not in the graph counts as done (finished by an earlier run).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sepnet.core.errors import SubmissionError

log = logging.getLogger(__name__)

# on_event(name, what, finished): one line of progress; ``finished`` counts the jobs ended so far
EventFn = Callable[[str, str, int], None]
SubmitFn = Callable[[str, Any], None]  # on_submit(name, submitit job)


@dataclass
class GraphJob:
    """One node of the graph: ``executor.submit(task)`` once every job named in ``after`` succeeded."""

    name: str
    task: Callable[[], Any]
    executor: Any
    after: list[str] = field(default_factory=list)


@dataclass
class GraphRun:
    """Where a graph stands. jobs: name -> submitit job; failed / skipped: name -> reason."""

    jobs: dict[str, Any] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped

    def summary(self) -> str:
        lines = [f"FAILED {n}: {m}" for n, m in self.failed.items()]
        lines += [f"skipped {n}: {m}" for n, m in self.skipped.items()]
        return "\n".join(lines)


def _quiet(*_: Any) -> None:
    return None


def last_line(e: BaseException) -> str:
    """The last non-empty line of an exception's message (submitit puts the cause there)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def job_error(job: Any) -> str | None:
    """None when a finished job succeeded (every task), else the last line of its error.

    A debug job runs here, now, without the debug executor's pdb post-mortem on failure.
    """
    import submitit

    if isinstance(job, submitit.DebugJob):
        exc = job.exception()
        return None if exc is None else last_line(RuntimeError(f"{type(exc).__name__}: {exc}"))
    from sepnet.hpc.executors import task_error

    try:
        job.results()
    except Exception as e:  # noqa: BLE001 - any job failure is reported, not raised
        return task_error(job, str(e)) or type(e).__name__
    return None


def _check_graph(graph: Sequence[GraphJob]) -> dict[str, GraphJob]:
    by_name = {j.name: j for j in graph}
    if len(by_name) != len(graph):
        raise SubmissionError("job graph: two jobs have the same name")
    return by_name


# --------------------------------------------------------------------------- local / debug

def run_graph(graph: Sequence[GraphJob], *, parallel: int = 1, in_process: bool = False, poll_s: float = 1.0,
              on_event: EventFn = _quiet, on_submit: SubmitFn = _quiet) -> GraphRun:
    """Run ``graph`` here to the end and return what happened; a failed job does not stop the others.

    in_process: the jobs run when their result is asked for (submitit's debug executor), one at a time.
    Raises SubmissionError when the graph cannot progress (a dependency neither done nor in the graph
    can only be a cycle here). On KeyboardInterrupt the running jobs are cancelled, then it re-raises.
    """
    by_name = _check_graph(graph)
    run = GraphRun()
    waiting, running = list(graph), {}
    parallel = 1 if in_process else max(1, parallel)
    try:
        while waiting or running:
            _start_ready(run, waiting, running, by_name, parallel=parallel, in_process=in_process,
                         on_event=on_event, on_submit=on_submit)
            if waiting and not running:
                raise SubmissionError(f"job graph cannot progress: {waiting[0].name} waits for a job that never ends")
            _collect(run, running, in_process=in_process, on_event=on_event)
            if running and not in_process:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        for job in running.values():
            try:
                job.cancel(check=False)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        raise
    return run


def _state_of(name: str, run: GraphRun, by_name: dict[str, GraphJob]) -> str:
    if name in run.failed or name in run.skipped:
        return "failed"
    if name not in by_name or name in run.finished:
        return "done"
    return "pending"


def _start_ready(run: GraphRun, waiting: list[GraphJob], running: dict[str, Any], by_name: dict[str, GraphJob],
                 *, parallel: int, in_process: bool, on_event: EventFn, on_submit: SubmitFn) -> None:
    """Submit the waiting jobs whose dependencies are done and skip those with a failed one, until
    nothing changes or ``parallel`` jobs run."""
    changed = True
    while changed:
        changed = False
        for j in list(waiting):
            if len(running) >= parallel:
                return
            states = {_state_of(a, run, by_name) for a in j.after}
            if "failed" in states:
                waiting.remove(j)
                run.skipped[j.name] = "a job it depends on failed"
                run.finished.add(j.name)
                on_event(j.name, "skipped (dependency failed)", len(run.finished))
                changed = True
            elif states <= {"done"}:
                waiting.remove(j)
                job = j.executor.submit(j.task)
                run.jobs[j.name] = running[j.name] = job
                on_submit(j.name, job)
                on_event(j.name, "running in-process" if in_process else f"started (pid {job.job_id})",
                         len(run.finished))
                changed = True


def _collect(run: GraphRun, running: dict[str, Any], *, in_process: bool, on_event: EventFn) -> None:
    for name, job in list(running.items()):
        if not in_process and not job.done():
            continue
        del running[name]
        error = job_error(job)  # a failed job is reported, the rest go on
        run.finished.add(name)
        if error is None:
            on_event(name, "done", len(run.finished))
        else:
            run.failed[name] = f"{error} (logs: {job.paths.stdout.parent})"
            on_event(name, "FAILED", len(run.finished))


# --------------------------------------------------------------------------- SLURM

def submit_graph_slurm(graph: Sequence[GraphJob], *, on_submit: SubmitFn = _quiet) -> dict[str, Any]:
    """Queue every job of ``graph`` now; returns name -> submitit job.

    In waves: the jobs whose dependencies inside the graph are all queued go in one job array per
    (executor, dependencies), the task objects themselves (so that submitit can requeue checkpointable
    tasks on preemption), with ``--dependency=afterok`` on those dependencies. Raises SubmissionError
    for a graph that cannot be queued (a cycle).
    """
    from sepnet.hpc.executors import submit_tasks

    by_name = _check_graph(graph)
    jobs: dict[str, Any] = {}
    while len(jobs) < len(graph):
        groups: dict[tuple, list[GraphJob]] = {}
        for j in graph:
            deps = tuple(a for a in j.after if a in by_name)
            if j.name not in jobs and all(a in jobs for a in deps):
                groups.setdefault((id(j.executor), deps), []).append(j)
        if not groups:
            waiting = next(j for j in graph if j.name not in jobs)
            raise SubmissionError(f"job graph cannot be queued: {waiting.name} waits for a job that never ends")
        for (_, deps), group in groups.items():
            queued = submit_tasks(group[0].executor, [j.task for j in group], after=[jobs[a] for a in deps])
            for j, job in zip(group, queued):
                jobs[j.name] = job
                on_submit(j.name, job)
    return jobs


def follow_slurm(jobs: dict[str, Any], *, poll_s: float = 5.0, on_event: EventFn = _quiet) -> GraphRun:
    """Poll the scheduler until every job in ``jobs`` (name -> submitit SLURM job) has ended.

    A job whose dependency can never be satisfied is cancelled and reported skipped. Ctrl-C stops
    following; the queued jobs go on.
    """
    run = GraphRun(jobs=dict(jobs))
    pending = dict(jobs)
    while pending:
        try:
            next(iter(pending.values())).watcher.update()  # one sacct call refreshes every job
        except Exception as exc:  # noqa: BLE001 - a sacct hiccup: next round
            log.debug("sacct update failed: %s", exc)
        for name, job in list(pending.items()):
            state = str(job.state).upper()
            if job.done():
                del pending[name]
                run.finished.add(name)
                error = job_error(job)
                if error is None:
                    on_event(name, "done", len(run.finished))
                else:
                    run.failed[name] = f"{state}: {error} (logs: {job.paths.stdout.parent})"
                    on_event(name, f"FAILED ({state})", len(run.finished))
            elif ("DEPENDENCY" in state or state.startswith("CANCELLED")) and \
                    "DependencyNeverSatisfied" in squeue_reason(job.job_id):
                job.cancel(check=False)
                del pending[name]
                run.finished.add(name)
                run.skipped[name] = "a job it depends on failed"
                on_event(name, "skipped (dependency failed)", len(run.finished))
        if pending:
            time.sleep(poll_s)
    return run


def squeue_reason(job_id: str) -> str:
    """SLURM's reason for a pending job (``squeue %r``), "" when unknown."""
    try:
        return subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%r"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def slurm_states(job_ids: Sequence[str]) -> dict[str, str]:
    """job id -> SLURM state word (``sacct``: PENDING, RUNNING, COMPLETED, ...); {} without sacct."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    try:
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)],
            capture_output=True, text=True, timeout=20, check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in out.splitlines():
        if "|" in line:
            jid, st = line.split("|", 1)
            states[jid.strip()] = st.split()[0] if st.strip() else "UNKNOWN"
    return states


def pid_alive(pid: int) -> bool:
    """Whether a local process (a local executor's job, a detached controller) still exists."""
    try:
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return False
