"""One 3-D volume file (NIfTI, NRRD, MetaImage) <-> numpy array (z, y, x) + Geometry (SimpleITK, LPS).

Geometry always comes from SimpleITK (NIfTI and NRRD come out in LPS, index order (x, y, z)). NIfTI
pixels come from nibabel, because SimpleITK zero-fills a truncated file and reads NaN as 0; nibabel's
voxel order is the file's, which is SimpleITK's index order too. Every file passes
:mod:`sepnet.data.validation` first. Writes are atomic (temp file beside the target, then rename).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sepnet.core.errors import DataError
from sepnet.data.case import Geometry
from sepnet.data.validation import as_hu, check_nifti_header, error_text, stat_problem, volume_geometry
from sepnet.hpc.atomic import atomic_write_path


def _read_nifti_pixels(path: Path) -> np.ndarray:
    """NIfTI voxels through nibabel, in file order (x, y, z[, t]) with scl_slope/inter applied."""
    import nibabel as nib

    try:
        return np.asanyarray(nib.load(str(path)).dataobj)
    except (EOFError, OSError, ValueError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt file ({error_text(e)})") from None
    except Exception as e:  # nibabel raises several types on a damaged header
        raise DataError(f"{path}: unreadable NIfTI file ({error_text(e)})") from None


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """A 3-D NIfTI/NRRD/MetaImage file -> (array (z, y, x) in the file's dtype, Geometry LPS).

    Multi-component images (e.g. a multi-layer .seg.nrrd) get a trailing component axis (z, y, x, c).
    """
    path = Path(path)
    problem = stat_problem(path)
    if problem:
        raise DataError(f"{path}: {problem}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        if path.name.endswith((".nii", ".nii.gz")):
            check_nifti_header(path)
            reader.ReadImageInformation()
            g = volume_geometry(path, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), reader.GetSize())
            arr = _read_nifti_pixels(path)
            if arr.ndim > 3:
                arr = arr.reshape(arr.shape[:3])  # trailing singleton axes (checked by volume_geometry)
            arr = arr.transpose(2, 1, 0)  # (x, y, z) -> (z, y, x)
        else:
            img = reader.Execute()
            g = volume_geometry(path, img.GetSpacing(), img.GetOrigin(), img.GetDirection(), img.GetSize())
            extra = img.GetDimension() - 3
            if extra > 0:  # trailing singleton axes (checked by volume_geometry)
                img = sitk.Extract(img, (*img.GetSize()[:3], *[0] * extra), [0] * img.GetDimension())
            arr = sitk.GetArrayFromImage(img)
    except RuntimeError as e:
        raise DataError(f"{path}: unreadable image ({error_text(e)})") from None
    if tuple(arr.shape[:3]) != tuple(g.shape):
        raise DataError(f"{path}: pixel data {arr.shape} disagree with the header size {g.shape}")
    return np.ascontiguousarray(arr), g


def read_ct(path: Path) -> tuple[np.ndarray, Geometry]:
    """A scalar CT volume file -> (int16 HU (z, y, x), Geometry); DataError for multi-component images."""
    arr, g = read_volume(path)
    if arr.ndim != 3:
        raise DataError(f"{path}: {arr.shape[-1]} components per voxel, expected a scalar CT")
    return as_hu(arr, path), g


def to_sitk(arr: np.ndarray, g: Geometry) -> sitk.Image:
    """A (z, y, x) array as a SimpleITK image carrying ``g``'s spacing, origin and direction."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(map(float, g.spacing)))
    img.SetOrigin(tuple(map(float, g.origin)))
    img.SetDirection(tuple(map(float, g.direction)))
    return img


def _write_sitk(arr: np.ndarray, g: Geometry, path: Path) -> None:
    """Atomic write of a (z, y, x) array with its geometry; the temp name keeps the extension for SimpleITK."""
    name = path.name
    ext = ".nii.gz" if name.endswith(".nii.gz") else ".seg.nrrd" if name.endswith(".seg.nrrd") else path.suffix
    atomic_write_path(path, lambda tmp: sitk.WriteImage(to_sitk(arr, g), str(tmp), True), suffix=ext)  # compressed


def write_volume(array: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> Path:
    """Write any (z, y, x) array (e.g. float32 uncertainty) on ``geometry`` as NIfTI or NRRD, atomically."""
    path = Path(path)
    array = np.asarray(array)
    if tuple(array.shape) != tuple(geometry.shape):
        raise DataError(f"{path}: array shape {array.shape} does not match geometry shape {tuple(geometry.shape)}")
    _write_sitk(array, geometry, path)
    return path


def write_labels(label: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> Path:
    """Write a uint8 (z, y, x) label map as NIfTI (``.nii.gz``/``.nii``) or NRRD, atomically."""
    path = Path(path)
    label = np.asarray(label)
    if tuple(label.shape) != tuple(geometry.shape):
        raise DataError(f"{path}: label shape {label.shape} does not match geometry shape {tuple(geometry.shape)}")
    _write_sitk(label.astype(np.uint8), geometry, path)
    return path
