"""hpc.checkpoint: atomic writes, weights_only loading, RNG capture/restore, submitit requeue hook."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import submitit
import torch

from sepnet.core.errors import DataError
from sepnet.hpc.checkpoint import Checkpointable, load, rng_state, save_atomic, set_rng_state


def test_save_load_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 7, "name": "x", "rng": [rng_state()]}
    p = save_atomic(state, tmp_path / "sub" / "last.pt")
    back = load(p)
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["step"] == 7 and back["name"] == "x"
    assert sorted(os.listdir(tmp_path / "sub")) == ["last.pt"]  # no temp file left behind


def test_failed_save_keeps_previous_file(tmp_path):
    p = save_atomic({"step": 1}, tmp_path / "last.pt")
    with pytest.raises(Exception):  # noqa: B017 - a lambda cannot be pickled: the write fails mid-way
        save_atomic({"step": 2, "bad": lambda: 0}, p)
    assert load(p)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_rng_state_restores_every_generator():
    s = rng_state()
    a = (random.random(), np.random.random(), torch.rand(3))
    b = (random.random(), np.random.random(), torch.rand(3))
    set_rng_state(s)
    a2 = (random.random(), np.random.random(), torch.rand(3))
    assert a[0] == a2[0] and a[1] == a2[1] and torch.equal(a[2], a2[2])
    assert a[0] != b[0] and not torch.equal(a[2], b[2])  # the streams do move on


def test_rng_state_survives_save_and_load(tmp_path):
    s = rng_state()
    expected = torch.rand(4)
    save_atomic({"rng": s}, tmp_path / "c.pt")
    torch.rand(10)
    set_rng_state(load(tmp_path / "c.pt")["rng"])
    assert torch.equal(torch.rand(4), expected)


def _draws():
    return (random.random(), random.gauss(0, 1), np.random.random(), np.random.standard_normal(), torch.rand(3))


def test_rng_state_loads_weights_only_and_restores_exactly(tmp_path):
    random.gauss(0, 1), np.random.standard_normal()  # leaves a cached Gaussian in both states
    s = rng_state()
    expected = _draws()
    torch.save({"rng": [s]}, tmp_path / "c.pt")
    _draws()
    back = torch.load(tmp_path / "c.pt", weights_only=True)["rng"][0]  # torch's own safe loader accepts it
    set_rng_state(back)
    got = _draws()
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])


def test_training_state_dicts_are_plain(tmp_path):
    """What a training checkpoint holds (optimizer, scheduler, scaler states) loads with weights_only."""
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "scaler": scaler.state_dict(), "best_score": float("-inf"), "best_dice": [None, 0.5], "rng": [rng_state()]}
    back = load(save_atomic(state, tmp_path / "last.pt"))
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["best_score"] == float("-inf") and back["best_dice"] == [None, 0.5]


def test_save_refuses_state_that_weights_only_cannot_load(tmp_path):
    p = save_atomic({"step": 1}, tmp_path / "last.pt")
    with pytest.raises(TypeError, match="last.pt.*numpy"):
        save_atomic({"step": 2, "keys": np.zeros(3)}, p)
    assert load(p)["step"] == 1 and os.listdir(tmp_path) == ["last.pt"]


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for arbitrary code in a model file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "fold0" / "best.pt"
    bad.parent.mkdir()
    torch.save({"model": {"w": torch.zeros(2)}, "x": _Payload(marker)}, bad)
    with pytest.raises(DataError, match=r"best\.pt: not a plain-tensor checkpoint.*pickled io\.open") as e:
        load(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()
    torch.load(bad, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


@pytest.mark.parametrize("keep", [0, 10, 0.5, -10])
def test_truncated_checkpoint_reads_damaged(tmp_path, keep):
    p = save_atomic({"model": {"w": torch.arange(1000.0)}, "step": 3}, tmp_path / "last.pt")
    data = p.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    p.write_bytes(data[:n])
    with pytest.raises(DataError, match=r"last\.pt: checkpoint is damaged") as e:
        load(p)
    assert "\n" not in str(e.value)


def test_missing_or_non_dict_checkpoint(tmp_path):
    with pytest.raises(DataError, match="missing"):
        load(tmp_path / "none.pt")
    torch.save(torch.zeros(2), tmp_path / "t.pt")
    with pytest.raises(DataError, match="t.pt: not a checkpoint"):
        load(tmp_path / "t.pt")


class _Task(Checkpointable):
    def __init__(self, n):
        self.n = n

    def __call__(self):
        return self.n

    def fresh(self):
        return _Task(self.n + 1)


def test_checkpoint_returns_delayed_submission_of_fresh_copy():
    d = _Task(1).checkpoint()
    assert isinstance(d, submitit.helpers.DelayedSubmission)
    assert d.function.n == 2 and d.result() == 2
