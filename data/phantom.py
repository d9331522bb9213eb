"""A procedural head-and-neck CT phantom with the 22 StructSeg organs (method-notes sections 1 and 9).

No labelled head-and-neck CT can be downloaded here, so every quickstart and test runs on this phantom.
It is built to be hard in the ways real data is hard, not to be pretty:

- all 22 organs at approximately anatomical positions, sizes and HU (StructSeg means: inner ear 1043,
  mandible 734, TM joint 408, brain stem 29, eye 25, parotid 22; volumes lens 0.27 cm3, pituitary 0.58,
  chiasm 1.05, eye 9.1, brain stem 27, temporal lobe 106);
- surrounding anatomy: skin, subcutaneous fat, muscle, skull shell with diploe, skull base, brain white/grey
  matter with sulci and ventricles, CSF cisterns, orbital fat and extra-ocular muscles, sinuses, nasal cavity,
  airway, petrous bone, mastoid, vertebrae, teeth, tongue, thyroid, a couch and air outside;
- partial volume along z: the scene is rendered on ``nsub`` sub-slices per slice and averaged over the
  slab; labels are rendered on the same sub-slices and assigned by majority over the slab (ties go to the
  sub-slice nearest the slab centre), so image and label agree;
- spatially correlated noise (Gaussian-filtered white noise scaled to a per-case std of 12-18 HU) and a
  correlated tissue texture (trabecular bone, parotid lobules, mastoid air cells);
- tiny flat organs (lens, optic nerves, chiasm) spanning only 2-4 slices of 3 mm, and low-contrast soft
  tissue (parotid vs. muscle and fat, brain stem vs. brain and CSF);
- per-case variation: pose (yaw +-10 deg, pitch/roll +-2 deg, shift +-4 mm), scale 0.9-1.1, organ radii
  +-15 % (+-10 % for lens, optic nerves and chiasm so they stay a few slices thin), HU offsets +-10 per
  tissue, in-plane spacing, z range and so slice count, noise level.

Coordinates: the anatomy is written in an "anatomical" frame, mm from eye-level midline, LPS axes
(+x = patient left, +y = posterior, +z = superior). A case maps it to physical LPS space by
``P = t + s * R @ A``. Images have identity direction and the grid is centred in-plane on (0, 0), so the head
centre is near physical (0, 0, 0). Shapes are evaluated only on the voxels of their own bounding box, in
z-chunks, and painted in a fixed order (context first, then organs from low to high priority): each voxel
has exactly one label.

Sizes (per case; in-plane spacing jitters by the given factor, the z range by the given intervals):

========  ==============  ===================  =======  ==========  ===================  =========
size      in-plane        spacing x/y (mm)     z (mm)   sub-slices  z range (mm)         slices
========  ==============  ===================  =======  ==========  ===================  =========
tiny      64 x 64         3.8 x [0.95, 1.05]   4.0      5           +50..60 to -118..130  43-48
small     128 x 128       2.0 x [0.95, 1.05]   3.0      5           +50..60 to -118..130  57-64
full      512 x 512       0.98 x [0.90, 1.10]  3.0      3           +75..105 to -200..250 93-119
========  ==============  ===================  =======  ==========  ===================  =========

``tiny`` is about 0.6 MB in memory (int16 + uint8), ``small`` about 3 MB, ``full`` about 80 MB.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from sepnet.core.errors import DataError
from sepnet.data.case import Case, Geometry

log = logging.getLogger(__name__)

__all__ = ["SIZES", "SizeSpec", "make_case", "write_phantom", "FORMATS"]

FORMATS = ("structseg", "pddca", "hanseg", "dicom")
HU_MIN, HU_MAX = -1024, 3071


@dataclass(frozen=True)
class SizeSpec:
    """Grid of one phantom size. Lengths in mm, counts in voxels."""

    n_xy: int
    spacing_xy: float  # nominal in-plane spacing, mm
    spacing_z: float  # slice thickness = spacing, mm
    nsub: int  # sub-slices per slice for z partial volume
    z_top: tuple[float, float]  # top of the field of view, mm above eye level (uniform range)
    z_bottom: tuple[float, float]  # bottom, mm below eye level (uniform range, positive numbers)
    xy_jitter: float  # in-plane spacing factor range 1 +- xy_jitter


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(64, 3.8, 4.0, 5, (50.0, 60.0), (118.0, 130.0), 0.05),
    "small": SizeSpec(128, 2.0, 3.0, 5, (50.0, 60.0), (118.0, 130.0), 0.05),
    "full": SizeSpec(512, 0.98, 3.0, 3, (75.0, 105.0), (200.0, 250.0), 0.10),
}

# Tissue HU (before per-case offsets). Brain values from method-notes section 9.
_HU = {
    "air": -1000.0,
    "fat": -95.0,
    "skin": 45.0,
    "muscle": 50.0,
    "csf": 8.0,
    "wm": 26.0,
    "gm": 40.0,
    "table": 1650.0,  # skull outer/inner table
    "diploe": 650.0,
    "skull_base": 350.0,
    "cortical": 1250.0,
    "cancellous": 230.0,
    "tooth": 2400.0,
    "disc": 80.0,
    "orbit_fat": -90.0,
    "gland": 45.0,
    "thyroid": 95.0,
    "cartilage": 70.0,
}

# -------------------------------------------------------------------------------------------------
# Shapes. Each shape is an anatomical bounding box plus a function of anatomical coordinates
# (3D float32 arrays ax, ay, az of one sub-box) returning (mask, hu, amp): hu/amp are scalars or arrays
# over the sub-box (hu None = label-only), amp is the local texture amplitude in HU.


ShapeFn = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple]


@dataclass
class _Shape:
    lo: tuple[float, float, float]  # anatomical bbox (x, y, z) mm
    hi: tuple[float, float, float]
    fn: ShapeFn
    label: int | None = 0  # None = leave labels alone
    physical: bool = False  # fn gets physical (not anatomical) coordinates


def _ell_q(ax, ay, az, c, r):
    # python floats keep the float32 arrays float32 (numpy float64 scalars would promote them)
    cx, cy, cz = map(float, c)
    ix, iy, iz = (1.0 / float(v) for v in r)
    return np.square((ax - cx) * ix) + np.square((ay - cy) * iy) + np.square((az - cz) * iz)


def _ellipsoid(c, r, hu, *, amp=0.0, label=0, clip=None) -> _Shape:
    c = np.asarray(c, float)
    r = np.asarray(r, float)

    def fn(ax, ay, az):
        m = _ell_q(ax, ay, az, c, r) <= 1.0
        if clip is not None:
            m &= clip(ax, ay, az)
        return m, hu, amp

    return _Shape(tuple(c - r), tuple(c + r), fn, label)


def _seg_dist(ax, ay, az, a, b):
    """Distance (mm) of points to the segment a-b and the clipped parameter t in [0, 1]."""
    a0, a1, a2 = map(float, a)
    d0, d1, d2 = map(float, b - a)
    L2 = d0 * d0 + d1 * d1 + d2 * d2
    px, py, pz = ax - a0, ay - a1, az - a2
    t = (px * d0 + py * d1 + pz * d2) * (1.0 / L2)
    tc = np.clip(t, 0.0, 1.0)
    dist2 = np.square(px - tc * d0) + np.square(py - tc * d1) + np.square(pz - tc * d2)
    return np.sqrt(dist2), t


def _tube(a, b, ra, rb=None, *, hu, amp=0.0, label=0, caps=True, profile=None, clip=None) -> _Shape:
    """Tapered tube from a (radius ra) to b (radius rb); flat ends when caps is False.

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
    return _Shape(tuple(lo), tuple(hi), fn, label)


