"""Soak: concurrent processes logging to one real ``mlflow server`` (``conftest.mlflow_server``) lose nothing.

Each writer is its own Python process that does what a training job does through ``sepnet.jobs.tracking``:
``ensure_experiment`` (all racing to create the same experiment), ``get_or_create_run`` for its own key,
``log_params_flat``, then metrics in ``log_batch`` calls (as the trainer's buffer flushes them) plus some
single ``log_metric`` calls. All writers start together (a file barrier). Afterwards every metric is
counted back from the server: one run per writer, every (key, step) present exactly once with its value.

Fast instance: 8 writers x 2 keys x 100 steps. ``slow``: 16 writers x 3 keys x 500 steps (24000 metrics).
Run the slow one with ``.venv/bin/python -m pytest -m slow tests/test_soak_mlflow.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sepnet.jobs import tracking

WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mlflow.entities import Metric
    from sepnet.jobs import tracking

    uri, exp_name, idx, keys, steps, batch, sync = sys.argv[1:8]
    idx, keys, steps, batch = int(idx), int(keys), int(steps), int(batch)
    sync = Path(sync)
    c = tracking.client(uri)
    (sync / f"ready-{idx}").touch()
    while not (sync / "go").exists():
        time.sleep(0.02)
    exp = tracking.ensure_experiment(c, exp_name)
    run = tracking.get_or_create_run(c, exp, key=f"writer-{idx}", name=f"writer {idx}")
    tracking.log_params_flat(c, run, {"writer": idx, "training": {"lr": 0.01, "steps": steps}})
    buf = []
    for step in range(steps):
        for k in range(keys):
            value = idx * 1e6 + k * 1e4 + step  # decodable: each value names its writer, key and step
            if k == 0 and step % 50 == 0:
                c.log_metric(run, f"m{k}", value, timestamp=int(time.time() * 1000), step=step)
            else:
                buf.append(Metric(f"m{k}", value, int(time.time() * 1000), step))
        if len(buf) >= batch:
            c.log_batch(run, metrics=buf)
            buf = []
    if buf:
        c.log_batch(run, metrics=buf)
    c.set_terminated(run)
    print(run)
    """
)


def _soak(uri: str, tmp_path: Path, *, writers: int, keys: int, steps: int, batch: int) -> dict:
    exp_name = f"soak-{tmp_path.name}-{time.time_ns()}"
    sync = tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, uri, exp_name, str(i), str(keys), str(steps), str(batch), str(sync)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for i in range(writers)
    ]
    deadline = time.monotonic() + 300
    while len(list(sync.glob("ready-*"))) < writers:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
            p.communicate()[1][-2000:] for p in procs if p.poll() is not None
        ]
        time.sleep(0.1)
    t0 = time.monotonic()
    (sync / "go").touch()
    results = [p.communicate(timeout=1200) for p in procs]
    seconds = time.monotonic() - t0
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]

    c = tracking.client(uri)
    exp = c.get_experiment_by_name(exp_name)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    assert len(runs) == writers  # no run duplicated by the concurrent get_or_create_run
    assert {r.data.tags[tracking.KEY_TAG] for r in runs} == {f"writer-{i}" for i in range(writers)}
    lost = 0
    for r in runs:
        idx = int(r.data.tags[tracking.KEY_TAG].split("-")[1])
        assert r.info.status == "FINISHED" and r.data.params["writer"] == str(idx)
        for k in range(keys):
            hist = c.get_metric_history(r.info.run_id, f"m{k}")
            got = sorted((m.step, m.value) for m in hist)
            want = [(s, idx * 1e6 + k * 1e4 + s) for s in range(steps)]
            lost += len(set(want) - set(got))
            assert got == want, f"writer {idx} m{k}: {len(got)} of {steps} points back"
    total = writers * keys * steps
    return {"writers": writers, "metrics": total, "lost": lost, "seconds": seconds, "per_s": total / seconds}


def test_eight_concurrent_writers_lose_no_metric(mlflow_server, tmp_path):
    fig = _soak(mlflow_server, tmp_path, writers=8, keys=2, steps=100, batch=50)
    assert fig["lost"] == 0
    print(f"\nmlflow soak (fast): {fig}")


@pytest.mark.slow
def test_sixteen_concurrent_writers_lose_no_metric_slow(mlflow_server, tmp_path):
    fig = _soak(mlflow_server, tmp_path, writers=16, keys=3, steps=500, batch=500)
    assert fig["lost"] == 0
    print(f"\nmlflow soak (slow): {fig}")
