"""The real SLURM cluster (hpc/slurm-ci/start-slurm.sh with SLURM_CI_ACCOUNTING=1): checks before
queueing, the rendezvous settings in the job's environment (a port per job), a 2-rank DDP training,
a job array of 4 members, preemption + requeue + exact resumption, and a cancelled job reported as
failed. Skipped where ``sbatch`` is missing. Multi-node jobs: tests/test_multinode.py."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import cloudpickle
import pytest
import torch
from conftest import release_requeued, slurm_state

from sepnet.core.errors import SubmissionError
from sepnet.hpc.checkpoint import load
from sepnet.hpc.distributed import rendezvous_port
from sepnet.hpc.executors import make_executor, submit_tasks, wait
from sepnet.hpc.resources import ExecutorConfig
from sepnet.jobs.config import MemberConfig, TrainingConfig
from sepnet.jobs.train import TrainSpec, TrainTask

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.slurm

TINY = TrainingConfig(base=4, patch=[8, 32, 32], batch_size=2, epochs=2, iterations_per_epoch=3, val_every=3,
                      checkpoint_every=1, num_workers=0, lr_step_epochs=1, seed=0)
VAL_PATCH = [48, 64, 64]


def spec_for(root, store, member="m1", **kw) -> TrainSpec:
    base = dict(study_root=str(root), store=str(store), member=MemberConfig(name=member), training=TINY, fold=0,
                train_cases=["case00", "case01", "case02"], val_cases=["case03"], val_patch=VAL_PATCH)
    base.update(kw)
    return TrainSpec(**base)


def sleeper(seconds):
    time.sleep(seconds)
    return "woke"


def rendezvous_probe():
    """Join the job's process group; return (SLURM job id, rank, the rendezvous variables it saw)."""
    import os

    from sepnet.hpc import distributed as ddp

    env = ddp.init_distributed()
    try:
        keys = ("MASTER_PORT", "GLOO_SOCKET_IFNAME", "SEPNET_RENDEZVOUS_TIMEOUT_S")
        return os.environ["SLURM_JOB_ID"], env.rank, {k: os.environ.get(k) for k in keys}
    finally:
        ddp.cleanup()


def _squeue_count() -> int:
    return len(subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.splitlines())


def test_checks_before_queueing(slurm, tmp_path):
    before = _squeue_count()
    with pytest.raises(SubmissionError, match="unknown partition 'nosuch'"):
        make_executor(ExecutorConfig(kind="slurm", partition="nosuch"), folder=tmp_path, name="x")
    with pytest.raises(SubmissionError, match="does not fit partition"):
        make_executor(ExecutorConfig(kind="slurm", partition=slurm, tasks_per_node=512), folder=tmp_path, name="x")
    with pytest.raises(SubmissionError, match="nodes"):
        make_executor(ExecutorConfig(kind="slurm", nodes=99), folder=tmp_path, name="x")
    assert _squeue_count() == before and not list(tmp_path.iterdir())


def test_rendezvous_settings_reach_the_job_and_ports_differ_per_job(slurm, tmp_path):
    cfg = ExecutorConfig(kind="slurm", tasks_per_node=2, time_min=10, gloo_socket_ifname="lo", rendezvous_timeout_s=45)
    ex = make_executor(cfg, folder=tmp_path, name="probe")
    jobs = [ex.submit(rendezvous_probe) for _ in range(2)]
    report = wait(jobs, poll_s=1.0)
    assert report.ok, report.failed
    ports = set()
    for job in jobs:
        res = job.results()
        assert sorted(r[1] for r in res) == [0, 1] and res[0][2] == res[1][2]
        jid, _, env = res[0]
        assert env == {"MASTER_PORT": str(rendezvous_port(jid)), "GLOO_SOCKET_IFNAME": "lo",
                       "SEPNET_RENDEZVOUS_TIMEOUT_S": "45"}
        ports.add(env["MASTER_PORT"])
    assert len(ports) == 2


