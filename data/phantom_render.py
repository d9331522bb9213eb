"""Rendering of phantom shapes onto a CT grid (internal to ``sepnet.data.phantom``).

A case maps the anatomical frame to physical LPS space by ``P = shift + scale * rot @ A``. The scene is
rendered on ``nsub`` sub-slices per slice: HU and texture amplitude are averaged over each slab (partial
volume along z), labels take the majority over the slab. Shapes are evaluated only on the voxels of their
own bounding box, in z-chunks, and painted in list order, so each voxel has exactly one label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sepnet.data.phantom_shapes import Shape

__all__ = ["Pose", "rotation", "render", "add_texture_and_noise"]

_CHUNK_VOXELS = 6_000_000  # sub-slice voxels per z-chunk: bounds the float32 work arrays to ~100 MB


@dataclass(frozen=True)
class Pose:
    """Anatomical -> physical map ``P = shift + scale * rot @ A``: rot (3, 3), scale, shift (3,) mm."""

    rot: np.ndarray
    scale: float
    shift: np.ndarray


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """(3, 3) rotation Rz(yaw) @ Rx(pitch) @ Ry(roll), angles in radians."""
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


def _phys_box(s: Shape, pose: Pose):
    """Physical (x, y, z) bounding box of a shape, padded by 0.5 mm."""
    if s.physical:
        return np.asarray(s.lo, float), np.asarray(s.hi, float)
    lo, hi = np.asarray(s.lo, float), np.asarray(s.hi, float)
    corners = np.array(
        [[(lo, hi)[i][0], (lo, hi)[j][1], (lo, hi)[k][2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    )
    pts = pose.shift + pose.scale * corners @ pose.rot.T
    pad = 0.5
    return pts.min(axis=0) - pad, pts.max(axis=0) + pad


def _index_range(coords: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    """Index range [a, b) of the sorted ``coords`` that lie in [lo, hi]."""
    a = int(np.searchsorted(coords, lo, side="left"))
    b = int(np.searchsorted(coords, hi, side="right"))
    return a, b


def render(shapes: list[Shape], *, xs, ys, zf_all, nsub: int, pose: Pose, background: float):
    """Paint ``shapes`` in order on the grid of voxel centres ``xs`` (x), ``ys`` (y) and sub-slice centres
    ``zf_all`` (z, ``nsub`` per slice, slice-major), all physical mm, over ``background`` HU.

    Returns (hu, amp, label): hu and texture amplitude float32 (z, y, x), averaged over each slab, and
    label uint8 (z, y, x), the majority over the slab.
    """
    n_y, n_x, nz = len(ys), len(xs), len(zf_all) // nsub
    boxes = [_phys_box(s, pose) for s in shapes]
    hu_out = np.empty((nz, n_y, n_x), np.float32)
    amp_out = np.empty((nz, n_y, n_x), np.float32)
    lab_out = np.empty((nz, n_y, n_x), np.uint8)
    # anatomical coordinates are computed once per chunk on the in-plane box of all anatomy shapes
    anat_lo = np.min([b[0] for s, b in zip(shapes, boxes) if not s.physical], axis=0)
    anat_hi = np.max([b[1] for s, b in zip(shapes, boxes) if not s.physical], axis=0)
    anat_x = _index_range(xs, anat_lo[0], anat_hi[0])
    anat_y = _index_range(ys, anat_lo[1], anat_hi[1])
    chunk = max(1, int(_CHUNK_VOXELS // (n_y * n_x * nsub)))
    for k0 in range(0, nz, chunk):
        k1 = min(nz, k0 + chunk)
        zf = zf_all[k0 * nsub : k1 * nsub].astype(np.float32)
        hu = np.full((zf.size, n_y, n_x), background, np.float32)
        amp = np.zeros_like(hu)
        lab = np.zeros(hu.shape, np.uint8)
        anat = _anatomical_coords(xs, ys, zf, anat_x, anat_y, pose)
        for s, box in zip(shapes, boxes):
            _paint(s, box, hu, amp, lab, xs=xs, ys=ys, zf=zf, anat=anat, anat_x=anat_x, anat_y=anat_y)
        nk = k1 - k0
        hu_out[k0:k1] = hu.reshape(nk, nsub, n_y, n_x).mean(axis=1)
        amp_out[k0:k1] = amp.reshape(nk, nsub, n_y, n_x).mean(axis=1)
        lab_out[k0:k1] = _majority(lab.reshape(nk, nsub, n_y, n_x))
    return hu_out, amp_out, lab_out


def _anatomical_coords(xs, ys, zf, anat_x, anat_y, pose: Pose):
    """Anatomical (AX, AY, AZ) float32 of the sub-slices ``zf`` on the in-plane index box anat_y x anat_x."""
    m = (pose.rot.T / pose.scale).astype(np.float32)
    shift = pose.shift
    dx = (xs[anat_x[0] : anat_x[1]] - np.float32(shift[0]))[None, None, :]
    dy = (ys[anat_y[0] : anat_y[1]] - np.float32(shift[1]))[None, :, None]
    dz = (zf - np.float32(shift[2]))[:, None, None]
    AX = m[0, 0] * dx + m[0, 1] * dy + m[0, 2] * dz
    AY = m[1, 0] * dx + m[1, 1] * dy + m[1, 2] * dz
    AZ = m[2, 0] * dx + m[2, 1] * dy + m[2, 2] * dz
    return AX, AY, AZ


def _paint(s: Shape, box, hu, amp, lab, *, xs, ys, zf, anat, anat_x, anat_y) -> None:
    """Paint one shape into the chunk arrays hu, amp, lab (sub-slices zf), in place, within its box."""
    lo, hi = box
    zi = np.nonzero((zf >= lo[2]) & (zf <= hi[2]))[0]
    if zi.size == 0:
        return
    ka, kb = int(zi[0]), int(zi[-1]) + 1
    ia, ib = _index_range(xs, lo[0], hi[0])
    ja, jb = _index_range(ys, lo[1], hi[1])
    if s.physical:
        cx, cy, cz = np.broadcast_arrays(xs[ia:ib][None, None, :], ys[ja:jb][None, :, None], zf[ka:kb][:, None, None])
    else:
        (IA, IB), (JA, JB) = anat_x, anat_y
        ia, ib, ja, jb = max(ia, IA), min(ib, IB), max(ja, JA), min(jb, JB)
        sub = (slice(ka, kb), slice(ja - JA, jb - JA), slice(ia - IA, ib - IA))
        cx, cy, cz = (a[sub] for a in anat)
    if ia >= ib or ja >= jb:
        return
    mask, val, a = s.fn(cx, cy, cz)
    if not mask.any():
        return
    view = (slice(ka, kb), slice(ja, jb), slice(ia, ib))
    if val is not None:
        hv = hu[view]
        hv[mask] = val[mask] if np.ndim(val) else val
        av = amp[view]
        av[mask] = a[mask] if np.ndim(a) else a
    if s.label is not None:
        lab[view][mask] = s.label


def add_texture_and_noise(hu: np.ndarray, amp: np.ndarray, *, noise_sd: float, seed: int, spacing_xy: float):
    """Add a correlated tissue texture (``amp`` HU, 1.5 mm correlation) and correlated noise (``noise_sd`` HU,
    about one voxel in-plane) to ``hu`` in place; both from one generator seeded with ``seed``. Returns hu.
    """
    nrng = np.random.default_rng(seed)
    sig_tex = (0.6, 1.5 / spacing_xy, 1.5 / spacing_xy)
    hu += amp * _unit_noise(nrng, hu.shape, sig_tex)
    hu += np.float32(noise_sd) * _unit_noise(nrng, hu.shape, (0.0, 0.9, 0.9))
    return hu
