"""The context anatomy of a phantom case (internal to ``sepnet.data.phantom``): everything but the organs.

Shapes are written in the anatomical frame (mm from the eye-level midline, LPS axes: +x = patient left,
+y = posterior, +z = superior) and listed in paint order. Every random draw goes through ``Params.rng`` in
a fixed order, so the same generator state gives the same anatomy; reordering draws changes every case.
Positions are anatomical approximations, not measurements (docs/conventions.md, "Phantom").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sepnet.data.phantom_shapes import Shape, ell_q, ellipsoid, shell_profile, tube, zcyl

__all__ = [
    "TISSUE_HU",
    "ORGAN_HU_KEYS",
    "CORD_ZREF",
    "CORD_C0",
    "CORD_SLOPE",
    "Params",
    "mirror",
    "brain_floor",
    "context",
    "couch",
]

# Tissue HU before per-case offsets (docs/conventions.md, "Phantom").
TISSUE_HU = {
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
# organs with their own HU offset (``Params.organ_offset``)
ORGAN_HU_KEYS = (
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

# spinal cord centre (x, y) at z = CORD_ZREF, drifting posterior by CORD_SLOPE mm per mm downwards
CORD_ZREF = -50.0
CORD_C0 = (0.0, 16.6)
CORD_SLOPE = 0.08


@dataclass
class Params:
    """Per-case random state: the generator and the HU offsets (tissue names and ``o:<organ>`` keys)."""

    rng: np.random.Generator
    hu_off: dict[str, float]

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Params:
        """HU offsets uniform in [-10, 10] per tissue and organ (air stays at -1000)."""
        keys = list(TISSUE_HU) + ["o:" + k for k in ORGAN_HU_KEYS]
        offs = rng.uniform(-10, 10, size=len(keys))
        params = cls(rng=rng, hu_off=dict(zip(keys, offs)))
        params.hu_off["air"] = 0.0
        return params

    def f(self, spread: float = 0.15) -> np.ndarray:
        """Per-axis radius factors uniform in [1 - spread, 1 + spread]."""
        return self.rng.uniform(1.0 - spread, 1.0 + spread, size=3)

    def hu(self, name: str) -> float:
        """HU of a tissue of ``TISSUE_HU`` with this case's offset."""
        return float(TISSUE_HU[name] + self.hu_off[name])

    def organ_offset(self, name: str) -> float:
        """This case's HU offset of an organ of ``ORGAN_HU_KEYS``."""
        return float(self.hu_off["o:" + name])


def mirror(p, side: int):
    """Point p (x, y, z) on the patient's left (side 1) or mirrored to the right (side -1)."""
    return (p[0] * side, p[1], p[2])


def brain_floor(ay):
    """z (mm) of the cranial floor as a function of y: posterior fossa -48, middle fossa -18, above orbits +16."""
    return -48.0 + 30.0 / (1.0 + np.exp((ay - 20.0) / 3.0)) + 34.0 / (1.0 + np.exp((ay + 50.0) / 3.0))


def context(p: Params) -> tuple[list[Shape], Callable]:
    """Context shapes in paint order, and ``brain(ax, ay, az) -> bool``, the brain above the cranial floor."""
    cran_c, cran_r = np.array([0.0, 8.0, 15.0]), np.array([76.0, 96.0, 95.0]) * p.rng.uniform(0.97, 1.03, 3)
    shapes = _head_surface(p, cran_c, cran_r)
    shapes += _neck_and_face_soft_tissue(p)
    skull, in_r = _skull(p, cran_c, cran_r)
    shapes.append(skull)
    shapes += _brain(p, cran_c, in_r)
    shapes += _face_bones(p)
    shapes += _orbits(p)
    shapes += _airway_and_spine(p)
    shapes += _teeth(p)

    def brain(ax, ay, az):
        return (np.sqrt(ell_q(ax, ay, az, cran_c, in_r)) <= 1.0) & (az > brain_floor(ay))

    return shapes, brain


