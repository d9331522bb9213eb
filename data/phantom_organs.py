"""The 22 organs of a phantom case (internal to ``sepnet.data.phantom``).

Organ shapes in the anatomical frame of ``phantom_anatomy``, in paint order from low to high priority (a
later organ overwrites an earlier one where they overlap); label ids are those of ``sepnet.core.organs``.
Radii vary per case by +-15 % (+-10 % for lens, optic nerves and chiasm, which must stay a few slices
thin); every draw goes through ``Params`` in a fixed order. Targets: docs/conventions.md, "Phantom".
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sepnet.data.phantom_anatomy import CORD_C0, CORD_SLOPE, CORD_ZREF, Params, mirror
from sepnet.data.phantom_shapes import Shape, ell_q, ellipsoid, shell_profile, tube, union, zcyl

__all__ = ["organs"]


def organs(p: Params, *, brain: Callable) -> list[Shape]:
    """All organ shapes in paint order; ``brain(ax, ay, az) -> bool`` clips the temporal lobes."""
    S = _parotids(p)
    S += _mandible(p)
    S += _temporal_lobes(p, brain=brain)
    S += _brain_stem_and_cord(p)
    S += _ears_and_joints(p)
    S.append(  # pituitary (11)
        ellipsoid(
            (0.0, -5.0, -2.0), np.array([6.5, 5.0, 4.0]) * p.f(), 45.0 + p.organ_offset("pituitary"), amp=3.0, label=11
        )
    )
    S += _visual_pathway(p)
    return S


def _parotids(p: Params) -> list[Shape]:
    """Parotids (12 L / 13 R): fatty, lobular (high texture amplitude)."""
    S: list[Shape] = []
    for side, lab in ((1, 12), (-1, 13)):
        r = np.array([12.5, 20.0, 22.5]) * p.f()
        S.append(ellipsoid(mirror((52.0, 14.0, -45.0), side), r, 26.0 + p.organ_offset("parotid"), amp=14.0, label=lab))
    return S


def _mandible(p: Params) -> list[Shape]:
    """Mandible (21 L / 22 R): a chain of tubes with a cortical rim, split at x = 0."""
    off = p.organ_offset("mandible")
    mand_hu = shell_profile(360.0 + off, 1400.0 + off, 0.78)
    mscale = p.f(0.08)
    S: list[Shape] = []
    for side, lab in ((1, 21), (-1, 22)):

        def pts(*q, _s=side):
            return [np.array(mirror(v, _s)) * mscale for v in q]

        chain = pts(
            (0.0, -78.0, -92.0), (22.0, -70.0, -90.0), (38.0, -42.0, -88.0), (45.0, 5.0, -85.0), (49.0, 2.0, -31.0)
        )
        alv = pts((0.0, -76.0, -82.0), (22.0, -68.0, -80.0), (38.0, -42.0, -78.0))  # alveolar process
        cor = pts((44.0, -8.0, -70.0), (42.0, -16.0, -46.0))  # coronoid process
        radii = (7.5, 7.0, 6.5, 6.0)
        parts = [tube(chain[i], chain[i + 1], radii[i], radii[min(i + 1, 3)], hu=0, profile=mand_hu) for i in range(4)]
        parts += [tube(alv[i], alv[i + 1], 5.5, 5.0, hu=0, profile=mand_hu) for i in range(2)]
        parts.append(tube(cor[0], cor[1], 4.5, 3.5, hu=0, profile=mand_hu))

        def mand_fn(ax, ay, az, _parts=parts, _side=side):
            m = np.zeros(ax.shape, bool)
            v = np.zeros(ax.shape, np.float32)
            for s in _parts:  # the first part to reach a voxel gives its HU
                mi, vi, _ = s.fn(ax, ay, az)
                v = np.where(mi & ~m, vi, v)
                m |= mi
            m &= (ax * _side) >= 0.0
            return m, v, 80.0

        lo = tuple(np.min([s.lo for s in parts], axis=0))
        hi = tuple(np.max([s.hi for s in parts], axis=0))
        S.append(Shape(lo, hi, mand_fn, lab))
    return S


def _temporal_lobes(p: Params, *, brain: Callable) -> list[Shape]:
    """Temporal lobes (9 L / 10 R): label only (the brain's HU stays), clipped to the brain."""
    S: list[Shape] = []
    for side, lab in ((1, 9), (-1, 10)):
        r = np.array([25.0, 45.0, 22.5]) * p.f(0.1)
        S.append(ellipsoid(mirror((45.0, 0.0, 10.0), side), r, None, label=lab, clip=brain))
    return S


def _brain_stem_and_cord(p: Params) -> list[Shape]:
    """Brain stem (1), a tapered cylinder r 13 -> 9 mm, and the spinal cord (20) below it inside the canal."""
    bs = p.f()
    stem = tube(
        (0.0, 15.0, 15.0 * bs[2]),
        (0.0, 15.0, -55.0 * bs[2]),
        13.0 * bs[0],
        9.0 * bs[0],
        hu=30.0 + p.organ_offset("brain_stem"),
        amp=3.0,
        caps=False,
        label=1,
    )
    cord = zcyl(
        CORD_C0,
        (0.0, CORD_SLOPE),
        np.array([6.5, 4.5]) * p.f(0.1)[:2],
        -400.0,
        -55.0 * bs[2] + 0.5,
        34.0 + p.organ_offset("spinal_cord"),
        amp=3.0,
        label=20,
        zref=CORD_ZREF,
    )
    return [stem, cord]


def _ears_and_joints(p: Params) -> list[Shape]:
    """TM joints (18/19), middle ears (16/17, mostly air), inner ears (14/15, dense bone)."""
    kinds = (
        ((18, 19), (50.0, 2.0, -24.0), (8.0, 5.0, 6.0), 400.0, "tmj", 60.0),
        ((16, 17), (45.0, 15.0, -15.0), (4.0, 6.0, 7.0), -650.0, "mid_ear", 250.0),
        ((14, 15), (34.0, 15.0, -15.0), (6.0, 5.0, 5.0), 1075.0, "inner_ear", 60.0),
    )
    S: list[Shape] = []
    for labels, c, r, hu, key, amp in kinds:
        for side, lab in zip((1, -1), labels):
            S.append(
                ellipsoid(
                    mirror(c, side), np.array(r) * p.f(), hu + p.organ_offset(key), amp=amp, label=lab
                )
            )
    return S


def _visual_pathway(p: Params) -> list[Shape]:
    """Optic nerves (6/7), then eyes (2/3) over their front ends, lenses (4/5) and the chiasm (8)."""
    eyes = {}
    for side in (1, -1):
        er = 13.0 * p.f(0.12)
        ec = np.array(mirror((32.0, -65.0, 0.0), side))
        eyes[side] = (ec, er)
    S: list[Shape] = []
    for side, lab in ((1, 6), (-1, 7)):
        ec, er = eyes[side]
        S.append(
            tube(
                ec + (0.0, er[1] - 2.0, 0.0),
                mirror((8.0, -14.0, 4.0), side),
                2.2 * p.f(0.1)[0],
                hu=36.0 + p.organ_offset("optic"),
                amp=3.0,
                caps=False,
                label=lab,
            )
        )
    for side, lab in ((1, 2), (-1, 3)):
        ec, er = eyes[side]
        S.append(_eye(ec, er, vitreous=16.0 + p.organ_offset("eye"), sclera=60.0 + p.organ_offset("eye"), label=lab))
    for side, lab in ((1, 4), (-1, 5)):
        ec, er = eyes[side]
        lr = np.array([5.0, 2.3, 4.6]) * p.f(0.1)
        lc = ec - (0.0, er[1] - lr[1] - 1.5, 0.0)
        S.append(ellipsoid(lc, lr, 95.0 + p.organ_offset("lens"), amp=3.0, label=lab))
    chi = p.f(0.1)
    ch_c = np.array([0.0, -10.0, 6.0])
    ch_parts = [ellipsoid(ch_c, np.array([9.0, 5.5, 2.8]) * chi, 0)]
    for side in (1, -1):
        ch_parts.append(tube(ch_c + (0.0, 2.0, 0.0), ch_c + (15.0 * side, 13.0, 0.0), 2.3 * chi[2], hu=0, caps=False))
    S.append(union(ch_parts, 36.0 + p.organ_offset("optic"), amp=3.0, label=8))
    return S


def _eye(c: np.ndarray, r: np.ndarray, *, vitreous: float, sclera: float, label: int) -> Shape:
    """Eye ellipsoid: vitreous inside the quadric level 0.8, a sclera rim outside it."""

    def fn(ax, ay, az):
        q = ell_q(ax, ay, az, c, r)
        return q <= 1.0, np.where(q < 0.8, vitreous, sclera).astype(np.float32), 3.0

    return Shape(tuple(c - r), tuple(c + r), fn, label)
