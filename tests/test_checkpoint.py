"""hpc.checkpoint: atomic writes, RNG capture/restore, submitit requeue hook."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import submitit
import torch

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
