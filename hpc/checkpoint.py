"""Atomic checkpoints, RNG state capture/restore, and submitit's requeue-on-preemption hook.

A checkpoint is a plain dict written with ``torch.save`` through :func:`sepnet.hpc.atomic.atomic_write`
(a fsynced temp file beside ``path``, renamed over it): a reader (or a job killed mid-write) sees
the old file or the new one, never half of one.

Checkpoints hold plain data only (tensors, numbers, strings, None, and lists/tuples/dicts of them) and
are read with ``torch.load(weights_only=True)``: a file that someone else sends cannot run code when it
is loaded. :func:`save_atomic` refuses a state that such a load would refuse, so a bad state fails at
the first save, not at the resume after a preemption.
"""

from __future__ import annotations

import io
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sepnet.core.errors import DataError
from sepnet.hpc.atomic import atomic_write_bytes


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` (tensors, numbers, strings, None, lists/tuples/dicts of them) to ``path``
    atomically and durably (:func:`sepnet.hpc.atomic.atomic_write`: fsynced temp file renamed over it).

    Serialised in memory first: torch.save's zip writer reports a full disk as an opaque
    RuntimeError, a plain file write as OSError ENOSPC naming the cause. Raises TypeError (and leaves
    ``path`` untouched) when ``state`` holds an object that ``weights_only`` loading refuses.
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    try:
        torch.load(buf, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TypeError(f"{path}: checkpoint state holds a non-plain object ({_refusal(e)})") from None
    return atomic_write_bytes(path, buf.getbuffer())


def load(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic` (tensors on ``map_location``).

    Loaded with ``weights_only=True``: no code in the file runs. Raises DataError naming the file when
    it is missing, holds anything but plain tensors/containers (a pickled object is refused, never
    constructed), or is truncated/damaged.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint missing")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise DataError(f"{path}: not a plain-tensor checkpoint, refused to load it ({_refusal(e)})") from None
        raise DataError(f"{path}: checkpoint is damaged ({_first_sentence(str(e))})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        cause = _first_sentence(str(e)) or type(e).__name__
        raise DataError(f"{path}: checkpoint is damaged or truncated ({cause})") from None
    if not isinstance(state, dict):
        raise DataError(f"{path}: not a checkpoint (holds a {type(state).__name__}, expected a dict)")
    return state


def _first_sentence(text: str) -> str:
    """The first non-empty line of an error message, up to its first full stop (torch's are long)."""
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line.split(". ", 1)[0].rstrip(".")


def _refusal(e: pickle.UnpicklingError) -> str:
    """What torch's weights_only unpickler refused (``pickled posix.system``), out of its long message."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"it holds a pickled {m.group(1)}"
    if "WeightsUnpickler error:" in text:
        return _first_sentence(text.split("WeightsUnpickler error:", 1)[1])
    return "it holds objects other than tensors and plain containers"


def rng_state() -> dict[str, Any]:
    """The global RNG states this process uses, as plain data that ``weights_only`` loading accepts.

    ``python``: ``random.getstate()`` (nested tuples of ints, and None or a float); ``numpy``: the
    legacy global MT19937 (we avoid it, but libraries may draw from it) as ``(name, keys int64 tensor
    (624,), pos, has_gauss, cached_gaussian)``; ``torch``: the CPU generator's uint8 tensor; ``cuda``:
    a list of every CUDA device's uint8 tensor, when CUDA is present.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore exactly what :func:`rng_state` captured (CUDA states only when CUDA is present)."""
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((str(name), keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"].cpu())
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
