"""DICOM CT series: finding DICOM files, grouping them into series, reading and writing one CT series.

Reading: all CT slices of one SeriesInstanceUID are sorted by their position along the slice normal
n = row x column (ImageOrientationPatient), read by SimpleITK's ImageSeriesReader in that order (it applies
RescaleSlope/Intercept and decompresses); the caller rounds them to int16 HU. The geometry is built from
the headers: origin = ImagePositionPatient of the first sorted slice, spacing (x, y, z) =
(PixelSpacing[1], PixelSpacing[0], mean distance between slice positions), direction columns
(row, column, n). DICOM patient coordinates are LPS, like SimpleITK. Because slices are sorted along n,
a series always comes back with a right-handed direction; a left-handed volume written as DICOM reads
back with its z axis reversed (same physical content, different array order).

The CT series of a case folder is the one its RTSTRUCT references (a reference to a series not in the
folder is an error), else the only one in the folder (several is an error); other modalities are skipped.
Header checks (spacing, orientation, evenly spaced distinct slices) are listed in docs/conventions.md,
"Input validation".

Writing: one file per slice, Explicit VR Little Endian, deterministic UIDs derived from the case id.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from sepnet.core.errors import DataError
from sepnet.data.case import Geometry
from sepnet.hpc.atomic import atomic_write_path

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- scanning


def is_dicom_file(path: Path) -> bool:
    """True for a file with the DICOM Part-10 preamble ('DICM' at byte 128) or a '.dcm' name."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def find_dicom_files(root: Path, *, max_depth: int = 3, limit: int | None = None) -> list[Path]:
    """DICOM files under root (root itself = depth 0), sorted by path; hidden entries skipped.

    limit: stop after that many files (a cheap "is there any DICOM here?" test).
    """
    out: list[Path] = []
    todo = [(Path(root), 0)]
    while todo:
        d, depth = todo.pop()
        try:
            entries = sorted(d.iterdir())
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                if depth < max_depth:
                    todo.append((e, depth + 1))
            elif is_dicom_file(e):
                out.append(e)
                if limit is not None and len(out) >= limit:
                    return sorted(out)
    return sorted(out)


