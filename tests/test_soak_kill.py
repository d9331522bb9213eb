"""SIGKILL soak: a tiny study (local executor, one fold) killed at random points, then rerun to the end.

Each round runs ``sepnet cv`` as a real process in its own session and, for each kill point in turn,
waits until the point's phase has started in that run (preprocessing, training, evaluation or the
report), sleeps a seeded random delay and sends SIGKILL to the whole process group (the controller
and its running jobs), then starts the study again. After every kill:

- the store accepts only complete cases and each of them verifies (``Store.verify_all() == {}``);
- every checkpoint on disk (``last.pt``, ``best.pt``) loads, and every ``done.json`` is valid JSON.

After the last kill a rerun must finish (exit 0) with the report written, every model trained and
evaluated, and each MLflow run key present exactly once (reruns find their runs again, never duplicate).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import write_tiny_study

from sepnet.core.errors import SepnetError
from sepnet.data.store import Store
from sepnet.hpc.checkpoint import load
from sepnet.jobs.cli import main
from sepnet.jobs.config import load_config
from sepnet.jobs.tracking import KEY_TAG, client, resolve_uri

MODELS = ["sep-slf1-a05", "sep-slf2-a1", "unet3d"]
ONE_FOLD = ["--set", "folds.folds=[0]"]
NO_BASELINE = ["--set", "baselines=[]"]  # the fast instance: two members, no baseline
# the longest random delay after a phase has started (s): about the phase's length on a 2-core machine
MAX_DELAY = {"preprocess": 1.0, "train": 20.0, "evaluate": 8.0, "report": 4.0}


def _newer(paths, t0: float) -> bool:
    for p in paths:
        try:
            if p.stat().st_mtime >= t0:
                return True
        except FileNotFoundError:
            continue
    return False


def phase_started(root: Path, phase: str, t0: float) -> bool:
    """Whether ``phase`` has started in the run that began at ``t0`` (files it writes, newer than t0)."""
    if phase == "preprocess":
        return (root / "store").exists() and _newer([root / "store", *(root / "store").iterdir()], t0)
    if phase == "train":
        return _newer(list(root.glob("models/fold*/*/spec.json")) + list(root.glob("models/fold*/*/last.pt")), t0)
    return _newer(list(root.glob(f"logs/*-{phase}/*")), t0)


def _group_gone(pgid: int, *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"process group {pgid} still alive after SIGKILL")


def kill_at(cfg: Path, phase: str, delay: float, *, log: Path, args: list[str]) -> str:
    """Start ``sepnet cv``, SIGKILL its process group ``delay`` s after ``phase`` starts.

    Returns "killed", or "finished" when the study ended before (the phase had nothing left to do).
    """
    root = cfg.parent / "study"
    t0 = time.time() - 1.0  # mtimes are coarse on some file systems
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sepnet.jobs.cli", "cv", str(cfg), *args],
                                cwd=cfg.parent, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not phase_started(root, phase, t0):
            if proc.poll() is not None:
                return "finished"
            assert time.monotonic() < deadline, f"phase {phase} did not start"
            time.sleep(0.02)
        time.sleep(delay)
        if proc.poll() is not None:
            return "finished"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        _group_gone(proc.pid)
    return "killed"


def check_nothing_half_written(root: Path) -> None:
    """Only complete, intact cases and loadable checkpoints are visible."""
    if (root / "store" / "plan.json").exists():
        try:
            store = Store(root / "store")
        except SepnetError as e:
            raise AssertionError(f"store unreadable after a kill: {e}") from None
        assert store.verify_all() == {}
        for cid in store.case_ids:
            assert store.read_label(cid).ndim == 3
    for ckpt in list(root.glob("models/*/*/last.pt")) + list(root.glob("models/*/*/best.pt")):
        state = load(ckpt)  # DataError (test failure) for a half-written checkpoint
        assert "model" in state or state, ckpt
    for done in root.glob("**/done.json"):
        json.loads(done.read_text())


def run_keys(cfg: Path) -> Counter:
    c = load_config(cfg)
    mc = client(resolve_uri(c))
    exp = mc.get_experiment_by_name(c.name)
    return Counter(r.data.tags.get(KEY_TAG) for r in mc.search_runs([exp.experiment_id], max_results=1000))


def soak(tmp_path: Path, points: list[tuple[str, float]], *, baseline: bool = True) -> list[tuple[str, float, str]]:
    """Kill the study at each (phase, delay) in turn, then finish it; return what each kill hit."""
    cfg = write_tiny_study(tmp_path)
    root = tmp_path / "study"
    log = tmp_path / "cv.log"
    args = ONE_FOLD + ([] if baseline else NO_BASELINE)
    models = MODELS if baseline else MODELS[:2]
    outcomes = []
    for phase, delay in points:
        outcomes.append((phase, delay, kill_at(cfg, phase, delay, log=log, args=args)))
        check_nothing_half_written(root)
    assert main(["cv", str(cfg), *args]) == 0, log.read_text()[-3000:]
    check_nothing_half_written(root)
    assert (root / "report" / "report.json").is_file() and (root / "eval" / "fold0" / "done.json").is_file()
    assert all((root / "models" / "fold0" / m / "done.json").is_file() for m in models)
    keys = run_keys(cfg)
    expected = {"tiny", "tiny/fold0"} | {f"tiny/fold0/{m}" for m in [*models, "ensemble"]}
    assert expected <= set(keys) and max(keys.values()) == 1, keys  # every run once (evaluation may add more)
    return outcomes


def random_points(n: int, *, seed: int) -> list[tuple[str, float]]:
    """n kill points in study order (rounds of preprocess, train, train, evaluate, report, repeated)."""
    rng = random.Random(seed)
    order = ["preprocess", "train", "train", "evaluate", "report"]
    return [(ph, round(rng.uniform(0, MAX_DELAY[ph]), 2)) for ph in (order * n)[:n]]


def test_sigkill_in_training_and_evaluation_then_rerun(tmp_path):
    rng = random.Random(15)
    points = [("train", round(rng.uniform(1, 6), 2)), ("evaluate", round(rng.uniform(0, 4), 2))]
    outcomes = soak(tmp_path, points, baseline=False)
    assert outcomes[0][2] == "killed", outcomes  # the training kill must land: each training takes > 6 s


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_random_points_of_every_phase(tmp_path, seed):
    t0 = time.monotonic()
    outcomes = soak(tmp_path, random_points(5, seed=seed))
    killed = sum(o[2] == "killed" for o in outcomes)
    print(f"seed {seed}: {killed}/{len(outcomes)} kills landed, {time.monotonic() - t0:.0f} s: {outcomes}")
    assert killed >= 3, outcomes
