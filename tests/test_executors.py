"""hpc.executors and hpc.distributed: factory per kind, checks before queueing, arrays, dependencies, wait."""

from __future__ import annotations

import subprocess
import sys

import cloudpickle
import pytest

from sepnet.core.errors import SubmissionError
from sepnet.hpc import executors as exm
from sepnet.hpc.distributed import RendezvousError, init_distributed, rendezvous_port
from sepnet.hpc.executors import (
    check_slurm_fit,
    job_environment,
    make_executor,
    parse_sinfo,
    submit_after,
    wait,
)
from sepnet.hpc.resources import ExecutorConfig

# job functions are defined here: ship them by value (the job's interpreter cannot import tests/)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x):
    return x * x


def submit_each(executor, fn, args_list):
    """``fn(*args)`` for each ``args`` as one batch (one SLURM job array); jobs in input order."""
    with executor.batch():
        return [executor.submit(fn, *args) for args in args_list]


def fail(msg):
    raise ValueError(msg)


def ddp_probe(value):
    """Join the job's process group and return (rank, world size, mean of value + rank over ranks)."""
    from sepnet.hpc import distributed as ddp

    env = ddp.init_distributed()
    try:
        mean = ddp.all_reduce_mean(float(value + env.rank))
        gathered = ddp.all_gather_object(env.rank * 10)
        return env.rank, env.world_size, env.backend, mean, gathered
    finally:
        ddp.cleanup()


# --------------------------------------------------------------------------- partition parsing

def test_parse_sinfo_and_gres():
    groups = parse_sinfo("2 22899 (null) 1\n64+ 512000 gpu:a100:8(S:0-1),shard:4 12\n32 256000 gpu:4 3\n")
    assert [(g.cpus, g.mem_mb, g.gpus, g.count) for g in groups] == [
        (2, 22899, 0, 1), (64, 512000, 8, 12), (32, 256000, 4, 3)]


def _fake_sinfo(monkeypatch, text):
    calls = []

    def run(cmd):
        calls.append(cmd)
        if "-p" in cmd:
            return text if cmd[cmd.index("-p") + 1] == "gpu" else ""
        return "cpu*\ngpu\n"

    monkeypatch.setattr(exm, "_run", run)
    return calls


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tasks_per_node=8, cpus_per_task=10), "80 CPUs"),  # 8 x 10 > 64
        (dict(gpus_per_node=16, tasks_per_node=16), "gpus_per_node = 16"),
        (dict(mem_gb=1024), "mem_gb"),
        (dict(nodes=13, gpus_per_node=8), "13 nodes requested, but partition 'gpu' has 12"),
    ],
)
def test_request_not_fitting_partition(monkeypatch, kwargs, match):
    _fake_sinfo(monkeypatch, "64 512000 gpu:8 12\n")
    with pytest.raises(SubmissionError, match=match):
        check_slurm_fit(ExecutorConfig(kind="slurm", partition="gpu", **kwargs))


def test_request_fitting_partition(monkeypatch):
    _fake_sinfo(monkeypatch, "64 512000 gpu:8 12\n32 256000 gpu:4 3\n")
    # 8 GPUs/node only on the 12-node group: 12 nodes fit, the 4-GPU nodes do not count
    assert check_slurm_fit(ExecutorConfig(kind="slurm", partition="gpu", nodes=12, gpus_per_node=8,
                                          tasks_per_node=8, cpus_per_task=8, mem_gb=400)) == "gpu"
    with pytest.raises(SubmissionError, match="has 12"):
        check_slurm_fit(ExecutorConfig(kind="slurm", partition="gpu", nodes=13, gpus_per_node=8))
    assert check_slurm_fit(ExecutorConfig(kind="slurm", partition="gpu", nodes=15, gpus_per_node=4)) == "gpu"


def test_unknown_partition(monkeypatch):
    _fake_sinfo(monkeypatch, "64 512000 gpu:8 12\n")
    with pytest.raises(SubmissionError, match="unknown partition 'big'; known: cpu, gpu"):
        check_slurm_fit(ExecutorConfig(kind="slurm", partition="big"))


def test_bad_values_rejected_before_anything(tmp_path):
    with pytest.raises(SubmissionError, match="tasks_per_node"):
        make_executor(ExecutorConfig(kind="local", tasks_per_node=0), folder=tmp_path, name="x")
    with pytest.raises(SubmissionError, match="one node"):
        make_executor(ExecutorConfig(kind="local", nodes=2), folder=tmp_path, name="x")
    with pytest.raises(SubmissionError, match="GPUs requested"):
        make_executor(ExecutorConfig(kind="local", gpus_per_node=64), folder=tmp_path, name="x")
    with pytest.raises(SubmissionError, match="job name"):
        make_executor(ExecutorConfig(kind="debug"), folder=tmp_path, name="../escape")
    with pytest.raises(SubmissionError, match="executor.master_port"):
        make_executor(ExecutorConfig(kind="local", master_port=80), folder=tmp_path, name="x")
    with pytest.raises(SubmissionError, match="executor.rendezvous_timeout_s"):
        make_executor(ExecutorConfig(kind="local", rendezvous_timeout_s=0), folder=tmp_path, name="x")
    with pytest.raises(SubmissionError, match="executor.gloo_socket_ifname"):
        make_executor(ExecutorConfig(kind="local", gloo_socket_ifname="eth0; rm -rf /"), folder=tmp_path, name="x")
    assert list(tmp_path.iterdir()) == []  # nothing queued, no log folder made


# --------------------------------------------------------------------------- debug / local

