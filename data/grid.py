"""Geometry of a stored case: the centre crop, resampling, and the two directions between the original
image and the stored grid (``crop_like`` forward, ``to_original`` back). ``CaseMeta`` carries what both
directions need.

Arrays are (z, y, x); ``Geometry`` spacing/origin are (x, y, z) mm (see ``sepnet.data.case``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sepnet.core.errors import DataError
from sepnet.data.case import Geometry

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class CaseMeta:
    """What is needed to map stored arrays back to the original image.

    geometry: the original image geometry (shape (z, y, x) in voxels, spacing/origin (x, y, z) mm).
    grid: the geometry of the full volume after optional resampling and before the crop (equal to
        ``geometry`` when not resampled).
    crop_box: ((z0, z1), (y0, y1), (x0, x1)) half-open voxel ranges in ``grid``.
    spacing_zyx: stored voxel spacing (mm), array order.
    stored_shape: (z, y, x) of the stored arrays.
    annotated, source_hash, stats: store bookkeeping (empty for a case prepared for prediction).
    """

    case_id: str
    channels: tuple[str, ...]
    geometry: Geometry
    grid: Geometry
    crop_box: Box
    spacing_zyx: tuple[float, float, float]
    stored_shape: tuple[int, int, int]
    annotated: tuple[int, ...] = ()
    source_hash: str = ""
    stats: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def original_shape(self) -> tuple[int, int, int]:
        return tuple(self.geometry.shape)

    @property
    def resampled(self) -> bool:
        return not self.grid.same_grid(self.geometry)

    @property
    def present(self) -> tuple[int, ...]:
        """Organ ids (>= 1) with at least one voxel in the stored label."""
        counts = self.stats.get("stored_voxels", {})
        return tuple(sorted(int(k) for k, v in counts.items() if int(k) > 0 and v > 0))


def centre_crop_box(shape: Sequence[int], crop: Sequence[int] | None) -> Box:
    """Half-open ranges ((0, Z), (y0, y1), (x0, x1)) of the in-plane centre crop ``crop`` = (cy, cx) voxels.

    An axis no larger than its crop is kept whole (padding is the sampler's job); ``crop=None`` keeps all.
    """
    z, y, x = (int(s) for s in shape)
    box = [(0, z)]
    for n, c in zip((y, x), crop if crop is not None else (None, None)):
        if c is None or n <= int(c):
            box.append((0, n))
        else:
            s = (n - int(c)) // 2
            box.append((s, s + int(c)))
    return tuple(box)  # type: ignore[return-value]


def _sitk_image(array: np.ndarray, geom: Geometry):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in geom.spacing))
    img.SetOrigin(tuple(float(o) for o in geom.origin))
    img.SetDirection(tuple(float(d) for d in geom.direction))
    return img


def resampled_grid(geom: Geometry, spacing_zyx: Sequence[float]) -> Geometry:
    """Geometry covering the same physical extent as ``geom`` at ``spacing_zyx`` (mm), same origin/direction."""
    new_xyz = (float(spacing_zyx[2]), float(spacing_zyx[1]), float(spacing_zyx[0]))
    old_zyx = geom.spacing_zyx
    shape = tuple(
        max(1, int(round(n * o / s))) for n, o, s in zip(geom.shape, old_zyx, (new_xyz[2], new_xyz[1], new_xyz[0]))
    )
    return Geometry(spacing=new_xyz, origin=tuple(geom.origin), direction=tuple(geom.direction), shape=shape)


def resample(array: np.ndarray, src: Geometry, dst: Geometry, *, order: int, fill: float = 0) -> np.ndarray:
    """Resample a (Z, Y, X) array from grid ``src`` to grid ``dst`` with SimpleITK.

    order 0 = nearest neighbour (labels), 1 = linear (HU, probabilities). Output dtype: the input's for
    order 0, float32 for order 1. Points outside ``src`` get ``fill``.
    """
    import SimpleITK as sitk

    if order not in (0, 1):
        raise ValueError(f"resample: order must be 0 (nearest) or 1 (linear), got {order}")
    a = np.asarray(array)
    if order == 1:
        a = a.astype(np.float32, copy=False)
    ref = sitk.Image([int(s) for s in reversed(dst.shape)], sitk.sitkUInt8)
    ref.SetSpacing(tuple(float(s) for s in dst.spacing))
    ref.SetOrigin(tuple(float(o) for o in dst.origin))
    ref.SetDirection(tuple(float(d) for d in dst.direction))
    interp = sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear
    out = sitk.Resample(_sitk_image(a, src), ref, sitk.Transform(), interp, float(fill))
    return sitk.GetArrayFromImage(out)


def to_original(array: np.ndarray, meta: CaseMeta, *, order: int = 0, fill: float = 0) -> np.ndarray:
    """Map an array (..., Z, Y, X) on the stored grid back to the original image geometry.

    Undoes the crop by pasting into a ``fill`` array of the (resampled) full grid, then, if the case was
    resampled, resamples to the original grid (``order`` 0 = nearest for labels, 1 = linear for
    probabilities/intensities). Returns (..., *meta.original_shape) with the input dtype (float32 for
    resampled order-1 output).
    """
    a = np.asarray(array)
    if tuple(a.shape[-3:]) != tuple(meta.stored_shape):
        raise DataError(
            f"to_original: case {meta.case_id!r} array has spatial shape {a.shape[-3:]}, stored shape is "
            f"{meta.stored_shape}"
        )
    lead = a.shape[:-3]
    full = np.full(lead + tuple(meta.grid.shape), fill, dtype=a.dtype)
    (z0, z1), (y0, y1), (x0, x1) = meta.crop_box
    full[..., z0:z1, y0:y1, x0:x1] = a
    if not meta.resampled:
        return full
    flat = full.reshape((-1,) + tuple(meta.grid.shape))
    out = [resample(v, meta.grid, meta.geometry, order=order, fill=fill) for v in flat]
    return np.stack(out).reshape(lead + tuple(meta.geometry.shape))


def crop_like(array: np.ndarray, meta: CaseMeta, *, order: int = 1, fill: float = 0) -> np.ndarray:
    """Forward direction: an array (..., Z, Y, X) in the original geometry -> the stored grid.

    Resamples (``order`` 1 = linear for HU/intensities, 0 = nearest for labels; points outside the
    original image get ``fill``, e.g. -1024 for HU) if the case was resampled, then applies the crop box.
    Used by predict for new images.
    """
    a = np.asarray(array)
    if tuple(a.shape[-3:]) != tuple(meta.original_shape):
        raise DataError(
            f"crop_like: case {meta.case_id!r} array has spatial shape {a.shape[-3:]}, original shape is "
            f"{meta.original_shape}"
        )
    if meta.resampled:
        lead = a.shape[:-3]
        flat = a.reshape((-1,) + tuple(meta.original_shape))
        a = np.stack([resample(v, meta.geometry, meta.grid, order=order, fill=fill) for v in flat])
        a = a.reshape(lead + tuple(meta.grid.shape))
    (z0, z1), (y0, y1), (x0, x1) = meta.crop_box
    return a[..., z0:z1, y0:y1, x0:x1]

