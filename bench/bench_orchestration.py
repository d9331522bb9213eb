"""Orchestration overheads: submit-to-start latency of the executors, and MLflow logging per training step.

- ``hpc.executors.make_executor`` for ``debug``, ``local`` and (when ``sinfo`` answers) ``slurm``: the job
  returns ``time.time()`` at its start; latency = start - the moment before ``submit``.
- MLflow (sqlite store in a temporary folder): cost per training step of (a) one ``log_batch`` of the
  per-step metrics (train_loss, lr) every step, and (b) the training job's buffered path
  (``jobs.tracking.RunTracker``-style: metrics appended, one ``log_batch`` per 500), as a share of one CPU training
  step of SepNet measured here (base 12, 16x64x64, batch 2; ``--quick``: tiny). A paper-size step is longer,
  so the share there is smaller.

Run: ``.venv/bin/python bench/bench_orchestration.py [--quick]``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import header, median, parser, set_threads, table, verdict


def started_at() -> float:
    return time.time()


def latency(kind: str, folder: Path, *, reps: int, timeout_s: float = 180.0) -> list[float]:
    from sepnet.hpc.executors import make_executor
    from sepnet.hpc.resources import ExecutorConfig

    ex = make_executor(ExecutorConfig(kind=kind, time_min=5), folder=folder, name=f"bench-{kind}")
    out = []
    for _ in range(reps):
        t0 = time.time()
        job = ex.submit(started_at)
        deadline = time.monotonic() + timeout_s
        if kind != "debug":
            while not job.done():
                if time.monotonic() > deadline:
                    job.cancel()
                    raise TimeoutError(f"{kind} job {job.job_id} did not finish within {timeout_s} s")
                time.sleep(0.2)
        out.append(job.result() - t0)
    return out


def slurm_ok() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    try:
        r = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and bool(r.stdout.strip())


def step_seconds(quick: bool, reps: int) -> float:
    import torch

    from sepnet.core.networks import build

    base, patch = (4, (16, 32, 32)) if quick else (12, (16, 64, 64))
    model = build("sepnet", in_channels=1, num_classes=23, base=base, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, 1) + patch, generator=g)
    y = torch.randint(0, 23, (2,) + patch, generator=g)
    ts = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ts.append(time.perf_counter() - t0)
    return median(ts[1:])


def mlflow_costs(folder: Path, *, steps: int) -> dict[str, float]:
    """Seconds per training step of (a) one log_batch per step, (b) buffered flush every 500 metrics."""
    from mlflow.entities import Metric

    from sepnet.jobs import tracking

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = tracking.client(uri)
    exp = tracking.ensure_experiment(client, "bench")
    run_a = tracking.get_or_create_run(client, exp, key="bench/a", name="a")
    run_b = tracking.get_or_create_run(client, exp, key="bench/b", name="b")
    client.log_batch(run_a, metrics=[Metric("warm", 0.0, 0, 0)])  # schema/connection warm-up

    t0 = time.perf_counter()
    for s in range(steps):
        now = int(time.time() * 1000)
        client.log_batch(run_a, metrics=[Metric("train_loss", 1.0 / (s + 1), now, s), Metric("lr", 1e-3, now, s)])
    per_step_a = (time.perf_counter() - t0) / steps

    buf: list = []
    t0 = time.perf_counter()
    for s in range(steps):
        now = int(time.time() * 1000)
        buf += [Metric("train_loss", 1.0 / (s + 1), now, s), Metric("lr", 1e-3, now, s)]
        if len(buf) >= 500:
            client.log_batch(run_b, metrics=buf)
            buf = []
    if buf:
        client.log_batch(run_b, metrics=buf)
    per_step_b = (time.perf_counter() - t0) / steps
    n = len(client.get_metric_history(run_b, "train_loss"))
    assert n == steps, f"MLflow kept {n} of {steps} buffered train_loss values"
    return {"a": per_step_a, "b": per_step_b}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    set_threads(args)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    header("Orchestration: executor latency and MLflow logging cost", args)
    reps = args.reps or (1 if args.quick else 5)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        rows = []
        kinds = ["debug", "local"]
        if args.quick:
            print("_slurm: skipped in --quick (run the full mode with a SLURM cluster up)._\n")
        elif slurm_ok():
            kinds.append("slurm")
        else:
            print("_slurm: skipped (sinfo does not answer; start one with "
                  "`SLURM_CI_ACCOUNTING=1 bash hpc/slurm-ci/start-slurm.sh`)._\n")
        lat: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(reps):  # alternate kinds
            for k in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
                lat[k] += latency(k, tmp / "logs", reps=1)
        for k in kinds:
            rows.append([k, median(lat[k]), min(lat[k]), max(lat[k]), len(lat[k])])
        table(["executor", "submit-to-start s (median)", "min s", "max s", "jobs"], rows)

        steps = 100 if args.quick else 1000
        costs = mlflow_costs(tmp, steps=steps)
        step = step_seconds(args.quick, 2 if args.quick else 3)
        table(["MLflow logging of per-step metrics (train_loss, lr), sqlite", "ms per step", "share of a step"], [
            ["one log_batch per step", 1000 * costs["a"], costs["a"] / step],
            ["buffered, one log_batch per 500 metrics (RunTracker)", 1000 * costs["b"], costs["b"] / step],
        ])
        print(f"Training step used as the denominator: {step:.3f} s (median; "
              f"{'SepNet base 4, 16x32x32' if args.quick else 'SepNet base 12, 16x64x64'}, batch 2, CPU).\n")
        table(["target", "measured", "verdict"], [
            ["MLflow logging < 1% of a step (train.py's buffered path)", f"{100 * costs['b'] / step:.3f}%",
             verdict(costs["b"] / step < 0.01)],
            ["MLflow logging < 1% of a step (unbuffered log_batch per step)", f"{100 * costs['a'] / step:.2f}%",
             verdict(costs["a"] / step < 0.01)],
        ])


if __name__ == "__main__":
    main()
