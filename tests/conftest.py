"""Shared fixtures: a real ``mlflow server`` on 127.0.0.1, the SLURM marker, a tiny Zarr store.

- ``mlflow_server`` (session): ``mlflow server`` started with ``setsid`` on a free port, its own
  sqlite database and artifact folder; stopped by killing its process group.
- ``slurm`` marker / fixture: tests marked ``@pytest.mark.slurm`` are skipped unless ``sbatch`` is
  on PATH and ``sinfo`` answers (start the cluster with ``hpc/slurm-ci/start-slurm.sh``).
- ``tiny_store`` (session): 4 tiny phantom cases (``sepnet.data.phantom``, written with
  ``sepnet.data.readers.write_case``) preprocessed into a Zarr store (one SLF1 channel).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 cores shared: 1 thread is ~10x faster under load
os.environ.setdefault("MKL_NUM_THREADS", "1")
# MLflow must never write into the working directory or phone home during tests
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


# --------------------------------------------------------------------------- SLURM

def slurm_available() -> tuple[bool, str]:
    if shutil.which("sbatch") is None:
        return False, "sbatch not on PATH (start hpc/slurm-ci/start-slurm.sh)"
    try:
        out = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"sinfo failed: {e}"
    if out.returncode != 0 or not out.stdout.strip():
        return False, f"sinfo failed: {out.stderr.strip() or 'no partition'}"
    return True, ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [it for it in items if it.get_closest_marker("slurm")]
    if not marked:
        return
    ok, why = slurm_available()
    if not ok:
        skip = pytest.mark.skip(reason=f"no SLURM cluster: {why}")
        for it in marked:
            it.add_marker(skip)


@pytest.fixture(scope="session")
def slurm() -> str:
    """The default partition's name; skips the test when no SLURM cluster answers."""
    ok, why = slurm_available()
    if not ok:
        pytest.skip(f"no SLURM cluster: {why}")
    from sepnet.hpc.executors import default_partition

    return default_partition()


# --------------------------------------------------------------------------- MLflow server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    """URI ``http://127.0.0.1:<port>`` of a real MLflow tracking server (sqlite + served artifacts)."""
    d = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
           "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    logf = open(d / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=d, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(d / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        logf.close()


# --------------------------------------------------------------------------- tiny store

TINY_SHAPE = (16, 40, 40)  # (z, y, x)


def make_tiny_store(root: Path, *, cases: int = 4) -> Path:
    """Write ``cases`` tiny labelled cases and preprocess them (SLF1 only, no crop) into ``root/store``."""
    from sepnet.data.phantom import make_case
    from sepnet.data.preprocess import preprocess
    from sepnet.data.readers import write_case

    dataset = root / "dataset"
    for i in range(cases):
        write_case(make_case(seed=i, size="tiny", case_id=f"case{i:02d}"), dataset, format="structseg")
    report = preprocess(dataset, root / "store", format="structseg", transforms=("SLF1",), crop=None,
                        chunks=(1, 8, 64, 64), workers=1, progress=False)
    assert report.ok, report.failed
    return root / "store"


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a session-wide tiny store (4 cases: case00..case03, channel SLF1). Do not write into it."""
    return make_tiny_store(tmp_path_factory.mktemp("tiny"))


# --------------------------------------------------------------------------- a whole tiny study

TINY_STUDY = """\
name: tiny
root: study
datasets:
  - path: data
    format: structseg
    phantom: {{cases: 4, seed: 3, size: tiny}}
preprocess: {{transforms: [SLF1, SLF2], crop: null, chunks: [1, 16, 64, 64], workers: 1}}
folds: {{k: 2, seed: 0, val_fraction: 0.5}}
members:
  - {{name: sep-slf1-a05, network: sepnet, transform: SLF1, loss: ath_exp_log, alpha: 0.5}}
  - {{name: sep-slf2-a1, network: sepnet, transform: SLF2, loss: ath_exp_log, alpha: 1.0}}
baselines:
  - {{name: unet3d, network: unet3d, transform: SLF1, loss: ath_exp_log, alpha: 0.5}}
training: {{base: 4, patch: [16, 32, 32], batch_size: 1, epochs: 1, iterations_per_epoch: 4, val_every: 4,
           checkpoint_every: 2, num_workers: 0, foreground_fraction: 1.0}}
inference: {{patch: [16, 64, 64], overlap: 0.25, batch_size: 2}}
executor: {{kind: {kind}, array_parallelism: 2, time_min: 20}}
"""


def write_tiny_study(folder: Path, *, kind: str = "local", extra: str = "") -> Path:
    """A 4-case tiny-phantom study YAML (2 folds, 2 members + 1 baseline, 4 iterations each)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "study.yaml"
    cfg.write_text(TINY_STUDY.format(kind=kind) + extra)
    return cfg


@pytest.fixture(scope="session")
def trained_study(tmp_path_factory) -> Path:
    """The tiny study run to the end with the local executor; returns its YAML path."""
    from sepnet.jobs.cli import main

    cfg = write_tiny_study(tmp_path_factory.mktemp("tiny-study"))
    assert main(["cv", str(cfg)]) == 0
    return cfg


# --------------------------------------------------------------------------- SLURM job helpers

def slurm_state(job_id: str) -> str:
    """The job's state as ``squeue`` prints it ('' once it left the queue)."""
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def release_requeued(job_id: str, *, polls: int = 600) -> bool:
    """Wait for a preempted, requeued job to be PENDING, release it at once (a requeued job waits ~2 min
    for its BeginTime) and wait until it runs or has left the queue. True when it was released."""
    released = False
    for _ in range(polls):
        st = slurm_state(job_id)
        if st == "PENDING" and not released:
            # slurmd refuses to relaunch a job id it killed a moment ago ("already killed"): let it settle
            time.sleep(5)
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
            released = True
        if released and st in ("RUNNING", ""):
            break
        time.sleep(0.5)
    return released