def _union(shapes: list[_Shape], hu, *, amp=0.0, label=0, clip=None) -> _Shape:
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
    return _Shape(lo, hi, fn, label)


def _zcyl(c0, slope, r, z0, z1, hu, *, amp=0.0, label=0, profile=None, zref=None) -> _Shape:
    """Elliptic cylinder along z between z0 < z1; centre (x, y) = c0 + slope * (zref - z) (mm), zref = z1."""
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
    return _Shape((lo[0], lo[1], z0), (hi[0], hi[1], z1), fn, label)


def _layered_head(cran_c, cran_r, parts, neck_r, depths, values) -> _Shape:
    """Skin / subcutaneous fat / deep soft tissue of the union of the head parts.

    Layer k covers the points deeper than depths[k] mm, with depth approximated per part as
    (1 - normalised radius) * mean radius (exact for spheres, within ~15 % on these ellipsoids), which costs
    one evaluation per part instead of one per part and layer.
    """
    ells = [(np.asarray(cran_c, float), np.asarray(cran_r, float))]
    ells += [(np.asarray(c, float), np.asarray(r, float)) for _, c, r in parts]
    vals = np.asarray([_HU["air"], *values], np.float32)
    nr = np.asarray(neck_r, float)

    def fn(ax, ay, az):
        level = np.zeros(ax.shape, np.int8)
        for i, (c, r) in enumerate(ells):
            rm = float(np.mean(r))
            depth = (1.0 - np.sqrt(_ell_q(ax, ay, az, c, r))) * rm
            lv = (depth >= 0).astype(np.int8)
            for k in (1, 2):
                d = depths[k] if i < 3 else min(depths[k], 0.45 * float(np.min(r)))  # the nose stays soft
                lv += depth >= d
            np.maximum(level, lv, out=level)
        rho = np.sqrt(np.square((ax - 0.0) / float(nr[0])) + np.square((ay - 18.0) / float(nr[1])))
        depth = (1.0 - rho) * float(np.mean(nr))
        lv = ((depth >= 0).astype(np.int8) + (depth >= depths[1]) + (depth >= depths[2])) * (az <= -40.0)
        np.maximum(level, lv.astype(np.int8), out=level)
        return level > 0, vals[level], 4.0

    lo = np.min([c - r for c, r in ells], axis=0)
    hi = np.max([c + r for c, r in ells], axis=0)
    lo = np.minimum(lo, (-nr[0], 18.0 - nr[1], -400.0))
    hi = np.maximum(hi, (nr[0], 18.0 + nr[1], hi[2]))
    return _Shape(tuple(lo), tuple(hi), fn)


def _shell_profile(inner: float, outer: float, edge: float) -> Callable[[np.ndarray], np.ndarray]:
    """Bone HU from a normalised radius: marrow ``inner`` inside dn < edge, cortex ``outer`` outside."""

    def prof(dn):
        return np.where(dn < edge, np.float32(inner), np.float32(outer))

    return prof


# -------------------------------------------------------------------------------------------------
# The anatomy of one case.


