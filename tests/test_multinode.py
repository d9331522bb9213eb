"""DDP across two SLURM nodes (``SLURM_CI_NODES=2 bash hpc/slurm-ci/start-slurm.sh``: node1 and node2,
each slurmd in its own network namespace, interface ``sn0``): the training path of ``sepnet train``
(``TrainTask`` through ``sepnet.hpc.executors``) with ``nodes: 2, tasks_per_node: 1``, rank 0 on
node1 and rank 1 on node2, gloo over the namespaces' network; the same global batch with
``nodes: 1, tasks_per_node: 2`` as the reference; preemption and exact resumption; a bounded,
one-line rendezvous failure; ``sepnet cv`` with ``executor.nodes=2``.

Run with ``pytest -m multinode``. Skipped unless the default partition has two nodes; with
``SLURM_CI_NODES`` >= 2 in the environment (``.ci/run``) a missing 2-node cluster is a failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import torch
from conftest import release_requeued

from sepnet.hpc.checkpoint import load
from sepnet.hpc.executors import make_executor, wait
from sepnet.hpc.resources import ExecutorConfig
from sepnet.jobs.config import MemberConfig, TrainingConfig
from sepnet.jobs.spec import TrainSpec
from sepnet.jobs.train import TrainTask

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = [pytest.mark.multinode, pytest.mark.slurm]

IFACE = "sn0"  # the nodes' interface in the CI cluster; the machine's hostname is 127.0.0.1 there
TINY = TrainingConfig(base=4, patch=[8, 32, 32], batch_size=1, epochs=2, iterations_per_epoch=3, val_every=3,
                      checkpoint_every=1, num_workers=0, lr_step_epochs=1, seed=0)
TWO_NODES = ExecutorConfig(kind="slurm", nodes=2, tasks_per_node=1, time_min=20, gloo_socket_ifname=IFACE,
                           rendezvous_timeout_s=60)
ONE_NODE = dataclasses.replace(TWO_NODES, nodes=1, tasks_per_node=2)


def _nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20).stdout
    return sorted({ln.split()[0] for ln in out.splitlines() if re.match(r"\S+ (idle|mix|alloc)", ln)})


@pytest.fixture(scope="module")
def two_nodes(slurm) -> list[str]:
    nodes = _nodes()
    if nodes[:2] != ["node1", "node2"]:
        why = f"the cluster has nodes {nodes}, not node1 and node2 (SLURM_CI_NODES=2 start-slurm.sh)"
        if int(os.environ.get("SLURM_CI_NODES", "1")) >= 2:
            pytest.fail(why)
        pytest.skip(why)
    return nodes


def spec_for(root: Path, store: Path, **kw) -> TrainSpec:
    base = dict(study_root=str(root), store=str(store), member=MemberConfig(name="m"), training=TINY, fold=0,
                train_cases=["case00", "case01", "case02"], val_cases=["case03"], val_patch=[48, 64, 64], threads=1)
    base.update(kw)
    return TrainSpec(**base)


def _joined(job) -> dict[int, str]:
    """rank -> node, from the line each rank prints when it joins the process group."""
    where = {}
    for path in Path(job.paths.folder).glob(f"{job.job_id}_*_log.err"):
        for m in re.finditer(r"rank (\d+)/2 \(local \d+\) on (\S+) joined the gloo process group", path.read_text()):
            where[int(m.group(1))] = m.group(2)
    return where


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(two_nodes, tmp_path_factory, tiny_store):
    """One 2-node x 1-task and one 1-node x 2-task training of the same spec (the former logging to MLflow)."""
    root = tmp_path_factory.mktemp("multinode")
    uri = f"sqlite:///{root / 'mlflow.db'}"  # a file on the shared filesystem: reachable from every namespace
    two = spec_for(root / "two", tiny_store, mlflow_uri=uri, experiment="multinode", study_name="mn")
    one = spec_for(root / "one", tiny_store)
    jobs = {}
    for key, cfg, spec in (("two", TWO_NODES, two), ("one", ONE_NODE, one)):
        jobs[key] = make_executor(cfg, folder=root / "logs", name=f"train/{key}").submit(TrainTask(spec))
    report = wait(list(jobs.values()), poll_s=1.0)
    assert report.ok, report.failed
    return dict(root=root, uri=uri, jobs=jobs, specs=dict(two=two, one=one))


def test_two_nodes_train_like_one_node_with_two_tasks(trained):
    two, one = trained["jobs"]["two"], trained["jobs"]["one"]
    assert _joined(two) == {0: "node1", 1: "node2"}  # one rank per node
    assert len(set(_joined(one).values())) == 1  # both ranks on one node
    results = two.results()
    assert len(results) == 2 and results[0] == results[1]
    assert results[0]["world_size"] == 2 and results[0]["iterations"] == TINY.epochs * TINY.iterations_per_epoch
    last_two = load(trained["specs"]["two"].out_dir / "last.pt")
    last_one = load(trained["specs"]["one"].out_dir / "last.pt")
    assert last_two["step"] == 6 and len(last_two["rng"]) == 2  # checkpointed, with both ranks' RNG states
    assert _equal(last_two["model"], last_one["model"])
    assert _equal(load(trained["specs"]["two"].out_dir / "best.pt")["model"],
                  load(trained["specs"]["one"].out_dir / "best.pt")["model"])


def test_two_node_job_logs_to_mlflow_once(trained):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(trained["uri"])
    runs = c.search_runs([c.get_experiment_by_name("multinode").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["sepnet.executor_job_id"] == trained["jobs"]["two"].job_id
    steps = [m.step for m in c.get_metric_history(runs[0].info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, 7))  # every iteration once, not once per rank


def test_preempted_two_node_job_resumes_exactly(trained, tiny_store):
    spec = spec_for(trained["root"] / "preempt", tiny_store, sleep_s=1.5)
    job = make_executor(TWO_NODES, folder=trained["root"] / "logs", name="train/preempt").submit(TrainTask(spec))
    last = spec.out_dir / "last.pt"
    for _ in range(600):
        if last.exists() and load(last)["step"] >= 2:
            break
        time.sleep(0.2)
    job._interrupt()  # preemption: SIGTERM + SIGUSR2 -> rank 0 checkpoints and requeues the whole job
    released = release_requeued(job.job_id)
    report = wait([job], poll_s=1.0)
    assert report.ok, report.failed
    done = report.results[job.job_id]
    assert released and done["world_size"] == 2 and done["resumed_from"] and 2 <= done["resumed_from"][0] < 6
    assert _joined(job) == {0: "node1", 1: "node2"}
    assert _equal(load(last)["model"], load(trained["specs"]["one"].out_dir / "last.pt")["model"])


def test_rendezvous_failure_is_one_line_within_the_timeout(two_nodes, tmp_path, tiny_store):
    """Without the interface, gloo binds to the hostname's address (127.0.0.1 on these nodes): the ranks
    reach rank 0's store but not each other, and the job must fail fast with one clear line."""
    cfg = dataclasses.replace(TWO_NODES, gloo_socket_ifname=None, rendezvous_timeout_s=8)
    job = make_executor(cfg, folder=tmp_path / "logs", name="train/nordv").submit(TrainTask(spec_for(tmp_path,
                                                                                                      tiny_store)))
    t0 = time.monotonic()
    report = wait([job], poll_s=1.0)
    assert time.monotonic() - t0 < 120
    assert report.states[job.job_id] == "FAILED"
    msg = report.failed[job.job_id]
    assert "RendezvousError" in msg and "no gloo rendezvous with node1:" in msg and "within 8 s" in msg, msg
    assert not (tmp_path / "models" / "fold0" / "m" / "last.pt").exists()


