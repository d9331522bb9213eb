"""Readers and writers of the CT datasets users bring: StructSeg 2019, PDDCA, HaN-Seg 2023, DICOM + RTSTRUCT.

Every reader returns a :class:`sepnet.data.case.Case`: image int16 HU (z, y, x), label uint8 StructSeg
ids (z, y, x) on the image grid, Geometry in SimpleITK (x, y, z) LPS conventions, ``annotated`` = the
StructSeg organs this dataset annotates (an organ the dataset lacks is *not* in it), ``sources`` = files read.

Layouts (``<case>`` is one folder; its name is the case id):

- ``structseg``: ``<case>/data.nii.gz`` + ``<case>/label.nii.gz`` (label optional for unlabelled input).
  Writing a case whose ``annotated`` is partial loses that information: the format implies all 22.
- ``pddca``: ``<case>/img.nrrd`` + ``<case>/structures/<Name>.nrrd`` binary masks.
- ``hanseg``: ``<case>/<case>_IMG_CT.nrrd`` + ``<case>/<case>_OAR_<Name>.seg.nrrd`` binary masks.
- ``dicom``: a folder holding one CT series (one file per slice, any sub-folder layout up to 3 levels)
  and at most one RTSTRUCT. The writer uses ``<case>/ct/CT_0001.dcm ...`` + ``<case>/rtstruct.dcm``.

Name maps PDDCA/HaN-Seg/ROI names -> StructSeg ids and the mandible split are documented in
:mod:`sepnet.data.organ_maps`; the DICOM conventions in :mod:`sepnet.data.dicom_rt`.
Separate binary masks are painted into one label map largest organ first, so where masks overlap
the smaller organ wins.

Geometry: files are read with SimpleITK (NIfTI and NRRD come out in LPS, arrays (z, y, x)). Spacing must
be finite and > 0 on every axis and the direction orthonormal (NIfTI: checked on the raw header, which
nibabel and SimpleITK would repair to 1 mm). Label-grid policy (see :func:`align_to`), arrays are never
compared blindly:

- StructSeg ``label.nii.gz`` and PDDCA ``structures/*.nrrd`` share the image grid: the same voxel centres,
  possibly in another axis order/direction (then reordered exactly); fewer slices, a crop or another
  spacing is a DataError (missing slices are not background).
- HaN-Seg ``.seg.nrrd`` masks may be cropped (Slicer stores the segment's bounding box): a sub- or
  super-grid on the image's voxel lattice is placed by physical coordinates; labelled voxels outside the
  image, or a grid off the lattice, are a DataError.
- DICOM RTSTRUCT contours are rasterised on the CT series they reference; a reference to a series not in
  the folder, or a contour off the slice planes or outside the image, is a DataError
  (:mod:`sepnet.data.dicom_rt`).

Bad input raises a one-line DataError naming the file (or case folder) and the cause (truncated or empty
file, symlink loop, 2-D/4-D image, NaN HU, labels > 22 or non-integer, label grid mismatch, bad spacing or
direction, missing label with ``require_label=True``, a label without its image, empty folder).
:func:`list_cases` lists incomplete case folders with ``CaseRef.problem`` set instead of dropping them.
"""

from __future__ import annotations

import logging
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sepnet.core.errors import DataError
from sepnet.core.organs import NUM_ORGANS, ORGAN_IDS, ORGAN_NAMES
from sepnet.data.case import Case, Geometry
from sepnet.data.organ_maps import (
    HANSEG_TO_STRUCTSEG,
    MANDIBLE,
    PDDCA_TO_STRUCTSEG,
    STRUCTSEG_TO_PDDCA,
    split_mandible,
)

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("structseg", "pddca", "hanseg", "dicom")


@dataclass
class CaseRef:
    """One case found in a dataset folder: its id (folder name), format and the files that make it up.

    ``paths`` always has ``root`` (the case folder) and, depending on the format, ``image``, ``label``
    (StructSeg, if present), ``structures`` (PDDCA folder, if present).
    ``problem``: set for a case folder that is incomplete or broken (e.g. a label without its image): the
    one-line cause, raised as a DataError by :func:`read_case`, so such a folder is reported, not dropped.
    """

    case_id: str
    format: str
    paths: dict[str, Path] = field(default_factory=dict)
    problem: str | None = None

    @property
    def root(self) -> Path:
        return self.paths["root"]