@dataclass
class _Params:
    rng: np.random.Generator
    hu_off: dict[str, float]
    brain_region: Callable | None = None  # clip function of the brain (set once the context is built)

    def f(self, spread: float = 0.15) -> np.ndarray:
        """Per-axis radius factors uniform in [1 - spread, 1 + spread]."""
        return self.rng.uniform(1.0 - spread, 1.0 + spread, size=3)

    def hu(self, name: str) -> float:
        return float(_HU[name] + self.hu_off[name])


# spinal cord centre (x, y) at z = _CORD_ZREF, drifting posterior by _CORD_SLOPE mm per mm downwards
_CORD_ZREF = -50.0
_CORD_C0 = (0.0, 16.6)
_CORD_SLOPE = 0.08


def _mirror(p, side: int):
    return (p[0] * side, p[1], p[2])


def _brain_floor(ay):
    """z (mm) of the cranial floor as a function of y: posterior fossa -48, middle fossa -18, above orbits +16."""
    return -48.0 + 30.0 / (1.0 + np.exp((ay - 20.0) / 3.0)) + 34.0 / (1.0 + np.exp((ay + 50.0) / 3.0))


def _anatomy(p: _Params) -> list[_Shape]:
    rng = p.rng
    S: list[_Shape] = []
    hu = p.hu

    # -- head surface: skin, subcutaneous fat, deep soft tissue (three nested copies of each part)
    cran_c, cran_r = np.array([0.0, 8.0, 15.0]), np.array([76.0, 96.0, 95.0]) * rng.uniform(0.97, 1.03, 3)
    parts = [
        ("e", (0.0, -30.0, -50.0), (58.0, 62.0, 50.0)),  # face and jaw
        ("e", (0.0, -66.0, -92.0), (32.0, 22.0, 14.0)),  # chin
        ("e", (0.0, -88.0, -22.0), (11.0, 14.0, 22.0)),  # nose
    ]
    neck_r = np.array([54.0, 58.0]) * rng.uniform(0.95, 1.05, 2)
    S.append(
        _layered_head(
            cran_c,
            cran_r,
            parts,
            neck_r,
            (0.0, 2.0, 8.0 + rng.uniform(-1.5, 1.5)),
            (hu("skin"), hu("fat"), hu("muscle")),
        )
    )
    for side in (1, -1):  # pinna (cartilage) and ear canal opening
        S.append(_ellipsoid(_mirror((74.0, 18.0, -12.0), side), (5.0, 14.0, 28.0), hu("cartilage"), amp=5.0))

    # -- neck and face soft-tissue context
    S.append(_ellipsoid((0.0, -45.0, -72.0), (25.0, 30.0, 15.0), hu("muscle") + 8, amp=4.0))  # tongue
    S.append(_ellipsoid((0.0, -52.0, -63.0), (16.0, 18.0, 2.5), hu("air")))  # air above the tongue
    for side in (1, -1):
        S.append(_ellipsoid(_mirror((50.0, -12.0, -62.0), side), (8.0, 18.0, 22.0), hu("muscle") + 5, amp=4.0))
        S.append(_ellipsoid(_mirror((24.0, -8.0, -55.0), side), (6.0, 10.0, 15.0), hu("fat"), amp=8.0))
        S.append(_ellipsoid(_mirror((30.0, -30.0, -97.0), side), (10.0, 12.0, 9.0), hu("gland"), amp=6.0))
        S.append(_ellipsoid(_mirror((15.0, -32.0, -175.0), side), (8.0, 10.0, 22.0), hu("thyroid"), amp=8.0))
        S.append(_ellipsoid(_mirror((30.0, 45.0, -140.0), side), (9.0, 7.0, 70.0), hu("fat"), amp=8.0))

    # -- skull vault, skull base and brain
    sk_r = cran_r - 6.0  # the scalp is ~6 mm thick
    sk_thick = 7.0 * rng.uniform(0.85, 1.15)
    r_eff = float(np.mean(sk_r))
    t_table, t_diploe, t_base, t_soft = hu("table"), hu("diploe"), hu("skull_base"), hu("muscle")

    def skull_fn(ax, ay, az):
        rho = np.sqrt(_ell_q(ax, ay, az, cran_c, sk_r))
        depth = (1.0 - rho) * r_eff
        # the vault reaches lower at the back (occiput) than at the sides (temporal bone) and the face
        zcut = np.where(ay > 20.0, -53.0, np.where(ay > -40.0, -28.0, -8.0))
        m = (rho <= 1.0) & (az > zcut)
        v = np.where(depth < 1.8, t_table, np.where(depth < sk_thick - 2.0, t_diploe, t_table))
        # inside the vault: a bony skull base just under the cranial floor, soft tissue further down
        base = az > _brain_floor(ay) - 5.0
        v = np.where(depth >= sk_thick, np.where(base, t_base, t_soft), v).astype(np.float32)
        amp = np.where(depth < sk_thick, 120.0, np.where(base, 250.0, 4.0)).astype(np.float32)
        return m, v, amp

    S.append(_Shape(tuple(cran_c - sk_r), tuple(cran_c + sk_r), skull_fn))

    in_r = sk_r - sk_thick
    kvec = rng.normal(size=(6, 3))
    kvec *= (2 * np.pi / rng.uniform(14.0, 24.0, size=(6, 1))) / np.linalg.norm(kvec, axis=1, keepdims=True)
    phase = rng.uniform(0, 2 * np.pi, size=6)
    wm, gm, csf, cort = hu("wm"), hu("gm"), hu("csf"), hu("cortical")

    def brain_region(ax, ay, az, margin=0.0):
        return (_ell_q(ax, ay, az, cran_c, in_r) <= 1.0) & (az > _brain_floor(ay) + margin)

    def brain_fn(ax, ay, az):
        rho = np.sqrt(_ell_q(ax, ay, az, cran_c, in_r))
        floor = _brain_floor(ay)
        inside = (rho <= 1.0) & (az > floor - 3.0)
        d = np.minimum((1.0 - rho) * float(np.mean(in_r)), az - floor)
        n = np.zeros(ax.shape, np.float32)
        for k, ph in zip(kvec, phase):
            n += np.cos(float(k[0]) * ax + float(k[1]) * ay + float(k[2]) * az + float(ph))
        n /= np.sqrt(len(phase) / 2.0)  # ~unit variance
        v = np.full(ax.shape, wm, np.float32)
        v = np.where(d < 3.5 + 2.0 * n, gm, v)
        v = np.where((d < 1.2) | ((d < 14.0) & (n > 1.1)), csf, v)
        v = np.where(d <= 0.0, cort, v)  # bony floor of the cranial fossae
        return inside, v.astype(np.float32), 3.0

    S.append(_Shape(tuple(cran_c - in_r), tuple(cran_c + in_r), brain_fn))
    for side in (1, -1):
        S.append(_ellipsoid(_mirror((18.0, 0.0, 18.0), side), (9.0, 16.0, 10.0), gm - 2, amp=3.0))  # deep GM
        S.append(_ellipsoid(_mirror((9.0, -2.0, 32.0), side), (5.0, 26.0, 9.0) * p.f(0.2), csf))  # lat. ventricle
    S.append(_ellipsoid((0.0, 8.0, 12.0), (2.0, 9.0, 7.0), csf))  # third ventricle
    S.append(_ellipsoid((0.0, 33.0, -26.0), (6.0, 4.0, 7.0), csf))  # fourth ventricle
    S.append(_ellipsoid((0.0, -8.0, 7.0), (15.0, 11.0, 5.0), csf))  # suprasellar cistern
    S.append(_tube((0.0, 15.0, 17.0), (0.0, 15.0, -58.0), 16.0, 12.0, hu=csf, caps=False))  # prepontine cistern

    # -- face bones, sinuses, nasal cavity, skull base details
    for side in (1, -1):
        c = _mirror((24.0, -52.0, -30.0), side)
        r = np.array([15.0, 18.0, 16.0]) * p.f(0.15)
        S.append(_ellipsoid(c, r + 2.0, hu("cortical") - 150, amp=100.0))  # maxilla wall
        S.append(_ellipsoid(c, r, hu("air")))  # maxillary sinus
    S.append(_ellipsoid((0.0, -55.0, -48.0), (20.0, 26.0, 2.5), hu("cortical") - 400, amp=100.0))  # hard palate
    S.append(_ellipsoid((0.0, -60.0, 0.0), (9.0, 18.0, 11.0), -550.0, amp=350.0))  # ethmoid air cells
    S.append(_ellipsoid((0.0, -60.0, -24.0), (11.0, 28.0, 18.0), hu("air")))  # nasal cavity
    for side in (1, -1):
        S.append(_ellipsoid(_mirror((7.0, -58.0, -27.0), side), (3.0, 22.0, 4.0), hu("skin"), amp=8.0))  # turbinate
    S.append(_ellipsoid((0.0, -25.0, -32.0), (14.0, 12.0, 9.0), hu("air")))  # nasopharynx
    S.append(_ellipsoid((0.0, -80.0, 32.0), (11.0, 4.0, 8.0) * p.f(0.3), hu("air")))  # frontal sinus
    S.append(_ellipsoid((0.0, -10.0, -15.0), (13.0, 14.0, 9.0), 700.0, amp=200.0))  # sphenoid body, sella
    S.append(_ellipsoid((0.0, -26.0, -12.0), (10.0, 8.0, 8.0) * p.f(0.2), hu("air")))  # sphenoid sinus
    for side in (1, -1):
        S.append(
            _tube(_mirror((55.0, 25.0, -22.0), side), _mirror((15.0, 0.0, -16.0), side), 7.0, hu=1350.0, amp=100.0)
        )  # petrous bone
        S.append(_ellipsoid(_mirror((50.0, 33.0, -28.0), side), (12.0, 12.0, 14.0), -150.0, amp=550.0))  # mastoid
        S.append(
            _tube(_mirror((48.0, 15.0, -15.0), side), _mirror((80.0, 16.0, -13.0), side), 3.5, hu=hu("air"))
        )  # external auditory canal

    # -- orbits: fat, extra-ocular muscles, eyelids
    for side in (1, -1):
        S.append(_ellipsoid(_mirror((31.0, -60.0, 0.0), side), (17.0, 25.0, 16.0), hu("orbit_fat"), amp=6.0))
        S.append(_ellipsoid(_mirror((31.0, -75.0, 0.0), side), (15.0, 9.0, 14.0), hu("skin"), amp=4.0))
        apex = _mirror((18.0, -28.0, 2.0), side)
        for off in ((11.0, 0.0), (-11.0, 0.0), (0.0, 11.0), (0.0, -11.0)):
            S.append(_tube(apex, _mirror((32.0 + off[0], -62.0, off[1]), side), 2.6, 2.0, hu=hu("muscle")))

    # -- airway, spine
    S.append(_zcyl((0.0, -22.0), (0.0, 0.06), (11.0, 7.0), -400.0, -30.0, hu("air")))  # pharynx/larynx/trachea
    # cord centre y(z): 17 at z=-55, drifting posterior to 26 (mm)
    cord_slope, cord_c0 = _CORD_SLOPE, _CORD_C0
    cz0, cz1 = -400.0, _CORD_ZREF

    def cord_y(z):
        return cord_c0[1] + cord_slope * (cz1 - z)

    S.append(_zcyl((0.0, cord_c0[1] - 23.0), (0.0, cord_slope), (14.0, 11.0), cz0, cz1, hu("disc"), amp=5.0))
    vert_len = 15.5 * rng.uniform(0.93, 1.07)
    z = -44.0
    while z > cz0:
        zb = z - vert_len
        S.append(
            _zcyl(
                (0.0, cord_y(z) - 23.0),
                (0.0, cord_slope),
                (14.0, 11.0),
                zb,
                z,
                0,
                amp=60.0,
                profile=_shell_profile(hu("cancellous"), hu("cortical") - 450, 0.85),
            )
        )
        S.append(
            _zcyl((0.0, cord_y(z)), (0.0, cord_slope), (16.0, 14.0), zb + 3.0, z - 2.0, hu("cortical") - 500, amp=80.0)
        )  # arch (canal painted next)
        ym, zm = cord_y(z), z - vert_len / 2
        S.append(_tube((0.0, ym + 12.0, zm), (0.0, ym + 36.0, zm - 8.0), 4.5, hu=hu("cortical") - 450, amp=60.0))
        for side in (1, -1):
            S.append(
                _tube((12.0 * side, ym - 8.0, zm), (28.0 * side, ym - 10.0, zm), 4.0, hu=hu("cortical") - 450, amp=60.0)
            )
        z = zb - 3.8  # disc
    S.append(_zcyl(cord_c0, (0.0, cord_slope), (10.0, 8.5), cz0, cz1, hu("csf")))  # spinal canal

    # -- teeth (upper and lower arch)
    for zt, yc in ((-56.0, -40.0), (-72.0, -36.0)):
        for th in np.linspace(-1.25, 1.25, 12):
            tx, ty = 34.0 * np.sin(th), yc - 38.0 * np.cos(th)
            dz = 4.5 if zt > -60 else -4.5
            S.append(_tube((tx, ty, zt - dz), (tx, ty, zt + dz), 3.6, hu=hu("tooth"), amp=150.0))
    return S