def _head_surface(p: Params, cran_c, cran_r) -> list[Shape]:
    """Skin, subcutaneous fat and deep soft tissue of cranium, face, chin, nose and neck; the pinnae."""
    parts = [
        ((0.0, -30.0, -50.0), (58.0, 62.0, 50.0)),  # face and jaw
        ((0.0, -66.0, -92.0), (32.0, 22.0, 14.0)),  # chin
        ((0.0, -88.0, -22.0), (11.0, 14.0, 22.0)),  # nose
    ]
    neck_r = np.array([54.0, 58.0]) * p.rng.uniform(0.95, 1.05, 2)
    depths = (0.0, 2.0, 8.0 + p.rng.uniform(-1.5, 1.5))
    S = [_layered_head(cran_c, cran_r, parts, neck_r, depths, (p.hu("skin"), p.hu("fat"), p.hu("muscle")))]
    for side in (1, -1):  # pinna (cartilage) and ear canal opening
        S.append(ellipsoid(mirror((74.0, 18.0, -12.0), side), (5.0, 14.0, 28.0), p.hu("cartilage"), amp=5.0))
    return S


def _layered_head(cran_c, cran_r, parts, neck_r, depths, values) -> Shape:
    """Skin / subcutaneous fat / deep soft tissue of the union of the head parts (centre, radii) and the neck.

    Layer k covers the points deeper than depths[k] mm, with depth approximated per part as
    (1 - normalised radius) * mean radius (exact for spheres, within ~15 % on these ellipsoids), which costs
    one evaluation per part instead of one per part and layer.
    """
    ells = [(np.asarray(cran_c, float), np.asarray(cran_r, float))]
    ells += [(np.asarray(c, float), np.asarray(r, float)) for c, r in parts]
    vals = np.asarray([TISSUE_HU["air"], *values], np.float32)
    nr = np.asarray(neck_r, float)

    def fn(ax, ay, az):
        level = np.zeros(ax.shape, np.int8)
        for i, (c, r) in enumerate(ells):
            rm = float(np.mean(r))
            depth = (1.0 - np.sqrt(ell_q(ax, ay, az, c, r))) * rm
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
    return Shape(tuple(lo), tuple(hi), fn)


def _neck_and_face_soft_tissue(p: Params) -> list[Shape]:
    hu = p.hu
    S = [
        ellipsoid((0.0, -45.0, -72.0), (25.0, 30.0, 15.0), hu("muscle") + 8, amp=4.0),  # tongue
        ellipsoid((0.0, -52.0, -63.0), (16.0, 18.0, 2.5), hu("air")),  # air above the tongue
    ]
    for side in (1, -1):
        S.append(ellipsoid(mirror((50.0, -12.0, -62.0), side), (8.0, 18.0, 22.0), hu("muscle") + 5, amp=4.0))
        S.append(ellipsoid(mirror((24.0, -8.0, -55.0), side), (6.0, 10.0, 15.0), hu("fat"), amp=8.0))
        S.append(ellipsoid(mirror((30.0, -30.0, -97.0), side), (10.0, 12.0, 9.0), hu("gland"), amp=6.0))
        S.append(ellipsoid(mirror((15.0, -32.0, -175.0), side), (8.0, 10.0, 22.0), hu("thyroid"), amp=8.0))
        S.append(ellipsoid(mirror((30.0, 45.0, -140.0), side), (9.0, 7.0, 70.0), hu("fat"), amp=8.0))
    return S


def _skull(p: Params, cran_c, cran_r) -> tuple[Shape, np.ndarray]:
    """Skull vault (tables and diploe) with the skull base inside it; returns it and the inner radii (mm)."""
    sk_r = cran_r - 6.0  # the scalp is ~6 mm thick
    sk_thick = 7.0 * p.rng.uniform(0.85, 1.15)
    r_eff = float(np.mean(sk_r))
    t_table, t_diploe, t_base, t_soft = p.hu("table"), p.hu("diploe"), p.hu("skull_base"), p.hu("muscle")

    def skull_fn(ax, ay, az):
        rho = np.sqrt(ell_q(ax, ay, az, cran_c, sk_r))
        depth = (1.0 - rho) * r_eff
        # the vault reaches lower at the back (occiput) than at the sides (temporal bone) and the face
        zcut = np.where(ay > 20.0, -53.0, np.where(ay > -40.0, -28.0, -8.0))
        m = (rho <= 1.0) & (az > zcut)
        v = np.where(depth < 1.8, t_table, np.where(depth < sk_thick - 2.0, t_diploe, t_table))
        # inside the vault: a bony skull base just under the cranial floor, soft tissue further down
        base = az > brain_floor(ay) - 5.0
        v = np.where(depth >= sk_thick, np.where(base, t_base, t_soft), v).astype(np.float32)
        amp = np.where(depth < sk_thick, 120.0, np.where(base, 250.0, 4.0)).astype(np.float32)
        return m, v, amp

    return Shape(tuple(cran_c - sk_r), tuple(cran_c + sk_r), skull_fn), sk_r - sk_thick


