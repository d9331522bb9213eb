"""Labels onto the image grid: the label-grid policy, label and mask files, masks painted into one label map.

Arrays are never compared blindly; a label file's grid is related to the image's by physical coordinates
(:func:`align_to`, rules in docs/conventions.md, "Input validation"):

- same voxels (StructSeg ``label.nii.gz``, PDDCA ``structures/*.nrrd``): the image's voxel centres,
  possibly in another axis order/direction, reordered exactly; fewer slices, a crop or another spacing is
  a DataError (missing slices are not background).
- cropped (HaN-Seg ``.seg.nrrd``, Slicer stores the segment's bounding box): a sub- or super-grid on the
  image's voxel lattice, placed by physical coordinates; labelled voxels outside the image, or a grid off
  the lattice, are a DataError.

Separate binary masks are painted largest organ first (:func:`paint`), so where masks overlap the smaller
organ wins; a whole mandible is split left/right by :func:`sepnet.data.organ_maps.split_mandible`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sepnet.core.errors import DataError
from sepnet.data.case import Geometry
from sepnet.data.organ_maps import MANDIBLE, split_mandible
from sepnet.data.validation import label_values
from sepnet.data.volume_io import read_volume, to_sitk


def _grid_map(src: Geometry, dst: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Affine map of continuous (x, y, z) indices src -> dst: dst_idx = M @ src_idx + t."""
    a_src = src.direction_matrix() * np.asarray(src.spacing)  # columns scaled by spacing
    a_dst = dst.direction_matrix() * np.asarray(dst.spacing)
    inv = np.linalg.inv(a_dst)
    return inv @ a_src, inv @ (np.asarray(src.origin) - np.asarray(dst.origin))


def is_alignable(src: Geometry, dst: Geometry, *, tol_matrix: float = 1e-3, tol_shift: float = 0.05) -> bool:
    """True when src voxel centres are dst voxel centres up to an axis permutation/flip and an integer shift."""
    m, t = _grid_map(src, dst)
    r = np.rint(m)
    perm = np.all(np.abs(r).sum(axis=0) == 1) and np.all(np.abs(r).sum(axis=1) == 1)
    return bool(perm and np.abs(m - r).max() < tol_matrix and np.abs(t - np.rint(t)).max() < tol_shift)


def same_voxels(src: Geometry, dst: Geometry) -> bool:
    """True when src and dst hold the same voxel centres, possibly in another axis order/direction
    (``is_alignable`` and the src index box maps exactly onto the dst index box)."""
    if not is_alignable(src, dst):
        return False
    m, t = _grid_map(src, dst)
    n_src = np.asarray(src.shape[::-1], dtype=float) - 1  # (x, y, z)
    corners = np.asarray(np.meshgrid(*[(0.0, n) for n in n_src], indexing="ij")).reshape(3, -1)
    idx = np.rint(m @ corners + t[:, None])
    return bool(np.all(idx.min(axis=1) == 0) and np.all(idx.max(axis=1) == np.asarray(dst.shape[::-1]) - 1))


def _grid_text(g: Geometry) -> str:
    return f"shape {g.shape}, spacing {np.round(g.spacing, 4).tolist()}, origin {np.round(g.origin, 3).tolist()}"