# ----------------------------------------------------------------------------------------------- low level


def _msg(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _read_nifti_pixels(path: Path) -> np.ndarray:
    """NIfTI voxels through nibabel, in file order (x, y, z[, t]) with scl_slope/inter applied.

    SimpleITK is not used for NIfTI pixels: it silently zero-fills a truncated file and reads NaN as 0.
    nibabel's voxel order is the file's, which is also SimpleITK's index order, so the geometry can come
    from SimpleITK (LPS) while the pixels come from nibabel.
    """
    import nibabel as nib

    try:
        return np.asanyarray(nib.load(str(path)).dataobj)
    except (EOFError, OSError, ValueError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt file ({_msg(e)})") from None
    except Exception as e:  # nibabel raises several types on a damaged header
        raise DataError(f"{path}: unreadable NIfTI file ({_msg(e)})") from None


def _geometry3(path: Path, spacing, origin, direction, size) -> Geometry:
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


ORTHONORMAL_TOL = 1e-3  # |D^T D - I| bound: float32 headers are orthonormal to ~1e-6, a shear is not


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


def _raw_nifti_header(path: Path):
    """The NIfTI-1/2 header exactly as stored (nibabel's loader repairs zero pixdim with a warning)."""
    import gzip

    import nibabel as nib

    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            block = f.read(540)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt file ({_msg(e)})") from None
    for cls in (nib.Nifti1Header, nib.Nifti2Header):
        n = cls.sizeof_hdr
        if len(block) < n:
            continue
        for endian in ("<", ">"):
            if int(np.frombuffer(block[:4], dtype=f"{endian}i4")[0]) == n:
                return cls(block[:n], endianness=endian, check=False)
    raise DataError(f"{path}: not a NIfTI file (bad header size field)")


def _check_nifti_header(path: Path) -> None:
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


def _stat_problem(path: Path) -> str | None:
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


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """A 3-D NIfTI/NRRD/MetaImage file -> (array (z, y, x) in the file's dtype, Geometry LPS).

    Multi-component images (e.g. a multi-layer .seg.nrrd) get a trailing component axis (z, y, x, c).
    """
    path = Path(path)
    problem = _stat_problem(path)
    if problem:
        raise DataError(f"{path}: {problem}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        if path.name.endswith((".nii", ".nii.gz")):
            _check_nifti_header(path)
            reader.ReadImageInformation()
            g = _geometry3(path, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), reader.GetSize())
            arr = _read_nifti_pixels(path)
            if arr.ndim > 3:
                arr = arr.reshape(arr.shape[:3])  # trailing singleton axes (checked by _geometry3)
            arr = arr.transpose(2, 1, 0)  # (x, y, z) -> (z, y, x)
        else:
            img = reader.Execute()
            g = _geometry3(path, img.GetSpacing(), img.GetOrigin(), img.GetDirection(), img.GetSize())
            extra = img.GetDimension() - 3
            if extra > 0:  # trailing singleton axes (checked by _geometry3)
                img = sitk.Extract(img, (*img.GetSize()[:3], *[0] * extra), [0] * img.GetDimension())
            arr = sitk.GetArrayFromImage(img)
    except RuntimeError as e:
        raise DataError(f"{path}: unreadable image ({_msg(e)})") from None
    if tuple(arr.shape[:3]) != tuple(g.shape):
        raise DataError(f"{path}: pixel data {arr.shape} disagree with the header size {g.shape}")
    return np.ascontiguousarray(arr), g


def _to_sitk(arr: np.ndarray, g: Geometry) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(map(float, g.spacing)))
    img.SetOrigin(tuple(map(float, g.origin)))
    img.SetDirection(tuple(map(float, g.direction)))
    return img


def _as_hu(arr: np.ndarray, path: Path) -> np.ndarray:
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


def _read_ct(path: Path) -> tuple[np.ndarray, Geometry]:
    arr, g = read_volume(path)
    if arr.ndim != 3:
        raise DataError(f"{path}: {arr.shape[-1]} components per voxel, expected a scalar CT")
    return _as_hu(arr, path), g


def _label_values(arr: np.ndarray, path: Path) -> np.ndarray:
    """Validate StructSeg label values: integers in 0..22 (floats allowed only when integral)."""
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
    return (
        f"shape {g.shape}, spacing {np.round(g.spacing, 4).tolist()}, origin {np.round(g.origin, 3).tolist()}"
    )


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
    src = _to_sitk(arr.astype(np.uint8), g)
    ref_img = sitk.Image([int(v) for v in reversed(ref.shape)], sitk.sitkUInt8)
    ref_img.SetSpacing(ref.spacing)
    ref_img.SetOrigin(ref.origin)
    ref_img.SetDirection(ref.direction)
    out = sitk.GetArrayFromImage(sitk.Resample(src, ref_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    if np.count_nonzero(out) != np.count_nonzero(arr):
        lost = np.count_nonzero(arr) - np.count_nonzero(out)
        raise DataError(f"{path}: {lost} labelled voxels lie outside the image {ref_path}")
    return out.astype(np.uint8)


def _read_label(path: Path, ref: Geometry, ref_path: Path) -> np.ndarray:
    arr, g = read_volume(path)
    if arr.ndim != 3:
        raise DataError(f"{path}: label has {arr.shape[-1]} components per voxel")
    return align_to(_label_values(arr, path), g, ref, path=path, ref_path=ref_path)


def _read_mask(path: Path, ref: Geometry, ref_path: Path, *, cropped: bool) -> np.ndarray:
    """A binary organ mask file -> bool (z, y, x) on the image grid (any non-zero voxel is inside)."""
    arr, g = read_volume(path)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"{path}: NaN/inf in the mask")
    if arr.ndim == 4:  # multi-layer .seg.nrrd: any layer
        arr = arr.any(axis=-1)
    return align_to((arr != 0).astype(np.uint8), g, ref, path=path, ref_path=ref_path, cropped=cropped).astype(bool)


def _x_mm(g: Geometry) -> np.ndarray:
    """LPS physical x (mm) of every voxel, broadcastable to (z, y, x)."""
    return _axis_mm(g, 0)


def _axis_mm(g: Geometry, axis: int) -> np.ndarray:
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
        left, right = split_mandible(masks.pop(MANDIBLE), _x_mm(geometry))
        masks[21] = masks.get(21, np.zeros_like(left)) | left
        masks[22] = masks.get(22, np.zeros_like(right)) | right
    label = np.zeros(geometry.shape, dtype=np.uint8)
    for organ, m in sorted(masks.items(), key=lambda kv: (-int(kv[1].sum()), kv[0])):
        label[m] = organ
    return label


def _annotated(masks: dict[int, np.ndarray]) -> tuple[int, ...]:
    ids = set(masks) - {MANDIBLE}
    if MANDIBLE in masks:
        ids |= {21, 22}
    return tuple(sorted(ids))


# ----------------------------------------------------------------------------------------------- discovery


def _case_format(d: Path) -> str | None:
    """Format of a case folder by its files (NIfTI/NRRD layouts only; DICOM is decided by content)."""
    if (d / "data.nii.gz").is_file() or (d / "data.nii").is_file():
        return "structseg"
    if (d / "img.nrrd").is_file():
        return "pddca"
    if any(d.glob("*_IMG_CT.nrrd")):
        return "hanseg"
    return None


_IMAGE_NAMES = {"structseg": ("data.nii.gz", "data.nii"), "pddca": ("img.nrrd",)}


def _partial_format(d: Path) -> str | None:
    """Format whose file names appear in ``d`` at all (also as broken links), for incomplete case folders."""
    names = {p.name for p in d.iterdir()} if d.is_dir() else set()
    if names & {"data.nii.gz", "data.nii", "label.nii.gz", "label.nii"}:
        return "structseg"
    if "img.nrrd" in names or (d / "structures").is_dir():
        return "pddca"
    if any(n.endswith("_IMG_CT.nrrd") or ("_OAR_" in n and n.endswith(".seg.nrrd")) for n in names):
        return "hanseg"
    return None


def _incomplete_reason(d: Path, fmt: str) -> str:
    """One line: why folder ``d`` (whose files look like ``fmt``) is not a readable case."""
    if fmt == "hanseg":
        cts = sorted(d.glob("*_IMG_CT.nrrd"))
        if len(cts) > 1:
            return f"{d}: {len(cts)} *_IMG_CT.nrrd files, expected one"
        if cts:
            return f"{cts[0]}: {_stat_problem(cts[0]) or 'unreadable'}"
        return f"{d}: no <case>_IMG_CT.nrrd image beside the organ masks"
    for name in _IMAGE_NAMES[fmt]:
        if os.path.lexists(d / name):
            return f"{d / name}: {_stat_problem(d / name) or 'unreadable'}"
    return f"{d}: no image ({' or '.join(_IMAGE_NAMES[fmt])}) beside the label files"


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_format(path: str | os.PathLike) -> str:
    """Format of a dataset folder or of one case folder: one of FORMATS. DataError if none is recognised."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a folder" if path.exists() else f"{path}: folder not found")
    fmt = _case_format(path)
    if fmt:
        return fmt
    partial = _partial_format(path)
    if partial:
        raise DataError(_incomplete_reason(path, partial))
    subs = _subdirs(path)
    for s in subs:
        fmt = _case_format(s)
        if fmt:
            return fmt
    from sepnet.data.dicom_rt import find_dicom_files

    if find_dicom_files(path, max_depth=3, limit=1):
        return "dicom"
    if not subs and not any(p for p in path.iterdir() if not p.name.startswith(".")):
        raise DataError(f"{path}: empty folder, no cases")
    raise DataError(f"{path}: no StructSeg, PDDCA, HaN-Seg or DICOM case found")


def _make_ref(d: Path, fmt: str) -> CaseRef:
    paths: dict[str, Path] = {"root": d}
    if fmt == "structseg":
        paths["image"] = d / "data.nii.gz" if (d / "data.nii.gz").is_file() else d / "data.nii"
        for name in ("label.nii.gz", "label.nii"):
            if (d / name).is_file():
                paths["label"] = d / name
                break
    elif fmt == "pddca":
        paths["image"] = d / "img.nrrd"
        if (d / "structures").is_dir():
            paths["structures"] = d / "structures"
    elif fmt == "hanseg":
        cts = sorted(p for p in d.glob("*_IMG_CT.nrrd") if p.is_file())
        if len(cts) != 1:
            return CaseRef(case_id=d.name, format=fmt, paths=paths, problem=_incomplete_reason(d, fmt))
        paths["image"] = cts[0]
    return CaseRef(case_id=d.name, format=fmt, paths=paths)


def _dataset_refs(dataset: Path, fmt: str) -> list[CaseRef]:
    """One ref per case sub-folder of a NIfTI/NRRD dataset; incomplete or foreign case folders become refs
    with a ``problem`` (reported when read), folders without any case file are ignored with a warning."""
    refs = []
    for s in _subdirs(dataset):
        found = _case_format(s)
        if found == fmt:
            refs.append(_make_ref(s, fmt))
            continue
        partial = found or _partial_format(s)
        if partial is None:
            log.warning("%s: no %s case files in this folder; ignored", s, fmt)
        elif partial != fmt:
            refs.append(CaseRef(s.name, fmt, {"root": s}, problem=f"{s}: a {partial} case in a {fmt} dataset"))
        else:
            refs.append(CaseRef(s.name, fmt, {"root": s}, problem=_incomplete_reason(s, fmt)))
    return refs


def _dicom_case_dirs(root: Path) -> list[Path]:
    """A folder with DICOM files directly in it is one case; else each sub-folder holding DICOM is one,
    unless all of them belong to one study (one case spread over sub-folders such as CT/ and RTSTRUCT/)."""
    from sepnet.data.dicom_rt import _header, find_dicom_files

    if find_dicom_files(root, max_depth=0, limit=1):
        return [root]
    subs = []
    studies = set()
    for s in _subdirs(root):
        files = find_dicom_files(s, max_depth=2, limit=1)
        if files:
            subs.append(s)
            studies.add(str(getattr(_header(files[0]), "StudyInstanceUID", s)))
    if len(subs) > 1 and len(studies) == 1:
        return [root]
    return subs


def list_cases(dataset: str | os.PathLike, *, format: str = "auto") -> list[CaseRef]:
    """The cases of a dataset folder (or the one case a case folder is), sorted by id.

    A case folder that is incomplete (a label without its image, an image that is a broken link or a
    symlink loop, a case of another format) is listed with ``problem`` set, so that reading it raises a
    DataError naming it: such folders are reported, never dropped. Raises DataError naming the folder
    when it holds no readable case of the format.
    """
    dataset = Path(dataset)
    fmt = detect_format(dataset) if format == "auto" else format
    if fmt not in FORMATS:
        raise DataError(f"{dataset}: unknown format {fmt!r}, expected auto or one of {', '.join(FORMATS)}")
    if not dataset.is_dir():
        raise DataError(f"{dataset}: folder not found")
    if fmt == "dicom":
        refs = [_make_ref(d, fmt) for d in _dicom_case_dirs(dataset)]
    elif _case_format(dataset) == fmt:
        refs = [_make_ref(dataset, fmt)]
    else:
        refs = _dataset_refs(dataset, fmt)
    if not any(r.problem is None for r in refs):
        raise DataError(refs[0].problem if refs else f"{dataset}: no {fmt} cases in this folder")
    return sorted(refs, key=lambda r: r.case_id)


# ----------------------------------------------------------------------------------------------- readers


def _read_structseg(ref: CaseRef, require_label: bool) -> Case:
    ipath = ref.paths["image"]
    image, g = _read_ct(ipath)
    lpath = ref.paths.get("label")
    if lpath is None:
        if require_label:
            raise DataError(f"{ref.root / 'label.nii.gz'}: label file missing")
        return Case(ref.case_id, image, None, g, annotated=(), sources=(str(ipath),))
    label = _read_label(lpath, g, ipath)
    return Case(ref.case_id, image, label, g, annotated=ORGAN_IDS, sources=(str(ipath), str(lpath)))


def _read_mask_case(ref: CaseRef, files: dict[str, Path], table: dict[str, int], require_label: bool) -> Case:
    ipath = ref.paths["image"]
    image, g = _read_ct(ipath)
    masks: dict[int, np.ndarray] = {}
    sources = [str(ipath)]
    for name, path in sorted(files.items()):
        organ = table.get(name)
        if organ is None:
            log.debug("%s: %s is not a StructSeg organ; ignored", path, name)
            continue
        m = _read_mask(path, g, ipath, cropped=ref.format == "hanseg")
        masks[organ] = masks[organ] | m if organ in masks else m
        sources.append(str(path))
    if not masks:
        if require_label:
            raise DataError(f"{ref.root}: no organ mask files ({', '.join(sorted(table))}) found")
        return Case(ref.case_id, image, None, g, annotated=(), sources=tuple(sources))
    return Case(ref.case_id, image, paint(masks, g), g, annotated=_annotated(masks), sources=tuple(sources))


def _read_pddca(ref: CaseRef, require_label: bool) -> Case:
    sdir = ref.paths.get("structures")
    files = {p.name[: -len(".nrrd")]: p for p in sorted(sdir.glob("*.nrrd"))} if sdir else {}
    return _read_mask_case(ref, files, PDDCA_TO_STRUCTSEG, require_label)


def _read_hanseg(ref: CaseRef, require_label: bool) -> Case:
    files = {p.name.split("_OAR_", 1)[1][: -len(".seg.nrrd")]: p for p in sorted(ref.root.glob("*_OAR_*.seg.nrrd"))}
    return _read_mask_case(ref, files, HANSEG_TO_STRUCTSEG, require_label)


def _read_dicom(ref: CaseRef, require_label: bool) -> Case:
    from sepnet.data import dicom_rt

    root = ref.root
    sc = dicom_rt.scan(root)
    if len(sc.rtstructs) > 1:
        names = ", ".join(str(p) for p, _ in sc.rtstructs)
        raise DataError(f"{root}: {len(sc.rtstructs)} RTSTRUCT files ({names}); keep one per case")
    rt_path, rt = sc.rtstructs[0] if sc.rtstructs else (None, None)
    if rt is not None:
        rt = dicom_rt.pydicom.dcmread(rt_path, force=True)  # full read: contours
    ct = dicom_rt.sort_series(dicom_rt.choose_series(sc, root, rt), where=root)
    image = _as_hu(dicom_rt.read_series_pixels(ct, where=root), root)
    sources = tuple(str(f) for f in ct.files)
    if rt is None:
        if require_label:
            raise DataError(f"{root}: no RTSTRUCT file (label) found")
        return Case(ref.case_id, image, None, ct.geometry, annotated=(), sources=sources)
    masks = dicom_rt.rtstruct_organ_masks(rt, ct.geometry, path=rt_path)
    if not masks and require_label:
        raise DataError(f"{rt_path}: no ROI name matches a StructSeg organ")
    label = paint(masks, ct.geometry)
    return Case(ref.case_id, image, label, ct.geometry, annotated=_annotated(masks), sources=(*sources, str(rt_path)))


_READERS = {"structseg": _read_structseg, "pddca": _read_pddca, "hanseg": _read_hanseg, "dicom": _read_dicom}


def read_case(ref_or_path: CaseRef | str | os.PathLike, *, format: str = "auto", require_label: bool = False) -> Case:
    """Read one case (a CaseRef from list_cases, or a case folder) into a Case.

    require_label: raise DataError when the case has no label (training); else label is None and
    ``annotated`` is empty.
    """
    if isinstance(ref_or_path, CaseRef):
        ref = ref_or_path
    else:
        refs = list_cases(ref_or_path, format=format)
        if len(refs) != 1:
            raise DataError(f"{ref_or_path}: a dataset of {len(refs)} cases, expected one case folder")
        ref = refs[0]
    if ref.problem:
        raise DataError(ref.problem)
    return _READERS[ref.format](ref, require_label)


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """A single unlabelled CT: NIfTI or NRRD file, DICOM series folder (or one of its files), or a case folder.

    Returns (image int16 HU (z, y, x), Geometry).
    """
    path = Path(path)
    if path.is_file() and path.name.endswith((".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")):
        return _read_ct(path)
    from sepnet.data import dicom_rt

    if path.is_file() and dicom_rt.is_dicom_file(path):
        path = path.parent
    if not path.exists():
        raise DataError(f"{path}: not found")
    if path.is_dir():
        fmt = _case_format(path)
        if fmt:
            return _read_ct(_make_ref(path, fmt).paths["image"])
        if dicom_rt.find_dicom_files(path, max_depth=3, limit=1):
            arr, ct = dicom_rt.read_ct_dir(path)
            return _as_hu(arr, path), ct.geometry
        raise DataError(f"{path}: no CT image (NIfTI, NRRD or DICOM series) found")
    raise DataError(f"{path}: unsupported image file (expected .nii, .nii.gz, .nrrd or DICOM)")


# ----------------------------------------------------------------------------------------------- writers


def _write_sitk(arr: np.ndarray, g: Geometry, path: Path) -> None:
    """Atomic write of a (z, y, x) array with its geometry; the temp name keeps the extension for SimpleITK."""
    name = path.name
    ext = ".nii.gz" if name.endswith(".nii.gz") else ".seg.nrrd" if name.endswith(".seg.nrrd") else path.suffix
    tmp = path.with_name(f"{name[: -len(ext)]}.tmp-{os.getpid()}{ext}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk.WriteImage(_to_sitk(arr, g), str(tmp), True)  # compressed
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def write_rtstruct(
    label: np.ndarray,
    ct_series_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    organ_names: dict[int, str] | None = None,
) -> Path:
    """Write a uint8 (z, y, x) prediction as an RTSTRUCT referencing the CT series in ct_series_dir.

    label must be on the series grid as returned by ``read_image(ct_series_dir)``. organ_names: id ->
    ROI name, one ROI each (empty organs give ROIs without contours); default the 22 StructSeg names.
    """
    from sepnet.data import dicom_rt

    root = Path(ct_series_dir)
    sc = dicom_rt.scan(root)
    ct = dicom_rt.sort_series(dicom_rt.choose_series(sc, root), where=root)
    names = dict(ORGAN_NAMES) if organ_names is None else dict(organ_names)
    return dicom_rt.write_rtstruct_for_series(np.asarray(label, dtype=np.uint8), ct, Path(out_path), organ_names=names)


def _check_case(case: Case) -> None:
    if case.image.ndim != 3 or tuple(case.image.shape) != tuple(case.geometry.shape):
        raise DataError(f"case {case.case_id}: image shape {case.image.shape} != geometry {case.geometry.shape}")
    if case.label is not None and case.label.shape != case.image.shape:
        raise DataError(f"case {case.case_id}: label shape {case.label.shape} != image shape {case.image.shape}")


def _write_structseg(case: Case, d: Path) -> None:
    _write_sitk(case.image.astype(np.int16), case.geometry, d / "data.nii.gz")
    if case.label is not None:
        _write_sitk(case.label.astype(np.uint8), case.geometry, d / "label.nii.gz")


def _write_pddca(case: Case, d: Path) -> None:
    _write_sitk(case.image.astype(np.int16), case.geometry, d / "img.nrrd")
    if case.label is None:
        return
    for organ, name in STRUCTSEG_TO_PDDCA.items():
        if organ in case.annotated:
            _write_sitk((case.label == organ).astype(np.uint8), case.geometry, d / "structures" / f"{name}.nrrd")
    if 21 in case.annotated or 22 in case.annotated:
        m = np.isin(case.label, (21, 22)).astype(np.uint8)
        _write_sitk(m, case.geometry, d / "structures" / "Mandible.nrrd")


def _write_hanseg(case: Case, d: Path) -> None:
    cid, g = case.case_id, case.geometry
    _write_sitk(case.image.astype(np.int16), g, d / f"{cid}_IMG_CT.nrrd")
    if case.label is None:
        return
    masks: dict[str, np.ndarray] = {}
    for name, organ in HANSEG_TO_STRUCTSEG.items():
        if organ in (MANDIBLE, 2, 3) or organ not in case.annotated:
            continue
        masks[name] = case.label == organ
    # HaN-Seg splits each eye into an anterior and a posterior segment; their union is the eye. We cut at
    # the eye's centre of mass along y (LPS: -y is anterior) so that reading back gives the same eye.
    y_mm = np.broadcast_to(_axis_mm(g, 1), g.shape)
    for organ, side in ((2, "L"), (3, "R")):
        if organ in case.annotated:
            eye = case.label == organ
            y_c = y_mm[eye].mean() if eye.any() else 0.0
            masks[f"Eye_A{side}"] = eye & (y_mm < y_c)
            masks[f"Eye_P{side}"] = eye & ~(y_mm < y_c)
    if 21 in case.annotated or 22 in case.annotated:
        masks["Bone_Mandible"] = np.isin(case.label, (21, 22))
    for name, m in masks.items():
        _write_sitk(m.astype(np.uint8), g, d / f"{cid}_OAR_{name}.seg.nrrd")


def _write_dicom(case: Case, d: Path) -> None:
    from sepnet.data import dicom_rt

    ct = dicom_rt.write_ct_series(case.image.astype(np.int16), case.geometry, d / "ct", case_id=case.case_id)
    if case.label is not None:
        names = {o: ORGAN_NAMES[o] for o in case.annotated}
        dicom_rt.write_rtstruct_for_series(case.label, ct, d / "rtstruct.dcm", organ_names=names)


_WRITERS = {"structseg": _write_structseg, "pddca": _write_pddca, "hanseg": _write_hanseg, "dicom": _write_dicom}


def write_case(case: Case, out_dir: str | os.PathLike, *, format: str) -> Path:
    """Write a case in one of FORMATS as ``out_dir/<case_id>/...`` and return that folder.

    The folder is built under a temporary name and swapped in, so a reader never sees half a case.
    Only organs in ``case.annotated`` that the target format can hold are written (PDDCA: 7 organs with
    one Mandible; HaN-Seg: 10 with one Bone_Mandible and each eye as anterior + posterior segment).
    """
    if format not in _WRITERS:
        raise DataError(f"{out_dir}: unknown format {format!r}, expected one of {', '.join(FORMATS)}")
    _check_case(case)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / case.case_id
    tmp = out_dir / f".{case.case_id}.tmp-{os.getpid()}"
    old = out_dir / f".{case.case_id}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _WRITERS[format](case, tmp)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return final