def read_header(path: Path) -> Dataset:
    """The header of a DICOM file (pixels not read); DataError naming the file if it is unreadable."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as e:  # pydicom raises many types on a damaged file
        raise DataError(f"{path}: unreadable DICOM file ({type(e).__name__}: {e})") from None


@dataclass
class CtSeries:
    """A sorted CT series: files and SOP instance UIDs in array (z) order, plus the shared UIDs."""

    files: list[Path]
    sop_uids: list[str]
    series_uid: str
    study_uid: str
    frame_uid: str
    patient_id: str
    patient_name: str
    geometry: Geometry


@dataclass
class DicomScan:
    series: dict[str, list[tuple[Path, Dataset]]]  # CT SeriesInstanceUID -> (file, header)
    rtstructs: list[tuple[Path, Dataset]]
    other: dict[str, int] = field(default_factory=dict)  # skipped modality -> number of files


def scan(root: Path, *, max_depth: int = 3) -> DicomScan:
    """Headers of every DICOM file under root, grouped into CT series and RTSTRUCTs (other modalities are
    counted in ``other`` and skipped)."""
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    rts: list[tuple[Path, Dataset]] = []
    other: dict[str, int] = {}
    for f in find_dicom_files(root, max_depth=max_depth):
        ds = read_header(f)
        modality = str(getattr(ds, "Modality", "")).upper()
        if modality == "RTSTRUCT":
            rts.append((f, ds))
        elif modality == "CT" and "ImagePositionPatient" in ds:
            series.setdefault(str(ds.SeriesInstanceUID), []).append((f, ds))
        else:
            key = modality or "no Modality"
            other[key] = other.get(key, 0) + 1
    return DicomScan(series, rts, other)


def _referenced_series(rt: Dataset) -> set[str]:
    uids = set()
    for fr in getattr(rt, "ReferencedFrameOfReferenceSequence", []):
        for st in getattr(fr, "RTReferencedStudySequence", []):
            for se in getattr(st, "RTReferencedSeriesSequence", []):
                uids.add(str(se.SeriesInstanceUID))
    return uids


def choose_series(sc: DicomScan, root: Path, rtstruct: Dataset | None = None) -> list[tuple[Path, Dataset]]:
    """The one CT series of a case folder: the one the RTSTRUCT references, else the only one.

    DataError when there is no CT series (naming the modalities found instead), when the RTSTRUCT
    references series none of which is in the folder (drawn on another scan), or when several CT series
    are present and no RTSTRUCT says which one is meant (ambiguous: keep one series per case folder).
    """
    if not sc.series:
        found = ", ".join(f"{n} {m}" for m, n in sorted(sc.other.items()))
        raise DataError(f"{root}: no CT image series found" + (f" (found {found} file(s))" if found else ""))
    refs = _referenced_series(rtstruct) if rtstruct is not None else set()
    for uid in sorted(refs):
        if uid in sc.series:
            return sc.series[uid]
    if refs:
        raise DataError(
            f"{root}: the RTSTRUCT references CT series {', '.join(sorted(refs))}, which is not in this folder"
        )
    if len(sc.series) > 1:
        sizes = ", ".join(str(len(v)) for v in sc.series.values())
        raise DataError(f"{root}: {len(sc.series)} CT series in one case folder ({sizes} slices); keep one")
    return next(iter(sc.series.values()))


# ----------------------------------------------------------------------------------------------- CT series


def _floats(ds: Dataset, key: str, n: int, path: Path) -> np.ndarray:
    v = getattr(ds, key, None)
    if v is None or len(v) != n:
        raise DataError(f"{path}: missing or malformed {key}")
    return np.asarray([float(x) for x in v], dtype=float)


def sort_series(items: list[tuple[Path, Dataset]], *, where: Path) -> CtSeries:
    """Sort a CT series along its slice normal and derive its Geometry (no pixels are read)."""
    p0, h0 = items[0]
    iop = _floats(h0, "ImageOrientationPatient", 6, p0)
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise DataError(f"{p0}: ImageOrientationPatient {iop.tolist()} is not two orthonormal directions")
    normal = np.cross(row, col)
    ps = _floats(h0, "PixelSpacing", 2, p0)
    if not np.all(np.isfinite(ps)) or np.any(ps <= 0):
        raise DataError(f"{p0}: PixelSpacing {ps.tolist()} mm, expected finite and > 0")
    rows, cols = int(h0.Rows), int(h0.Columns)
    pos = []
    for p, h in items:
        if not np.allclose(_floats(h, "ImageOrientationPatient", 6, p), iop, atol=1e-4):
            raise DataError(f"{p}: ImageOrientationPatient differs from the rest of the series in {where}")
        if (int(h.Rows), int(h.Columns)) != (rows, cols):
            raise DataError(f"{p}: slice size differs from the rest of the series in {where}")
        pos.append(_floats(h, "ImagePositionPatient", 3, p))
    pos_arr = np.asarray(pos)
    if not np.all(np.isfinite(pos_arr)):
        raise DataError(f"{where}: non-finite ImagePositionPatient in the CT series")
    order = np.argsort(pos_arr @ normal, kind="stable")
    d = np.diff((pos_arr @ normal)[order])
    if len(items) < 2:
        raise DataError(f"{where}: a single CT slice (2-D image), expected a 3-D series")
    if np.any(d < 1e-3):
        raise DataError(f"{where}: two CT slices share one position (duplicate or mixed series)")
    dz = float(d.mean())
    if np.abs(d - dz).max() > 0.01 * dz + 1e-3:
        raise DataError(f"{where}: non-uniform slice spacing ({d.min():.3f}..{d.max():.3f} mm) or missing slices")
    direction = np.stack([row, col, normal], axis=1)  # columns = physical directions of x, y, z index axes
    geom = Geometry(
        spacing=(float(ps[1]), float(ps[0]), dz),
        origin=tuple(float(v) for v in pos_arr[order[0]]),
        direction=tuple(float(v) for v in direction.ravel()),
        shape=(len(items), rows, cols),
    )
    files = [items[i][0] for i in order]
    hdrs = [items[i][1] for i in order]
    return CtSeries(
        files=files,
        sop_uids=[str(h.SOPInstanceUID) for h in hdrs],
        series_uid=str(h0.SeriesInstanceUID),
        study_uid=str(getattr(h0, "StudyInstanceUID", "")),
        frame_uid=str(getattr(h0, "FrameOfReferenceUID", "")),
        patient_id=str(getattr(h0, "PatientID", "")),
        patient_name=str(getattr(h0, "PatientName", "")),
        geometry=geom,
    )


def read_series_pixels(ct: CtSeries, *, where: Path) -> np.ndarray:
    """Pixels of a sorted series as float HU (z, y, x), rescale slope/intercept applied by SimpleITK/GDCM."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in ct.files])
    try:
        img = reader.Execute()
    except RuntimeError as e:
        why = re.sub(r"\(0x[0-9a-f]+\)", "", str(e).strip().splitlines()[-1])  # drop ITK object addresses
        raise DataError(f"{where}: cannot read the CT series ({why})") from None
    arr = sitk.GetArrayFromImage(img)
    if arr.shape != tuple(ct.geometry.shape):
        raise DataError(f"{where}: CT series pixel data {arr.shape} disagree with the headers {ct.geometry.shape}")
    return arr