def test_cancelled_job_is_reported_failed(slurm, tmp_path):
    ex = make_executor(ExecutorConfig(kind="slurm", time_min=10), folder=tmp_path, name="sleeper")
    job = ex.submit(sleeper, 600)
    for _ in range(120):
        if slurm_state(job.job_id) == "RUNNING":
            break
        time.sleep(0.5)
    subprocess.run(["scancel", job.job_id], check=True)
    t0 = time.monotonic()
    report = wait([job], poll_s=1.0)
    assert list(report.failed) == [job.job_id] and report.states[job.job_id] == "CANCELLED"
    assert time.monotonic() - t0 < 120  # reported, not waited on until the 10 min limit


def test_ddp_two_tasks_and_array_of_four_members(slurm, tmp_path, tiny_store, mlflow_server):
    from mlflow.tracking import MlflowClient

    short = dataclasses.replace(TINY, epochs=1, iterations_per_epoch=2, val_every=2, checkpoint_every=2)
    ddp_ex = make_executor(ExecutorConfig(kind="slurm", tasks_per_node=2, cpus_per_task=1, time_min=10),
                           folder=tmp_path / "logs", name="train/ddp")
    ddp_job = ddp_ex.submit(TrainTask(spec_for(tmp_path / "ddp", tiny_store, training=short)))
    members = [MemberConfig(name=f"m{i}", alpha=a, loss=loss)
               for i, (a, loss) in enumerate([(0.5, "ath_exp_log"), (1.0, "ath_exp_log"), (1.0, "exp_log"),
                                              (1.0, "dice")])]
    ex = make_executor(ExecutorConfig(kind="slurm", time_min=10, array_parallelism=2), folder=tmp_path / "logs",
                       name="train/array")
    specs = [spec_for(tmp_path / "arr", tiny_store, member=m.name, training=short, mlflow_uri=mlflow_server,
                      experiment="slurm-array", study_name="arr") for m in members]
    specs = [dataclasses.replace(s, member=m) for s, m in zip(specs, members)]
    jobs = submit_tasks(ex, [TrainTask(s) for s in specs])
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1  # one array job
    report = wait([ddp_job] + jobs, poll_s=1.0)
    assert report.ok, report.failed
    res = ddp_job.results()
    assert len(res) == 2 and res[0]["world_size"] == 2 and res[0]["iterations"] == 2
    done = [report.results[j.job_id] for j in jobs]
    assert [d["member"] for d in done] == ["m0", "m1", "m2", "m3"]
    c = MlflowClient(mlflow_server)
    runs = c.search_runs([c.get_experiment_by_name("slurm-array").experiment_id])
    assert sorted(r.data.tags["sepnet.member"] for r in runs) == ["m0", "m1", "m2", "m3"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["sepnet.executor_job_id"] for r in runs} == {j.job_id for j in jobs}


def test_preempted_job_requeues_and_resumes_bit_identical(slurm, tmp_path, tiny_store):
    reference = spec_for(tmp_path / "ref", tiny_store)
    TrainTask(reference)()  # uninterrupted, in this process, same world size (1)
    spec = spec_for(tmp_path / "slurm", tiny_store, sleep_s=1.5)
    # time_min 20: submitit reads a SIGUSR2 in the first 10 min as preemption, not time-out
    ex = make_executor(ExecutorConfig(kind="slurm", time_min=20), folder=tmp_path / "logs", name="train/preempt")
    job = ex.submit(TrainTask(spec))
    last = spec.out_dir / "last.pt"
    for _ in range(600):
        if last.exists() and load(last)["step"] >= 2:
            break
        time.sleep(0.2)
    job._interrupt()  # preemption: SIGTERM + SIGUSR2 -> checkpoint() -> requeue
    released = release_requeued(job.job_id)
    report = wait([job], poll_s=1.0)
    assert report.ok, report.failed
    done = report.results[job.job_id]
    assert released and done["resumed_from"] and 2 <= done["resumed_from"][0] < 6
    a = load(reference.out_dir / "last.pt")["model"]
    b = load(last)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
