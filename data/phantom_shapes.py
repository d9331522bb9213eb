"""Shape primitives of the procedural phantom (internal to ``sepnet.data.phantom``).

A :class:`Shape` is a bounding box plus a function of coordinates: ``fn(ax, ay, az)`` takes three float32
arrays of one sub-box (mm; anatomical coordinates, or physical LPS ones when ``physical`` is set) and
returns ``(mask, hu, amp)``: ``mask`` a bool array, ``hu`` the HU to paint (a scalar or an array over the
sub-box; None paints the label only) and ``amp`` the local texture amplitude in HU (scalar or array).
The renderer evaluates a shape only on the voxels of its bounding box and paints shapes in list order.

Coordinates are kept float32: parameters enter as Python floats, since numpy float64 scalars would
promote the arrays to float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Shape", "ShapeFn", "ell_q", "ellipsoid", "tube", "union", "zcyl", "shell_profile"]

ShapeFn = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple]


@dataclass
class Shape:
    """A paintable shape: bbox ``lo``..``hi`` (x, y, z) mm, ``fn`` as in the module docstring."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    fn: ShapeFn
    label: int | None = 0  # None = leave labels alone
    physical: bool = False  # fn gets physical (not anatomical) coordinates


def ell_q(ax, ay, az, c, r):
    """Ellipsoid quadric sum(((a - c) / r)^2): <= 1 inside the ellipsoid of centre c and radii r (mm)."""
    cx, cy, cz = map(float, c)
    ix, iy, iz = (1.0 / float(v) for v in r)
    return np.square((ax - cx) * ix) + np.square((ay - cy) * iy) + np.square((az - cz) * iz)


def ellipsoid(c, r, hu, *, amp=0.0, label=0, clip=None) -> Shape:
    """Axis-aligned ellipsoid of centre c and radii r (mm); clip(ax, ay, az) -> bool further restricts it."""
    c = np.asarray(c, float)
    r = np.asarray(r, float)

    def fn(ax, ay, az):
        m = ell_q(ax, ay, az, c, r) <= 1.0
        if clip is not None:
            m &= clip(ax, ay, az)
        return m, hu, amp

    return Shape(tuple(c - r), tuple(c + r), fn, label)


def _seg_dist(ax, ay, az, a, b):
    """Distance (mm) of points to the segment a-b and the unclipped parameter t (0 at a, 1 at b)."""
    a0, a1, a2 = map(float, a)
    d0, d1, d2 = map(float, b - a)
    L2 = d0 * d0 + d1 * d1 + d2 * d2
    px, py, pz = ax - a0, ay - a1, az - a2
    t = (px * d0 + py * d1 + pz * d2) * (1.0 / L2)
    tc = np.clip(t, 0.0, 1.0)
    dist2 = np.square(px - tc * d0) + np.square(py - tc * d1) + np.square(pz - tc * d2)
    return np.sqrt(dist2), t


def tube(a, b, ra, rb=None, *, hu, amp=0.0, label=0, caps=True, profile=None, clip=None) -> Shape:
    """Tapered tube from a (radius ra) to b (radius rb, default ra), mm; flat ends when caps is False.

    profile(dn) -> hu maps the normalised radial distance dn = d / r in [0, 1] to HU (cortical bone).
    """
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    rb = ra if rb is None else rb
    rmax = max(ra, rb)

    def fn(ax, ay, az):
        dist, t = _seg_dist(ax, ay, az, a, b)
        r = float(ra) + float(rb - ra) * np.clip(t, 0.0, 1.0)
        dn = dist / r
        m = dn <= 1.0
        if not caps:
            m &= (t >= 0.0) & (t <= 1.0)
        if clip is not None:
            m &= clip(ax, ay, az)
        return m, (profile(dn) if profile is not None else hu), amp

    lo = np.minimum(a, b) - rmax
    hi = np.maximum(a, b) + rmax
    return Shape(tuple(lo), tuple(hi), fn, label)


def union(shapes: list[Shape], hu, *, amp=0.0, label=0, clip=None) -> Shape:
    """Union of the masks of several shapes, painted with one value."""

    def fn(ax, ay, az):
        m = np.zeros(ax.shape, bool)
        for s in shapes:
            m |= s.fn(ax, ay, az)[0]
        if clip is not None:
            m &= clip(ax, ay, az)
        return m, hu, amp

    lo = tuple(np.min([s.lo for s in shapes], axis=0))
    hi = tuple(np.max([s.hi for s in shapes], axis=0))
    return Shape(lo, hi, fn, label)


def zcyl(c0, slope, r, z0, z1, hu, *, amp=0.0, label=0, profile=None, zref=None) -> Shape:
    """Elliptic cylinder along z between z0 < z1; centre (x, y) = c0 + slope * (zref - z) (mm), zref = z1.

    profile(q) -> hu maps the normalised radius q in [0, 1] to HU, as for :func:`tube`.
    """
    c0 = np.asarray(c0, float)
    slope = np.asarray(slope, float)
    r = np.asarray(r, float)
    zr = z1 if zref is None else zref

    c0x, c0y, s0, s1, r0, r1 = map(float, (*c0, *slope, *r))

    def fn(ax, ay, az):
        dz = zr - az
        q = np.square((ax - c0x - s0 * dz) / r0) + np.square((ay - c0y - s1 * dz) / r1)
        m = (q <= 1.0) & (az >= z0) & (az <= z1)
        return m, (profile(np.sqrt(q)) if profile is not None else hu), amp

    ca, cb = c0 + slope * (zr - z1), c0 + slope * (zr - z0)
    lo = np.minimum(ca, cb) - r
    hi = np.maximum(ca, cb) + r
    return Shape((lo[0], lo[1], z0), (hi[0], hi[1], z1), fn, label)


def shell_profile(inner: float, outer: float, edge: float) -> Callable[[np.ndarray], np.ndarray]:
    """Bone HU from a normalised radius: marrow ``inner`` inside dn < edge, cortex ``outer`` outside."""

    def prof(dn):
        return np.where(dn < edge, np.float32(inner), np.float32(outer))

    return prof