def _organs(p: _Params) -> list[_Shape]:
    """Organ shapes in paint order (low to high priority); label ids from core.organs."""
    hu_o = {k: v for k, v in p.hu_off.items() if k.startswith("o:")}

    def off(name):
        return float(hu_o["o:" + name])

    S: list[_Shape] = []
    f = p.f
    # parotids (12/13): fatty, lobular
    for side, lab in ((1, 12), (-1, 13)):
        S.append(
            _ellipsoid(
                _mirror((52.0, 14.0, -45.0), side),
                np.array([12.5, 20.0, 22.5]) * f(),
                26.0 + off("parotid"),
                amp=14.0,
                label=lab,
            )
        )
    # mandible (21 L / 22 R): tube chain with cortical rim, split at x = 0
    mand_hu = _shell_profile(360.0 + off("mandible"), 1400.0 + off("mandible"), 0.78)
    mscale = f(0.08)
    for side, lab in ((1, 21), (-1, 22)):

        def pts(*q, _s=side):
            return [np.array(_mirror(v, _s)) * mscale for v in q]

        chain = pts(
            (0.0, -78.0, -92.0), (22.0, -70.0, -90.0), (38.0, -42.0, -88.0), (45.0, 5.0, -85.0), (49.0, 2.0, -31.0)
        )
        alv = pts((0.0, -76.0, -82.0), (22.0, -68.0, -80.0), (38.0, -42.0, -78.0))
        cor = pts((44.0, -8.0, -70.0), (42.0, -16.0, -46.0))
        radii = (7.5, 7.0, 6.5, 6.0)
        parts = []
        for i in range(4):
            parts.append(_tube(chain[i], chain[i + 1], radii[i], radii[min(i + 1, 3)], hu=0, profile=mand_hu))
        for i in range(2):
            parts.append(_tube(alv[i], alv[i + 1], 5.5, 5.0, hu=0, profile=mand_hu))
        parts.append(_tube(cor[0], cor[1], 4.5, 3.5, hu=0, profile=mand_hu))

        def mand_fn(ax, ay, az, _parts=parts, _side=side):
            m = np.zeros(ax.shape, bool)
            v = np.zeros(ax.shape, np.float32)
            for s in _parts:
                mi, vi, _ = s.fn(ax, ay, az)
                v = np.where(mi & ~m, vi, v)
                m |= mi
            m &= (ax * _side) >= 0.0
            return m, v, 80.0

        lo = tuple(np.min([s.lo for s in parts], axis=0))
        hi = tuple(np.max([s.hi for s in parts], axis=0))
        S.append(_Shape(lo, hi, mand_fn, lab))

    # temporal lobes (9/10): label only, clipped to the brain
    brain = p.brain_region
    for side, lab in ((1, 9), (-1, 10)):
        S.append(
            _ellipsoid(
                _mirror((45.0, 0.0, 10.0), side), np.array([25.0, 45.0, 22.5]) * f(0.1), None, label=lab, clip=brain
            )
        )
    # brain stem (1): tapered cylinder r 13 -> 9
    bs = f()
    S.append(
        _tube(
            (0.0, 15.0, 15.0 * bs[2]),
            (0.0, 15.0, -55.0 * bs[2]),
            13.0 * bs[0],
            9.0 * bs[0],
            hu=30.0 + off("brain_stem"),
            amp=3.0,
            caps=False,
            label=1,
        )
    )
    # spinal cord (20): elliptic tube inside the canal
    S.append(
        _zcyl(
            _CORD_C0,
            (0.0, _CORD_SLOPE),
            np.array([6.5, 4.5]) * f(0.1)[:2],
            -400.0,
            -55.0 * bs[2] + 0.5,
            34.0 + off("spinal_cord"),
            amp=3.0,
            label=20,
            zref=_CORD_ZREF,
        )
    )
    # TM joints (18/19), middle ears (16/17), inner ears (14/15)
    for side, lab in ((1, 18), (-1, 19)):
        S.append(
            _ellipsoid(
                _mirror((50.0, 2.0, -24.0), side),
                np.array([8.0, 5.0, 6.0]) * f(),
                400.0 + off("tmj"),
                amp=60.0,
                label=lab,
            )
        )
    for side, lab in ((1, 16), (-1, 17)):
        S.append(
            _ellipsoid(
                _mirror((45.0, 15.0, -15.0), side),
                np.array([4.0, 6.0, 7.0]) * f(),
                -650.0 + off("mid_ear"),
                amp=250.0,
                label=lab,
            )
        )
    for side, lab in ((1, 14), (-1, 15)):
        S.append(
            _ellipsoid(
                _mirror((34.0, 15.0, -15.0), side),
                np.array([6.0, 5.0, 5.0]) * f(),
                1075.0 + off("inner_ear"),
                amp=60.0,
                label=lab,
            )
        )
    # pituitary (11)
    S.append(_ellipsoid((0.0, -5.0, -2.0), np.array([6.5, 5.0, 4.0]) * f(), 45.0 + off("pituitary"), amp=3.0, label=11))
    # optic nerves (6/7), then eyes (2/3) over their front ends, lenses (4/5), chiasm (8)
    eyes = {}
    for side in (1, -1):
        er = 13.0 * f(0.12)
        ec = np.array(_mirror((32.0, -65.0, 0.0), side))
        eyes[side] = (ec, er)
    for side, lab in ((1, 6), (-1, 7)):
        ec, er = eyes[side]
        S.append(
            _tube(
                ec + (0.0, er[1] - 2.0, 0.0),
                _mirror((8.0, -14.0, 4.0), side),
                2.2 * f(0.1)[0],
                hu=36.0 + off("optic"),
                amp=3.0,
                caps=False,
                label=lab,
            )
        )
    for side, lab in ((1, 2), (-1, 3)):
        ec, er = eyes[side]
        S.append(_ellipsoid(ec, er, 0, label=lab))
        v_vit, v_scl = 16.0 + off("eye"), 60.0 + off("eye")

        def eye_fn(ax, ay, az, _c=ec, _r=er, _vit=v_vit, _scl=v_scl):
            q = _ell_q(ax, ay, az, _c, _r)
            return q <= 1.0, np.where(q < 0.8, _vit, _scl).astype(np.float32), 3.0

        S[-1].fn = eye_fn
    for side, lab in ((1, 4), (-1, 5)):
        ec, er = eyes[side]
        lr = np.array([5.0, 2.3, 4.6]) * f(0.1)
        lc = ec - (0.0, er[1] - lr[1] - 1.5, 0.0)
        S.append(_ellipsoid(lc, lr, 95.0 + off("lens"), amp=3.0, label=lab))
    chi = f(0.1)
    ch_c = np.array([0.0, -10.0, 6.0])
    ch_parts = [_ellipsoid(ch_c, np.array([9.0, 5.5, 2.8]) * chi, 0)]
    for side in (1, -1):
        ch_parts.append(_tube(ch_c + (0.0, 2.0, 0.0), ch_c + (15.0 * side, 13.0, 0.0), 2.3 * chi[2], hu=0, caps=False))
    S.append(_union(ch_parts, 36.0 + off("optic"), amp=3.0, label=8))
    return S