def _brain(p: Params, cran_c, in_r) -> list[Shape]:
    """Brain (white matter, grey matter, sulci as a random-wave field), deep grey matter, ventricles, cisterns."""
    rng = p.rng
    kvec = rng.normal(size=(6, 3))
    kvec *= (2 * np.pi / rng.uniform(14.0, 24.0, size=(6, 1))) / np.linalg.norm(kvec, axis=1, keepdims=True)
    phase = rng.uniform(0, 2 * np.pi, size=6)
    wm, gm, csf, cort = p.hu("wm"), p.hu("gm"), p.hu("csf"), p.hu("cortical")

    def brain_fn(ax, ay, az):
        rho = np.sqrt(ell_q(ax, ay, az, cran_c, in_r))
        floor = brain_floor(ay)
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

    S = [Shape(tuple(cran_c - in_r), tuple(cran_c + in_r), brain_fn)]
    for side in (1, -1):
        S.append(ellipsoid(mirror((18.0, 0.0, 18.0), side), (9.0, 16.0, 10.0), gm - 2, amp=3.0))  # deep GM
        S.append(ellipsoid(mirror((9.0, -2.0, 32.0), side), (5.0, 26.0, 9.0) * p.f(0.2), csf))  # lat. ventricle
    S.append(ellipsoid((0.0, 8.0, 12.0), (2.0, 9.0, 7.0), csf))  # third ventricle
    S.append(ellipsoid((0.0, 33.0, -26.0), (6.0, 4.0, 7.0), csf))  # fourth ventricle
    S.append(ellipsoid((0.0, -8.0, 7.0), (15.0, 11.0, 5.0), csf))  # suprasellar cistern
    S.append(tube((0.0, 15.0, 17.0), (0.0, 15.0, -58.0), 16.0, 12.0, hu=csf, caps=False))  # prepontine cistern
    return S


def _face_bones(p: Params) -> list[Shape]:
    """Maxillae and sinuses, palate, nasal cavity, sphenoid, petrous bones, mastoids, ear canals."""
    hu = p.hu
    S: list[Shape] = []
    for side in (1, -1):
        c = mirror((24.0, -52.0, -30.0), side)
        r = np.array([15.0, 18.0, 16.0]) * p.f(0.15)
        S.append(ellipsoid(c, r + 2.0, hu("cortical") - 150, amp=100.0))  # maxilla wall
        S.append(ellipsoid(c, r, hu("air")))  # maxillary sinus
    S.append(ellipsoid((0.0, -55.0, -48.0), (20.0, 26.0, 2.5), hu("cortical") - 400, amp=100.0))  # hard palate
    S.append(ellipsoid((0.0, -60.0, 0.0), (9.0, 18.0, 11.0), -550.0, amp=350.0))  # ethmoid air cells
    S.append(ellipsoid((0.0, -60.0, -24.0), (11.0, 28.0, 18.0), hu("air")))  # nasal cavity
    for side in (1, -1):
        S.append(ellipsoid(mirror((7.0, -58.0, -27.0), side), (3.0, 22.0, 4.0), hu("skin"), amp=8.0))  # turbinate
    S.append(ellipsoid((0.0, -25.0, -32.0), (14.0, 12.0, 9.0), hu("air")))  # nasopharynx
    S.append(ellipsoid((0.0, -80.0, 32.0), (11.0, 4.0, 8.0) * p.f(0.3), hu("air")))  # frontal sinus
    S.append(ellipsoid((0.0, -10.0, -15.0), (13.0, 14.0, 9.0), 700.0, amp=200.0))  # sphenoid body, sella
    S.append(ellipsoid((0.0, -26.0, -12.0), (10.0, 8.0, 8.0) * p.f(0.2), hu("air")))  # sphenoid sinus
    for side in (1, -1):
        S.append(tube(mirror((55.0, 25.0, -22.0), side), mirror((15.0, 0.0, -16.0), side), 7.0, hu=1350.0, amp=100.0))
        S.append(ellipsoid(mirror((50.0, 33.0, -28.0), side), (12.0, 12.0, 14.0), -150.0, amp=550.0))  # mastoid
        S.append(tube(mirror((48.0, 15.0, -15.0), side), mirror((80.0, 16.0, -13.0), side), 3.5, hu=hu("air")))
    return S


