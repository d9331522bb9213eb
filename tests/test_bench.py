"""Smoke test of the benchmark scripts: each ``bench/bench_*.py --quick`` exits 0 and prints its tables.

Benchmarks are measurements, not assertions on speed: this test only checks that every script runs end to
end on tiny inputs and prints its title and its table header (so the docs' regeneration commands work).
``bench/gpu_check.py`` is smoke-tested on the CPU (``--quick``): every row runs and its JSON parses.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"

# script -> a table header it must print
SCRIPTS = {
    "bench_patches.py": "| layout / reader | patches/s (median) |",
    "bench_metrics.py": "| tool (Dice + HD95 + ASSD, 22 organs) |",
    "bench_models.py": "| model | parameters | step s (median) |",
    "bench_inference.py": "| scheme | s per volume (median) |",
    "bench_scaling.py": "| processes (gloo, CPU) | patches/s (median) |",
    "bench_orchestration.py": "| executor | submit-to-start s (median) |",
    "bench_precision.py": "| network | step | fp32 s (median) |",
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bench_quick(script: str, tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    out = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "(quick mode)" in out.stdout
    assert SCRIPTS[script] in out.stdout, out.stdout[-2000:]
    assert "| target | measured | verdict |" in out.stdout


def _gpu_check(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    # CUDA hidden: the CPU path, whatever machine runs the tests
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)


def test_gpu_check_quick_runs_every_check_on_cpu(tmp_path: Path) -> None:
    out_json = tmp_path / "rows.json"
    out = _gpu_check(["--quick", "--json", str(out_json)], tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "(quick mode)" in out.stdout
    assert "| check | model | precision | channels-last | compile | median s |" in out.stdout
    assert "| target | measured | verdict |" in out.stdout
    rows = json.loads(out_json.read_text())["rows"]
    assert all(r["status"] == "ok" for r in rows), [(r["check"], r["model"], r["status"]) for r in rows]
    train = {(r["model"], r["precision"], r["channels_last"], r["compile"]) for r in rows if r["check"] == "train step"}
    assert train == set(itertools.product(("sepnet", "unet3d"), ("bf16", "fp32"), (False, True), (False, True)))
    assert sum(line.startswith("| train step |") for line in out.stdout.splitlines()) == 16
    assert all(r["seconds"] > 0 for r in rows)
    assert {r["model"] for r in rows if r["check"].startswith("inference")} == {"sepnet", "unet3d"}
    ens = next(r for r in rows if r["check"] == "ensemble + uncertainty")
    assert ens["outputs"]["labels_shape"] == [12, 24, 24]  # the quick volume, fused labels in its geometry
    assert 0 < ens["outputs"]["entropy_max"] <= math.log(6) + 1e-6  # 6 voters: entropy in [0, ln 6] nats
    ddp = next(r for r in rows if r["check"].startswith("DDP"))
    assert ddp["outputs"] == {"reduce_ok": True, "param_spread": 0.0}  # gloo: exact sum, identical weights


def test_gpu_check_without_cuda_exits_2(tmp_path: Path) -> None:
    out = _gpu_check([], tmp_path)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout == ""
    assert out.stderr.strip().splitlines() == ["gpu_check: no CUDA device (use --quick for a CPU smoke run)"]


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("gpu_check")


def test_gpu_check_compile_failure_is_a_row(gpu_check) -> None:
    row = gpu_check.train_row("sepnet", gpu_check.config(True), torch.device("cpu"), precision="fp32",
                              channels_last=False, compiled=True, backend="no_such_backend")
    assert row["status"].startswith("failed: InvalidBackend"), row
    assert "seconds" not in row


def test_gpu_check_budget_skips_compiled_rows_only(gpu_check) -> None:
    calls = []
    rows = gpu_check.train_rows(gpu_check.config(True), torch.device("cpu"), backend="eager", budget_s=0.0,
                                t_start=time.perf_counter(), later=lambda: calls.append(1))
    assert calls == [1]  # the other checks run between the eager and the compiled rows
    assert len(rows) == 16
    assert all(r["status"] == "ok" for r in rows if not r["compile"])
    assert all(r["status"].startswith("skipped: time budget") for r in rows if r["compile"])
