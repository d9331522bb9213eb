"""Smoke test of the benchmark scripts: each ``bench/bench_*.py --quick`` exits 0 and prints its tables.

Benchmarks are measurements, not assertions on speed: this test only checks that every script runs end to
end on tiny inputs and prints its title and its table header (so the docs' regeneration commands work).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

# script -> a table header it must print
SCRIPTS = {
    "bench_patches.py": "| layout / reader | patches/s (median) |",
    "bench_metrics.py": "| tool (Dice + HD95 + ASSD, 22 organs) |",
    "bench_models.py": "| model | parameters | step s (median) |",
    "bench_inference.py": "| scheme | s per volume (median) |",
    "bench_scaling.py": "| processes (gloo, CPU) | patches/s (median) |",
    "bench_orchestration.py": "| executor | submit-to-start s (median) |",
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