def _orbits(p: Params) -> list[Shape]:
    """Orbital fat, eyelids and the four recti from the orbital apex."""
    S: list[Shape] = []
    for side in (1, -1):
        S.append(ellipsoid(mirror((31.0, -60.0, 0.0), side), (17.0, 25.0, 16.0), p.hu("orbit_fat"), amp=6.0))
        S.append(ellipsoid(mirror((31.0, -75.0, 0.0), side), (15.0, 9.0, 14.0), p.hu("skin"), amp=4.0))
        apex = mirror((18.0, -28.0, 2.0), side)
        for off in ((11.0, 0.0), (-11.0, 0.0), (0.0, 11.0), (0.0, -11.0)):
            S.append(tube(apex, mirror((32.0 + off[0], -62.0, off[1]), side), 2.6, 2.0, hu=p.hu("muscle")))
    return S


def _airway_and_spine(p: Params) -> list[Shape]:
    """Pharynx to trachea, then the cervical spine (bodies, discs, arches, processes) and the spinal canal."""
    hu = p.hu
    S = [zcyl((0.0, -22.0), (0.0, 0.06), (11.0, 7.0), -400.0, -30.0, hu("air"))]
    cz0, cz1 = -400.0, CORD_ZREF

    def cord_y(z):
        return CORD_C0[1] + CORD_SLOPE * (cz1 - z)

    S.append(zcyl((0.0, CORD_C0[1] - 23.0), (0.0, CORD_SLOPE), (14.0, 11.0), cz0, cz1, hu("disc"), amp=5.0))
    vert_len = 15.5 * p.rng.uniform(0.93, 1.07)
    body_hu = shell_profile(hu("cancellous"), hu("cortical") - 450, 0.85)
    z = -44.0
    while z > cz0:
        zb = z - vert_len
        S.append(zcyl((0.0, cord_y(z) - 23.0), (0.0, CORD_SLOPE), (14.0, 11.0), zb, z, 0, amp=60.0, profile=body_hu))
        arch_hu = hu("cortical") - 500
        S.append(zcyl((0.0, cord_y(z)), (0.0, CORD_SLOPE), (16.0, 14.0), zb + 3.0, z - 2.0, arch_hu, amp=80.0))
        ym, zm = cord_y(z), z - vert_len / 2
        S.append(tube((0.0, ym + 12.0, zm), (0.0, ym + 36.0, zm - 8.0), 4.5, hu=hu("cortical") - 450, amp=60.0))
        for side in (1, -1):
            S.append(
                tube((12.0 * side, ym - 8.0, zm), (28.0 * side, ym - 10.0, zm), 4.0, hu=hu("cortical") - 450, amp=60.0)
            )
        z = zb - 3.8  # disc
    S.append(zcyl(CORD_C0, (0.0, CORD_SLOPE), (10.0, 8.5), cz0, cz1, hu("csf")))  # spinal canal, painted last
    return S


def _teeth(p: Params) -> list[Shape]:
    """Twelve teeth per arch (upper, lower)."""
    S: list[Shape] = []
    for zt, yc in ((-56.0, -40.0), (-72.0, -36.0)):
        for th in np.linspace(-1.25, 1.25, 12):
            tx, ty = 34.0 * np.sin(th), yc - 38.0 * np.cos(th)
            dz = 4.5 if zt > -60 else -4.5
            S.append(tube((tx, ty, zt - dz), (tx, ty, zt + dz), 3.6, hu=p.hu("tooth"), amp=150.0))
    return S


def couch(*, scale: float, shift: np.ndarray, rot: np.ndarray) -> Shape:
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
    return Shape((-big, y0, -big), (big, y0 + 22.0, big), fn, 0, physical=True)