# -------------------------------------------------------------------------------------------------
# Rendering.


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cz, sz = np.cos(yaw), np.sin(yaw)
    cx, sx = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rz @ rx @ ry


def _majority(sub: np.ndarray) -> np.ndarray:
    """(n, nsub, y, x) labels -> (n, y, x) majority over axis 1; ties go to the sub-slice nearest the centre."""
    nsub = sub.shape[1]
    centre = nsub // 2
    order = sorted(range(nsub), key=lambda s: (abs(s - centre), s))
    counts = [sum((sub[:, t] == sub[:, s]) for t in range(nsub)) for s in range(nsub)]
    best = sub[:, order[0]].copy()
    bestc = counts[order[0]].copy()
    for s in order[1:]:
        better = counts[s] > bestc
        best[better] = sub[:, s][better]
        bestc = np.maximum(bestc, counts[s])
    return best


def _unit_noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit std (float32)."""
    w = rng.standard_normal(size=shape, dtype=np.float32)
    n = ndimage.gaussian_filter(w, sigma=sigma, mode="wrap")
    sd = float(n.std())
    return n / np.float32(sd if sd > 0 else 1.0)


def make_case(*, seed: int, size: str = "small", case_id: str | None = None) -> Case:
    """Render one phantom case.

    seed: an int, or a sequence of ints (``write_phantom`` uses ``(seed, i)`` for case i); the same seed
    gives a bit-identical case. size: ``tiny`` | ``small`` | ``full`` (see the module docstring).
    Returns a :class:`Case` with image int16 HU (z, y, x) clipped to [-1024, 3071], label uint8 (z, y, x)
    with StructSeg ids 0..22, identity direction, and the grid centred in-plane on (0, 0).
    """
    if size not in SIZES:
        raise DataError(f"phantom size {size!r}: unknown, use one of {sorted(SIZES)}")
    spec = SIZES[size]
    seq = np.random.SeedSequence(list(seed) if isinstance(seed, (tuple, list)) else int(seed))
    rng = np.random.default_rng(seq)

    # --- grid
    sxy = spec.spacing_xy * rng.uniform(1 - spec.xy_jitter, 1 + spec.xy_jitter)
    sz = spec.spacing_z
    z_top = rng.uniform(*spec.z_top)
    z_bot = -rng.uniform(*spec.z_bottom)
    nz = int(round((z_top - z_bot) / sz)) + 1
    n = spec.n_xy
    origin = (-(n - 1) / 2 * sxy, -(n - 1) / 2 * sxy, z_bot)
    geom = Geometry(
        spacing=(sxy, sxy, sz), origin=origin, direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), shape=(nz, n, n)
    )

    # --- pose and per-case parameters
    rot = _rotation(*np.deg2rad([rng.uniform(-10, 10), rng.uniform(-2, 2), rng.uniform(-2, 2)]))
    scale = rng.uniform(0.9, 1.1)
    shift = np.array([rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(-5, 5)])
    keys = list(_HU) + [
        "o:" + k
        for k in (
            "parotid",
            "mandible",
            "brain_stem",
            "spinal_cord",
            "tmj",
            "mid_ear",
            "inner_ear",
            "pituitary",
            "optic",
            "eye",
            "lens",
        )
    ]
    offs = rng.uniform(-10, 10, size=len(keys))
    params = _Params(rng=rng, hu_off=dict(zip(keys, offs)))
    params.hu_off["air"] = 0.0
    context = _anatomy(params)
    # values the organs share with the context
    brain_shape = context[[i for i, s in enumerate(context) if s.fn.__name__ == "brain_fn"][0]]
    params.brain_region = _brain_clip(brain_shape)
    organs = _organs(params)
    noise_sd = rng.uniform(12.0, 18.0)
    noise_seed = rng.integers(0, 2**63)

    couch = _couch(scale, shift, rot)
    shapes = [couch] + context + organs

    # --- render on sub-slices, z-chunk by z-chunk
    nsub = spec.nsub
    xs = (origin[0] + sxy * np.arange(n)).astype(np.float32)
    ys = (origin[1] + sxy * np.arange(n)).astype(np.float32)
    zf_all = (z_bot + sz * (np.arange(nz)[:, None] + (np.arange(nsub)[None, :] + 0.5) / nsub - 0.5)).ravel()
    minv = rot.T / scale
    boxes = [_phys_box(s, rot, scale, shift) for s in shapes]

    hu_out = np.empty((nz, n, n), np.float32)
    amp_out = np.empty((nz, n, n), np.float32)
    lab_out = np.empty((nz, n, n), np.uint8)
    # anatomical coordinates are computed once per chunk on the in-plane box of all anatomy shapes
    anat_lo = np.min([b[0] for s, b in zip(shapes, boxes) if not s.physical], axis=0)
    anat_hi = np.max([b[1] for s, b in zip(shapes, boxes) if not s.physical], axis=0)
    IA, IB = _index_range(xs, anat_lo[0], anat_hi[0])
    JA, JB = _index_range(ys, anat_lo[1], anat_hi[1])
    m = minv.astype(np.float32)
    dx = (xs[IA:IB] - np.float32(shift[0]))[None, None, :]
    dy = (ys[JA:JB] - np.float32(shift[1]))[None, :, None]
    chunk = max(1, int(6_000_000 // (n * n * nsub)))
    for k0 in range(0, nz, chunk):
        k1 = min(nz, k0 + chunk)
        zf = zf_all[k0 * nsub : k1 * nsub].astype(np.float32)
        hu = np.full((zf.size, n, n), _HU["air"], np.float32)
        amp = np.zeros_like(hu)
        lab = np.zeros(hu.shape, np.uint8)
        dz = (zf - np.float32(shift[2]))[:, None, None]
        AX = m[0, 0] * dx + m[0, 1] * dy + m[0, 2] * dz
        AY = m[1, 0] * dx + m[1, 1] * dy + m[1, 2] * dz
        AZ = m[2, 0] * dx + m[2, 1] * dy + m[2, 2] * dz
        for s, (lo, hi) in zip(shapes, boxes):
            zi = np.nonzero((zf >= lo[2]) & (zf <= hi[2]))[0]
            if zi.size == 0:
                continue
            ka, kb = int(zi[0]), int(zi[-1]) + 1
            ia, ib = _index_range(xs, lo[0], hi[0])
            ja, jb = _index_range(ys, lo[1], hi[1])
            if s.physical:
                X, Y, Z = np.broadcast_arrays(
                    xs[ia:ib][None, None, :], ys[ja:jb][None, :, None], zf[ka:kb][:, None, None]
                )
                cx, cy, cz = X, Y, Z
            else:
                ia, ib, ja, jb = max(ia, IA), min(ib, IB), max(ja, JA), min(jb, JB)
                sub = (slice(ka, kb), slice(ja - JA, jb - JA), slice(ia - IA, ib - IA))
                cx, cy, cz = AX[sub], AY[sub], AZ[sub]
            if ia >= ib or ja >= jb:
                continue
            mask, val, a = s.fn(cx, cy, cz)
            if not mask.any():
                continue
            view = (slice(ka, kb), slice(ja, jb), slice(ia, ib))
            if val is not None:
                hv = hu[view]
                hv[mask] = val[mask] if np.ndim(val) else val
                av = amp[view]
                av[mask] = a[mask] if np.ndim(a) else a
            if s.label is not None:
                lab[view][mask] = s.label
        nk = k1 - k0
        hu_out[k0:k1] = hu.reshape(nk, nsub, n, n).mean(axis=1)
        amp_out[k0:k1] = amp.reshape(nk, nsub, n, n).mean(axis=1)
        lab_out[k0:k1] = _majority(lab.reshape(nk, nsub, n, n))

    # --- texture (1.5 mm correlation) and noise (about one voxel in-plane), both correlated
    nrng = np.random.default_rng(noise_seed)
    sig_tex = (0.6, 1.5 / sxy, 1.5 / sxy)
    hu_out += amp_out * _unit_noise(nrng, hu_out.shape, sig_tex)
    del amp_out
    hu_out += np.float32(noise_sd) * _unit_noise(nrng, hu_out.shape, (0.0, 0.9, 0.9))
    image = np.clip(np.rint(hu_out), HU_MIN, HU_MAX).astype(np.int16)
    cid = case_id if case_id is not None else f"phantom_{_seed_tag(seed)}"
    return Case(case_id=cid, image=image, label=lab_out, geometry=geom, sources=(f"phantom:{size}:seed={seed}",))


def _seed_tag(seed) -> str:
    return "_".join(str(int(s)) for s in seed) if isinstance(seed, (tuple, list)) else str(int(seed))


def _brain_clip(brain_shape: _Shape):
    def clip(ax, ay, az):
        m, v, _ = brain_shape.fn(ax, ay, az)
        return m & (az > _brain_floor(ay))

    return clip


def _couch(scale: float, shift: np.ndarray, rot: np.ndarray) -> _Shape:
    """Head cushion (foam) and carbon-fibre couch plate below the occiput, in physical coordinates."""
    y0 = 106.0 * scale + shift[1] + abs(rot[1, 0]) * 20.0 - 4.0  # just under the back of the head

    def fn(X, Y, Z):
        pad = (Y >= y0) & (Y < y0 + 12.0) & (np.abs(X) < 95.0)
        plate = (Y >= y0 + 12.0) & (Y < y0 + 22.0)
        skin = plate & ((Y < y0 + 13.5) | (Y >= y0 + 20.5))
        v = np.where(pad, np.float32(-900.0), np.float32(-350.0))
        v = np.where(skin, np.float32(350.0), v)
        return pad | plate, v, 10.0

    big = 1e4
    return _Shape((-big, y0, -big), (big, y0 + 22.0, big), fn, 0, physical=True)


def _phys_box(s: _Shape, rot, scale, shift):
    if s.physical:
        return np.asarray(s.lo, float), np.asarray(s.hi, float)
    lo, hi = np.asarray(s.lo, float), np.asarray(s.hi, float)
    corners = np.array(
        [[(lo, hi)[i][0], (lo, hi)[j][1], (lo, hi)[k][2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    )
    pts = shift + scale * corners @ rot.T
    pad = 0.5
    return pts.min(axis=0) - pad, pts.max(axis=0) + pad


def _index_range(coords: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    a = int(np.searchsorted(coords, lo, side="left"))
    b = int(np.searchsorted(coords, hi, side="right"))
    return a, b


# -------------------------------------------------------------------------------------------------
# Writing datasets.


def write_phantom(out, *, cases: int, seed: int, size: str = "small", format: str = "structseg") -> list[Path]:
    """Write ``cases`` phantom cases ``phantom_000``, ... into ``out``; case i uses seed ``(seed, i)``.

    format: ``structseg`` | ``pddca`` | ``hanseg`` | ``dicom``, written by ``sepnet.data.readers.write_case``
    as ``out/<case_id>/...``, which builds each case folder under a temporary name and renames it into place,
    so an interrupted run leaves no half-written case. Cases whose folder exists are skipped (not re-rendered).
    Returns the folders of all ``cases`` cases (written or already there). Raises DataError when ``out``
    cannot be written.
    """
    if format not in FORMATS:
        raise DataError(f"phantom format {format!r}: unknown, use one of {list(FORMATS)}")
    if size not in SIZES:
        raise DataError(f"phantom size {size!r}: unknown, use one of {sorted(SIZES)}")
    if cases < 0:
        raise DataError(f"phantom cases {cases}: must be >= 0")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise DataError(f"{out}: cannot write the phantom dataset here ({exc.strerror or exc})") from exc
    from sepnet.data.readers import write_case  # imported late: SimpleITK/pydicom load only when writing

    paths: list[Path] = []
    for i in range(cases):
        cid = f"phantom_{i:03d}"
        dest = out / cid
        if dest.exists():
            log.info("phantom: %s already present, skipped", dest)
            paths.append(dest)
            continue
        case = make_case(seed=(int(seed), i), size=size, case_id=cid)
        paths.append(Path(write_case(case, out, format=format)))
        log.info("phantom: wrote %s", paths[-1])
    return paths