def read_ct_dir(root: Path) -> tuple[np.ndarray, CtSeries]:
    """Read the (largest) CT series under a folder: (HU array, not yet int16, CtSeries)."""
    sc = scan(root)
    items = choose_series(sc, root)
    ct = sort_series(items, where=root)
    return read_series_pixels(ct, where=root), ct


# ----------------------------------------------------------------------------------------------- writing


def _ds(v: float) -> str:
    return format_number_as_ds(float(v))


def make_uid(*parts: object) -> str:
    """A DICOM UID derived from ``parts``: writing the same case twice gives identical files."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def new_instance(sop_class: str, sop_uid: str) -> Dataset:
    """An empty Part-10 dataset of ``sop_class`` with its file meta (explicit VR little endian) and UIDs."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    return ds


def save_dataset(ds: Dataset, path: Path) -> None:
    """Save a DICOM Part-10 file atomically (temp file beside ``path``, then rename)."""
    atomic_write_path(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))


def write_ct_series(image: np.ndarray, geometry: Geometry, out_dir: Path, *, case_id: str) -> CtSeries:
    """Write an int16 HU (z, y, x) volume as one CT file per slice into out_dir (CT_0001.dcm ...).

    Stored as unsigned with RescaleIntercept -1024 when all HU fit (the usual scanner convention),
    else as signed int16 with intercept 0; slope 1 either way, so HU come back exactly.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = image.shape
    d = geometry.direction_matrix()
    lo, hi = int(image.min()), int(image.max())
    unsigned = lo >= -1024 and hi <= 65535 - 1024
    study, series, frame = (make_uid(case_id, k) for k in ("study", "ct-series", "frame"))
    iop = [_ds(v) for v in (*d[:, 0], *d[:, 1])]
    files, sops = [], []
    for k in range(nz):
        sop = make_uid(case_id, "ct", k)
        ds = new_instance(CTImageStorage, sop)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientID = case_id[:64]
        ds.PatientName = case_id[:64]
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = "sepnet"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [_ds(v) for v in geometry.index_to_physical([0, 0, k])[0]]
        ds.ImageOrientationPatient = iop
        ds.PixelSpacing = [_ds(geometry.spacing[1]), _ds(geometry.spacing[0])]  # (row spacing, column spacing)
        ds.SliceThickness = _ds(geometry.spacing[2])
        ds.SpacingBetweenSlices = _ds(geometry.spacing[2])
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        sl = image[k].astype(np.int32)
        if unsigned:
            ds.PixelRepresentation = 0
            ds.RescaleIntercept = "-1024"
            ds.PixelData = (sl + 1024).astype("<u2").tobytes()
        else:
            ds.PixelRepresentation = 1
            ds.RescaleIntercept = "0"
            ds.PixelData = sl.astype("<i2").tobytes()
        path = out_dir / f"CT_{k + 1:04d}.dcm"
        save_dataset(ds, path)
        files.append(path)
        sops.append(sop)
    return CtSeries(files, sops, series, study, frame, case_id, case_id, geometry)
