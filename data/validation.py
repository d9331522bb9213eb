"""Checks every image or label file must pass before its array is used: geometry, file state and values.

- Geometry: spacing finite and > 0 on every axis, direction orthonormal (:func:`check_grid`); NIfTI is
  checked on the raw header (:func:`check_nifti_header`), because nibabel and SimpleITK silently repair a
  zero pixdim to 1 mm. 2-D and 4-D images are rejected (:func:`volume_geometry`).
- Files: symlink loops, broken links, folders and empty files are named before any reader touches them
  (:func:`stat_problem`).
- Values: HU finite and numeric (:func:`as_hu`); labels integral StructSeg ids 0..22 (:func:`label_values`).

Every failure is a one-line DataError naming the file and the cause (docs/conventions.md, "Input validation").
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from sepnet.core.errors import DataError
from sepnet.core.organs import NUM_ORGANS
from sepnet.data.case import Geometry

ORTHONORMAL_TOL = 1e-3  # |D^T D - I| bound: float32 headers are orthonormal to ~1e-6, a shear is not


def error_text(e: Exception) -> str:
    """The last non-empty line of an exception's message (library errors span many lines), or its type."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def check_grid(spacing, direction, *, where: Path | str) -> None:
    """DataError naming ``where`` unless spacing (x, y, z) is finite and > 0 on every axis and the 3x3
    ``direction`` is finite and orthonormal (within ORTHONORMAL_TOL)."""
    sp = np.asarray(spacing, dtype=float)
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise DataError(f"{where}: voxel spacing {sp.tolist()} mm, expected finite and > 0 on every axis")
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(d)) or np.abs(d.T @ d - np.eye(3)).max() > ORTHONORMAL_TOL:
        raise DataError(
            f"{where}: direction matrix {np.round(d, 4).tolist()} is not orthonormal (sheared or degenerate)"
        )


def volume_geometry(path: Path, spacing, origin, direction, size) -> Geometry:
    """Geometry of the first three axes of an N-D image (SimpleITK (x, y, z) order), or DataError if not 3-D."""
    dim = len(size)
    size_s = "x".join(map(str, size))
    if dim < 3 or (dim > 3 and any(n != 1 for n in size[3:])):
        raise DataError(f"{path}: {dim}-D image of size {size_s}, expected a 3-D volume")
    if size[2] < 2:
        raise DataError(f"{path}: a single slice (2-D image of size {size_s}), expected a 3-D volume")
    d = np.asarray(direction, dtype=float).reshape(dim, dim)[:3, :3]
    check_grid(spacing[:3], d, where=path)
    return Geometry(
        spacing=tuple(float(v) for v in spacing[:3]),
        origin=tuple(float(v) for v in origin[:3]),
        direction=tuple(float(v) for v in d.ravel()),
        shape=(int(size[2]), int(size[1]), int(size[0])),
    )


def _raw_nifti_header(path: Path):
    """The NIfTI-1/2 header exactly as stored (nibabel's loader repairs zero pixdim with a warning)."""
    import gzip

    import nibabel as nib

    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            block = f.read(540)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt file ({error_text(e)})") from None
    for cls in (nib.Nifti1Header, nib.Nifti2Header):
        n = cls.sizeof_hdr
        if len(block) < n:
            continue
        for endian in ("<", ">"):
            if int(np.frombuffer(block[:4], dtype=f"{endian}i4")[0]) == n:
                return cls(block[:n], endianness=endian, check=False)
    raise DataError(f"{path}: not a NIfTI file (bad header size field)")


def check_nifti_header(path: Path) -> None:
    """Spacing and direction from the raw header: pixdim[1..3] finite and > 0; a used sform orthonormal."""
    h = _raw_nifti_header(path)
    ndim = int(h["dim"][0])
    if not 1 <= ndim <= 7:
        raise DataError(f"{path}: corrupt NIfTI header (dim[0] = {ndim})")
    pix = np.asarray(h["pixdim"][1 : 1 + min(ndim, 3)], dtype=float)
    if not np.all(np.isfinite(pix)) or np.any(pix <= 0):
        raise DataError(
            f"{path}: voxel spacing (pixdim) {np.round(pix, 4).tolist()} mm in the header, "
            "expected finite and > 0 on every axis"
        )
    if int(h["sform_code"]) > 0:
        m = np.stack([h["srow_x"][:3], h["srow_y"][:3], h["srow_z"][:3]]).astype(float)
        norms = np.linalg.norm(m, axis=0)
        if not np.all(np.isfinite(m)) or np.any(norms <= 0):
            raise DataError(f"{path}: degenerate sform (column lengths {np.round(norms, 4).tolist()} mm)")
        check_grid(norms, m / norms, where=f"{path} (sform)")


def stat_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file (symlink loop, broken link, folder, missing), or None."""
    try:
        st = path.stat()
    except OSError as e:
        import errno

        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        if path.is_symlink():
            return f"broken symbolic link (-> {os.readlink(path)})"
        return "file not found" if e.errno == errno.ENOENT else f"cannot access ({e.strerror})"
    import stat

    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size == 0:
        return "empty file"
    return None


def as_hu(arr: np.ndarray, path: Path) -> np.ndarray:
    """Any numeric HU array -> int16 (rounded, clipped); NaN/inf -> DataError."""
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            raise DataError(f"{path}: {int(bad.sum())} NaN/inf HU values")
        arr = np.rint(arr)
    elif arr.dtype.kind not in "iub":
        raise DataError(f"{path}: image dtype {arr.dtype} is not numeric")
    info = np.iinfo(np.int16)
    return np.clip(arr, info.min, info.max).astype(np.int16)


def label_values(arr: np.ndarray, path: Path) -> np.ndarray:
    """Validate StructSeg label values: integers in 0..22 (floats allowed only when integral) -> uint8."""
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise DataError(f"{path}: NaN/inf in the label map")
        if not np.array_equal(arr, np.rint(arr)):
            raise DataError(f"{path}: non-integer label values (dtype {arr.dtype}), expected integer organ ids")
    elif arr.dtype.kind not in "iub":
        raise DataError(f"{path}: label dtype {arr.dtype} is not numeric")
    lo, hi = (arr.min(), arr.max()) if arr.size else (0, 0)
    if lo < 0 or hi > NUM_ORGANS:
        raise DataError(f"{path}: label values {lo:g}..{hi:g} outside 0..{NUM_ORGANS} (StructSeg ids)")
    return arr.astype(np.uint8)
