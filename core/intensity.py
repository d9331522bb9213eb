"""Intensity transforms: piecewise-linear maps from CT HU to [0, 1] (paper Sec. 3.1, docs/conventions.md).

The paper's Eq. (1) has a typo (it adds h_i); the segment used here is the corrected one, as in the
reference code::

    x(h) = x_i + (x_{i+1} - x_i) * (h - h_i) / (h_{i+1} - h_i)     for h_i <= h <= h_{i+1}

clamped to x_1 below h_1 and to x_K above h_K. No z-score follows the transform.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# name -> (HU breakpoints, intensities at those breakpoints)
_X4 = (0.0, 0.2, 0.8, 1.0)
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # paper's segmentally-linear functions, x = [0, 0.2, 0.8, 1]
    "SLF1": ((-500.0, -200.0, 200.0, 1500.0), _X4),
    "SLF2": ((-500.0, -100.0, 100.0, 1500.0), _X4),
    "SLF3": ((-500.0, -100.0, 400.0, 1500.0), _X4),
    # paper's naive linear windows
    "NLF1": ((-100.0, 100.0), (0.0, 1.0)),
    "NLF2": ((-500.0, 800.0), (0.0, 1.0)),
    # the one set the reference code shipped
    "REF": ((-500.0, -100.0, 400.0, 1500.0), (0.0, 0.1, 0.8, 1.0)),
}
TRANSFORMS: tuple[str, ...] = tuple(PRESETS)


def _check_points(hu_breakpoints: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    h = np.asarray(hu_breakpoints, dtype=np.float64).ravel()
    v = np.asarray(values, dtype=np.float64).ravel()
    if h.size != v.size:
        raise ValueError(f"slf: {h.size} HU breakpoints but {v.size} values; lengths must match")
    if h.size < 2:
        raise ValueError(f"slf: need at least 2 breakpoints, got {h.size}")
    if not (np.all(np.isfinite(h)) and np.all(np.isfinite(v))):
        raise ValueError("slf: breakpoints and values must be finite")
    if np.any(np.diff(h) <= 0):
        raise ValueError(f"slf: HU breakpoints must be strictly increasing, got {h.tolist()}")
    if np.any(v < 0) or np.any(v > 1):
        raise ValueError(f"slf: values must lie in [0, 1], got {v.tolist()}")
    return h, v


def slf(hu, hu_breakpoints: Sequence[float], values: Sequence[float]):
    """Piecewise-linear map of HU to intensities, clamped outside the breakpoints.

    Args:
        hu: CT intensities in HU, any shape; a numpy array (any real dtype, e.g. int16) or a torch tensor.
        hu_breakpoints: K >= 2 strictly increasing HU values h_1..h_K.
        values: K intensities x_1..x_K in [0, 1] at those breakpoints.

    Returns:
        float32 array of the same shape and kind as ``hu`` (numpy in -> numpy out, torch in -> torch
        out on the same device), values in [min(x), max(x)].

    Raises:
        ValueError: bad breakpoints/values (message says which) or NaN in ``hu``.
    """
    h, v = _check_points(hu_breakpoints, values)
    if isinstance(hu, torch.Tensor):
        t = hu.to(torch.float32)
        if torch.isnan(t).any():
            raise ValueError("slf: input contains NaN")
        out = torch.full_like(t, float(v[0]))
        # segments are disjoint after clamping the upper end, so the last assignment wins only at knots,
        # where both neighbouring segments agree.
        for i in range(h.size - 1):
            h0, h1, x0, x1 = float(h[i]), float(h[i + 1]), float(v[i]), float(v[i + 1])
            seg = x0 + (x1 - x0) * (t - h0) / (h1 - h0)
            out = torch.where(t >= h0, seg, out)
        return torch.where(t > float(h[-1]), torch.full_like(t, float(v[-1])), out)
    a = np.asarray(hu)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"slf: input must be a real numeric array, got dtype {a.dtype}")
    a64 = a.astype(np.float64, copy=False)
    if np.isnan(a64).any():
        raise ValueError("slf: input contains NaN")
    # np.interp clamps to the end values outside [h_1, h_K], which is exactly the spec.
    return np.interp(a64, h, v).astype(np.float32)


def apply_transform(hu, name: str):
    """Apply the preset ``name`` (one of ``TRANSFORMS``) to ``hu``; see :func:`slf`.

    Raises:
        ValueError: unknown preset name (the message lists the known ones).
    """
    try:
        h, v = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown intensity transform {name!r}; known: {', '.join(TRANSFORMS)}") from None
    return slf(hu, h, v)
