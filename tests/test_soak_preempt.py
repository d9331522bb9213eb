"""Preemption soak on the real SLURM cluster: one training job preempted at seeded random iterations.

The job (``TrainTask`` on the tiny store, a checkpoint every iteration, ``sleep_s`` per iteration so
that an iteration can be aimed at) is preempted each time its ``last.pt`` reaches the next random
iteration: ``job._interrupt()`` (SIGTERM + SIGUSR2, as SLURM preemption does) makes submitit call
``TrainTask.checkpoint`` and ``scontrol requeue`` the job; the requeued job is released at once
(``scontrol update StartTime=now``) and resumes from ``last.pt``. At the end the job must have resumed
exactly once per preemption (``done.json`` ``resumed_from``) and its final weights must be bit-identical
to an uninterrupted run of the same spec in this process.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time

import cloudpickle
import pytest
import torch

from sepnet.core.errors import DataError
from sepnet.hpc.checkpoint import load
from sepnet.hpc.executors import make_executor, wait
from sepnet.hpc.resources import ExecutorConfig
from sepnet.jobs.config import MemberConfig, TrainingConfig
from sepnet.jobs.train import TrainSpec, TrainTask

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.slurm

VAL_PATCH = [48, 64, 64]


def training(iterations: int) -> TrainingConfig:
    return TrainingConfig(base=4, patch=[8, 32, 32], batch_size=2, epochs=2, iterations_per_epoch=iterations // 2,
                          val_every=5, checkpoint_every=1, num_workers=0, lr_step_epochs=1, seed=0)


def spec_for(root, store, tr: TrainingConfig, **kw) -> TrainSpec:
    return TrainSpec(study_root=str(root), store=str(store), member=MemberConfig(name="m1"), training=tr, fold=0,
                     train_cases=["case00", "case01", "case02"], val_cases=["case03"], val_patch=VAL_PATCH, **kw)


def _state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def _step(last, *, since: float) -> int:
    """The iteration in ``last.pt`` if this run of the job wrote it (mtime after ``since``), else -1."""
    try:
        return int(load(last)["step"]) if last.exists() and last.stat().st_mtime > since else -1
    except (DataError, FileNotFoundError):  # being replaced at this moment: read it again
        return -1


def preempt_and_release(job, last, target: int, *, since: float, timeout: float = 300) -> tuple[int, float]:
    """Wait until this run's ``last.pt`` holds ``target`` iterations, preempt the job and release its requeue.

    Returns the iteration hit and the time the requeued job was running again."""
    deadline = time.monotonic() + timeout
    while (step := _step(last, since=since)) < target:
        assert time.monotonic() < deadline, f"job {job.job_id} did not reach iteration {target} (at {step})"
        assert not job.done(), f"job {job.job_id} ended before iteration {target}"
        time.sleep(0.1)
    job._interrupt()
    released = False
    while time.monotonic() < deadline:
        st = _state(job.job_id)
        if st == "PENDING" and not released:
            time.sleep(5)  # slurmd refuses to relaunch a job id it killed a moment ago: let it settle
            subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], check=False)
            released = True
        if released and st == "RUNNING":
            return step, time.time()
        time.sleep(0.5)
    raise AssertionError(f"job {job.job_id} was not requeued and restarted (state {_state(job.job_id)!r})")


def soak(tmp_path, tiny_store, *, preemptions: int, iterations: int, seed: int) -> dict:
    tr = training(iterations)
    reference = spec_for(tmp_path / "ref", tiny_store, tr)
    TrainTask(reference)()  # uninterrupted, same world size (1)
    spec = spec_for(tmp_path / "slurm", tiny_store, tr, sleep_s=1.0)
    # time_min 30: submitit reads SIGUSR2 long before the time limit as preemption, not a time-out
    ex = make_executor(ExecutorConfig(kind="slurm", time_min=30), folder=tmp_path / "logs", name="train/soak")
    t0 = time.monotonic()
    job = ex.submit(TrainTask(spec))
    last = spec.out_dir / "last.pt"
    targets = sorted(random.Random(seed).sample(range(1, iterations - 1), preemptions))
    hit, since = [], 0.0
    for target in targets:
        step, since = preempt_and_release(job, last, max(target, hit[-1] + 1 if hit else 1), since=since)
        hit.append(step)
    report = wait([job], poll_s=1.0)
    assert report.ok, report.failed
    done = report.results[job.job_id]
    a, b = load(reference.out_dir / "last.pt")["model"], load(last)["model"]
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out = dict(targets=targets, hit=hit, resumed_from=done["resumed_from"], identical=identical,
               iterations=done["iterations"], seconds=time.monotonic() - t0)
    print(f"preemption soak: {out}")
    return out


def _check(out: dict, preemptions: int, iterations: int) -> None:
    assert len(out["resumed_from"]) == preemptions, out  # resumed after every preemption
    assert all(0 < s < iterations for s in out["resumed_from"]), out
    assert out["iterations"] == iterations and out["identical"], out


def test_two_preemptions_resume_bit_identical(slurm, tmp_path, tiny_store):
    out = soak(tmp_path, tiny_store, preemptions=2, iterations=8, seed=15)
    _check(out, 2, 8)


@pytest.mark.slow
def test_twenty_preemptions_resume_bit_identical(slurm, tmp_path, tiny_store):
    out = soak(tmp_path, tiny_store, preemptions=20, iterations=40, seed=2026)
    _check(out, 20, 40)