def align_to(
    arr: np.ndarray, g: Geometry, ref: Geometry, *, path: Path, ref_path: Path | str, cropped: bool = False
) -> np.ndarray:
    """uint8 array ``arr`` on grid ``g`` -> on grid ``ref`` (the image grid), by the label-grid policy.

    cropped=False (StructSeg, PDDCA): the label must hold the image's voxels (same grid, or the same voxel
    centres in another axis order/direction); anything else (fewer slices, a crop, other spacing) is a
    DataError. cropped=True (HaN-Seg ``.seg.nrrd``): a sub- or super-grid on the image's voxel lattice is
    placed by physical coordinates; labelled voxels outside the image are a DataError.
    """
    if g.same_grid(ref):
        return arr
    if not is_alignable(g, ref):
        raise DataError(
            f"{path}: grid ({_grid_text(g)}) does not match image {ref_path} ({_grid_text(ref)}) and is not a "
            "permutation/flip/sub-grid of it"
        )
    if not cropped and not same_voxels(g, ref):
        raise DataError(
            f"{path}: grid ({_grid_text(g)}) differs from image {ref_path} ({_grid_text(ref)}); "
            "this format keeps labels on the image grid"
        )
    src = to_sitk(arr.astype(np.uint8), g)
    ref_img = sitk.Image([int(v) for v in reversed(ref.shape)], sitk.sitkUInt8)
    ref_img.SetSpacing(ref.spacing)
    ref_img.SetOrigin(ref.origin)
    ref_img.SetDirection(ref.direction)
    out = sitk.GetArrayFromImage(sitk.Resample(src, ref_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    if np.count_nonzero(out) != np.count_nonzero(arr):
        lost = np.count_nonzero(arr) - np.count_nonzero(out)
        raise DataError(f"{path}: {lost} labelled voxels lie outside the image {ref_path}")
    return out.astype(np.uint8)


def read_label(path: Path, ref: Geometry, ref_path: Path) -> np.ndarray:
    """A StructSeg label-map file -> uint8 ids (z, y, x) on the image grid ``ref`` (same-voxels policy)."""
    arr, g = read_volume(path)
    if arr.ndim != 3:
        raise DataError(f"{path}: label has {arr.shape[-1]} components per voxel")
    return align_to(label_values(arr, path), g, ref, path=path, ref_path=ref_path)


def read_mask(path: Path, ref: Geometry, ref_path: Path, *, cropped: bool) -> np.ndarray:
    """A binary organ mask file -> bool (z, y, x) on the image grid (any non-zero voxel is inside)."""
    arr, g = read_volume(path)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"{path}: NaN/inf in the mask")
    if arr.ndim == 4:  # multi-layer .seg.nrrd: any layer
        arr = arr.any(axis=-1)
    return align_to((arr != 0).astype(np.uint8), g, ref, path=path, ref_path=ref_path, cropped=cropped).astype(bool)


def axis_mm(g: Geometry, axis: int) -> np.ndarray:
    """LPS physical coordinate ``axis`` (0 = x, 1 = y, 2 = z; mm) of every voxel, broadcastable to (z, y, x)."""
    d = g.direction_matrix()[axis] * np.asarray(g.spacing)  # d[c] = mm per index step along index axis c
    nz, ny, nx = g.shape
    return (
        g.origin[axis]
        + d[0] * np.arange(nx)[None, None, :]
        + d[1] * np.arange(ny)[None, :, None]
        + d[2] * np.arange(nz)[:, None, None]
    )


def paint(masks: dict[int, np.ndarray], geometry: Geometry) -> np.ndarray:
    """Organ id (or MANDIBLE) -> bool mask, to one uint8 label map. Largest first: smaller organs win overlaps."""
    masks = dict(masks)
    if MANDIBLE in masks:
        left, right = split_mandible(masks.pop(MANDIBLE), axis_mm(geometry, 0))
        masks[21] = masks.get(21, np.zeros_like(left)) | left
        masks[22] = masks.get(22, np.zeros_like(right)) | right
    label = np.zeros(geometry.shape, dtype=np.uint8)
    for organ, m in sorted(masks.items(), key=lambda kv: (-int(kv[1].sum()), kv[0])):
        label[m] = organ
    return label


def annotated_ids(masks: dict[int, np.ndarray]) -> tuple[int, ...]:
    """The StructSeg ids a set of organ masks annotates (MANDIBLE counts as both halves 21 and 22)."""
    ids = set(masks) - {MANDIBLE}
    if MANDIBLE in masks:
        ids |= {21, 22}
    return tuple(sorted(ids))
