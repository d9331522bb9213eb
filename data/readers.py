"""Reading and writing the CT datasets users bring: StructSeg 2019, PDDCA, HaN-Seg 2023, DICOM + RTSTRUCT.

The public entry point of the data readers; everything else under ``sepnet.data`` that reads files is
reached through it:

- :func:`detect_format`, :func:`list_cases` (:class:`CaseRef`), :func:`read_case`, :func:`write_case` for
  whole cases in one of :data:`FORMATS` (layouts in :mod:`sepnet.data.layouts`, the per-format readers and
  writers in :mod:`sepnet.data.formats`);
- :func:`read_image` for one unlabelled CT; :func:`write_labels`, :func:`write_volume` for predictions and
  maps (:mod:`sepnet.data.volume_io`); :func:`write_rtstruct` for a prediction on a DICOM CT series.

A Case holds image int16 HU (z, y, x), label uint8 StructSeg ids (z, y, x) on the image grid, Geometry in
SimpleITK (x, y, z) LPS conventions, ``annotated`` = the StructSeg organs the dataset annotates (an organ
the dataset lacks is *not* in it) and ``sources`` = the files read.

Bad input raises a one-line DataError naming the file (or case folder) and the cause; the checks
(:mod:`sepnet.data.validation`) and the label-grid policy (:mod:`sepnet.data.label_grid`) are described in
docs/conventions.md, "Input validation".
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from sepnet.core.errors import DataError
from sepnet.core.organs import ORGAN_NAMES
from sepnet.data.case import Case, Geometry
from sepnet.data.formats import READERS, WRITERS, check_case
from sepnet.data.layouts import FORMATS, CaseRef, case_format, detect_format, list_cases, make_ref
from sepnet.data.validation import as_hu, stat_problem
from sepnet.data.volume_io import read_ct, write_labels, write_volume
from sepnet.hpc.atomic import replace_dir, temp_path

__all__ = [
    "FORMATS",
    "CaseRef",
    "detect_format",
    "list_cases",
    "read_case",
    "read_image",
    "write_case",
    "write_labels",
    "write_rtstruct",
    "write_volume",
]


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
    return READERS[ref.format](ref, require_label)


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """A single unlabelled CT: NIfTI or NRRD file, DICOM series folder (or one of its files), or a case folder.

    Returns (image int16 HU (z, y, x), Geometry).
    """
    path = Path(path)
    if path.is_file() and path.name.endswith((".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")):
        return read_ct(path)
    from sepnet.data import dicom_series  # imported late: pydicom loads only for DICOM input

    if path.is_file() and dicom_series.is_dicom_file(path):
        path = path.parent
    if not path.exists():
        raise DataError(f"{path}: {stat_problem(path) or 'not found'}")
    if path.is_dir():
        fmt = case_format(path)
        if fmt:
            return read_ct(make_ref(path, fmt).paths["image"])
        if dicom_series.find_dicom_files(path, max_depth=3, limit=1):
            arr, ct = dicom_series.read_ct_dir(path)
            return as_hu(arr, path), ct.geometry
        raise DataError(f"{path}: no CT image (NIfTI, NRRD or DICOM series) found")
    raise DataError(f"{path}: unsupported image file (expected .nii, .nii.gz, .nrrd or DICOM)")


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
    from sepnet.data import dicom_series
    from sepnet.data.rtstruct import write_rtstruct_for_series

    root = Path(ct_series_dir)
    sc = dicom_series.scan(root)
    ct = dicom_series.sort_series(dicom_series.choose_series(sc, root), where=root)
    names = dict(ORGAN_NAMES) if organ_names is None else dict(organ_names)
    return write_rtstruct_for_series(np.asarray(label, dtype=np.uint8), ct, Path(out_path), organ_names=names)


def write_case(case: Case, out_dir: str | os.PathLike, *, format: str) -> Path:
    """Write a case in one of FORMATS as ``out_dir/<case_id>/...`` and return that folder.

    The folder is built under a temporary name and swapped in, so a reader never sees half a case.
    Only organs in ``case.annotated`` that the target format can hold are written (PDDCA: 7 organs with
    one Mandible; HaN-Seg: 10 with one Bone_Mandible and each eye as anterior + posterior segment).
    """
    if format not in WRITERS:
        raise DataError(f"{out_dir}: unknown format {format!r}, expected one of {', '.join(FORMATS)}")
    check_case(case)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / case.case_id
    tmp = temp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        WRITERS[format](case, tmp)
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