def test_debug_executor_runs_in_process_and_logs_per_job(tmp_path):
    ex = make_executor(ExecutorConfig(kind="debug"), folder=tmp_path / "logs", name="train/fold0/a")
    jobs = submit_each(ex, square, [(2,), (3,)])
    report = wait(jobs, poll_s=0.1)
    assert report.ok and sorted(report.results.values()) == [4, 9]
    assert str(jobs[0].paths.folder).startswith(str(tmp_path / "logs" / "train" / "fold0" / "a"))


def test_debug_submit_after_runs_in_order_and_stops_on_failure(tmp_path):
    ex = make_executor(ExecutorConfig(kind="debug"), folder=tmp_path, name="dep")
    first = ex.submit(square, 4)
    second = submit_after(ex, square, 5, after=[first])
    assert first.result() == 16 and second.result() == 25
    bad = ex.submit(fail, "boom")
    with pytest.raises(SubmissionError, match="failed.*boom"):
        submit_after(ex, square, 6, after=[bad])


def test_local_executor_two_ranks_ddp_and_failure_report(tmp_path):
    cfg = ExecutorConfig(kind="local", tasks_per_node=2, time_min=5)
    ex = make_executor(cfg, folder=tmp_path / "logs", name="probe")
    job = ex.submit(ddp_probe, 1.0)
    ex1 = make_executor(ExecutorConfig(kind="local", time_min=5), folder=tmp_path / "logs", name="bad")
    bad = ex1.submit(fail, "expected failure")
    lines = []
    report = wait([job, bad], poll_s=0.5, progress=lines.append)
    results = job.results()
    # ranks 0 and 1, gloo group of 2, mean of (1 + 0, 1 + 1) = 1.5, gathered (0, 10) on both
    assert sorted(r[0] for r in results) == [0, 1]
    assert all(r[1:] == (2, "gloo", 1.5, [0, 10]) for r in results)
    assert report.results[str(job.job_id)][1] == 2
    assert list(report.failed) == [str(bad.job_id)] and "expected failure" in report.failed[str(bad.job_id)]
    assert len(lines) == 2
    # one log folder per job, never shared
    assert job.paths.folder != bad.paths.folder
    assert job.paths.folder.parent == tmp_path / "logs" / "probe"


def test_init_distributed_alone():
    from sepnet.hpc import distributed as ddp

    env = ddp.init_distributed()
    assert (env.rank, env.world_size, env.backend, env.is_main, env.device) == (0, 1, None, True, "cpu")
    assert ddp.all_reduce_mean(3.5) == 3.5 and ddp.all_gather_object("x") == ["x"]
    ddp.barrier()
    ddp.cleanup()


# --------------------------------------------------------------------------- rendezvous settings

def test_job_environment_carries_interfaces_port_and_timeout():
    assert job_environment(ExecutorConfig()) == {"SEPNET_RENDEZVOUS_TIMEOUT_S": "300"}
    cfg = ExecutorConfig(kind="slurm", gloo_socket_ifname="sn0", nccl_socket_ifname="^lo,docker0", master_port=23456,
                         rendezvous_timeout_s=12.5)
    assert job_environment(cfg) == {"GLOO_SOCKET_IFNAME": "sn0", "NCCL_SOCKET_IFNAME": "^lo,docker0",
                                    "MASTER_PORT": "23456", "SEPNET_RENDEZVOUS_TIMEOUT_S": "12.5"}


def test_rendezvous_port_per_job():
    assert rendezvous_port("1234") == 21234 and rendezvous_port(41234) == 21234
    assert rendezvous_port("1234_7") == rendezvous_port("1234")  # every array element of one id: same base
    ports = {rendezvous_port(str(i)) for i in range(500, 600)}
    assert len(ports) == 100 and all(20000 <= p < 40000 for p in ports)
    with pytest.raises(ValueError, match="no number"):
        rendezvous_port("local")


@pytest.mark.parametrize("rank", [0, 1])
def test_rendezvous_timeout_is_one_line_error_not_a_hang(monkeypatch, rank):
    """Rank 0 alone waits for a peer that never comes; rank 1 alone finds no rank 0 at the port."""
    import socket
    import time

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SEPNET_RENDEZVOUS_TIMEOUT_S", "2")
    t0 = time.monotonic()
    with pytest.raises(RendezvousError) as info:
        init_distributed()
    assert time.monotonic() - t0 < 15
    msg = str(info.value)
    assert "\n" not in msg and f"rank {rank}/2" in msg and f"127.0.0.1:{port}" in msg and "within 2 s" in msg
    assert not dist.is_initialized()


def test_peak_rss_is_that_of_the_jobs_largest_process():
    """A job's peak RSS line counts a child it waited for (a preprocessing worker) when that is the largest."""
    alloc = "b = bytearray(400 * 2**20); b[::4096] = b'x' * len(range(0, len(b), 4096))"
    probe = ("import subprocess, sys; from sepnet.hpc.resources import peak_rss_gib; a = peak_rss_gib(); "
             f"subprocess.run([sys.executable, '-c', {alloc!r}], check=True); print(a, peak_rss_gib())")
    # through a small middle process: Linux carries the forking parent's peak (pytest's) into a child's
    # ru_maxrss, but not into a grandchild forked by a small process
    hop = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
    before, after = map(float, subprocess.run([sys.executable, "-c", hop, sys.executable, "-c", probe], check=True,
                                              capture_output=True, text=True).stdout.split())
    assert before < 0.3 and 0.39 < after < 0.6, (before, after)