TWO_NODE_STUDY = """\
name: mn
root: study
datasets:
  - path: data
    format: structseg
    phantom: {cases: 4, seed: 3, size: tiny}
preprocess: {transforms: [SLF1], crop: null, chunks: [1, 16, 64, 64], workers: 1}
folds: {k: 2, seed: 0, val_fraction: 0.5, folds: [0]}
members:
  - {name: sep-a, network: sepnet, transform: SLF1, loss: ath_exp_log, alpha: 0.5}
  - {name: sep-b, network: sepnet, transform: SLF1, loss: ath_exp_log, alpha: 1.0}
training: {base: 4, patch: [16, 32, 32], batch_size: 1, epochs: 1, iterations_per_epoch: 2, val_every: 2,
           checkpoint_every: 1, num_workers: 0, foreground_fraction: 1.0}
inference: {patch: [16, 64, 64], overlap: 0.25, batch_size: 2}
executor: {kind: slurm, nodes: 2, tasks_per_node: 1, gloo_socket_ifname: sn0, rendezvous_timeout_s: 60,
           array_parallelism: 2, time_min: 20}
"""


def test_cv_study_on_two_nodes_completes_to_its_report(two_nodes, tmp_path):
    from sepnet.jobs.cli import main

    cfg = tmp_path / "study.yaml"
    cfg.write_text(TWO_NODE_STUDY)
    assert main(["cv", str(cfg)]) == 0
    root = tmp_path / "study"
    assert (root / "report" / "report.json").is_file()
    jobs = json.loads((root / "jobs.json").read_text())["jobs"]
    assert {j["executor"] for j in jobs.values()} == {"slurm"}
    for member in ("sep-a", "sep-b"):
        done = json.loads((root / "models" / "fold0" / member / "done.json").read_text())
        assert done["world_size"] == 2 and done["iterations"] == 2
