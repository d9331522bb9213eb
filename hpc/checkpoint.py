"""Atomic checkpoints, RNG state capture/restore, and submitit's requeue-on-preemption hook.

A checkpoint is a plain dict written with ``torch.save`` through :func:`sepnet.hpc.atomic.atomic_write`
(a fsynced temp file beside ``path``, renamed over it): a reader (or a job killed mid-write) sees
the old file or the new one, never half of one.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sepnet.hpc.atomic import atomic_write_bytes


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` (tensors, numbers, strings, dicts of them) to ``path`` atomically and durably
    (:func:`sepnet.hpc.atomic.atomic_write`: fsynced temp file renamed over ``path``).

    Serialised in memory first: torch.save's zip writer reports a full disk as an opaque
    RuntimeError, a plain file write as OSError ENOSPC naming the cause."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, buf.getbuffer())


def load(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic` (tensors on ``map_location``).

    ``weights_only=False``: checkpoints hold RNG states (numpy arrays, tuples); only load files
    that this toolkit wrote.
    """
    return torch.load(Path(path), map_location=map_location, weights_only=False)


def rng_state() -> dict[str, Any]:
    """The global RNG states this process uses: Python ``random``, numpy's legacy global RNG
    (we avoid it, but libraries may draw from it), torch CPU, and every CUDA device when present."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only when CUDA is present)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if isinstance(state["torch"], torch.Tensor) else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


class Checkpointable:
    """Base class for submitit callables that survive preemption and time-outs.

    On SIGUSR2 (preemption, time-out, ``job._interrupt()``), submitit calls ``checkpoint()`` on
    rank 0 and requeues the job with what it returns: a fresh copy of the task. The task itself
    saves its state periodically (``last.pt``) and resumes from it at start, so ``checkpoint``
    does not need to touch the half-finished iteration that the signal interrupted.
    Subclasses override :meth:`fresh` when a requeued copy must differ from ``self``.
    """

    def fresh(self) -> Checkpointable:
        """The callable to requeue (default: ``self``, pickled again)."""
        return self

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self.fresh(), *args, **kwargs)
