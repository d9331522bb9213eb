"""The case reader and writer of each dataset format, keyed by the names in ``layouts.FORMATS``.

A reader turns a :class:`~sepnet.data.layouts.CaseRef` into a :class:`~sepnet.data.case.Case`: image int16
HU (z, y, x), label uint8 StructSeg ids on the image grid, ``annotated`` = the StructSeg organs the
dataset annotates, ``sources`` = the files read. PDDCA/HaN-Seg/ROI names map to StructSeg ids by
:mod:`sepnet.data.organ_maps`; masks are placed and painted by :mod:`sepnet.data.label_grid`.

A writer fills an (empty, temporary) case folder; only organs in ``case.annotated`` that the format can
hold are written. StructSeg implies all 22 organs annotated, so a partial ``annotated`` is lost there.
DICOM is written as ``<case>/ct/CT_0001.dcm ...`` + ``<case>/rtstruct.dcm``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sepnet.core.errors import DataError
from sepnet.core.organs import ORGAN_IDS, ORGAN_NAMES
from sepnet.data.case import Case
from sepnet.data.label_grid import annotated_ids, axis_mm, paint, read_label, read_mask
from sepnet.data.layouts import CaseRef
from sepnet.data.organ_maps import HANSEG_TO_STRUCTSEG, MANDIBLE, PDDCA_TO_STRUCTSEG, STRUCTSEG_TO_PDDCA
from sepnet.data.validation import as_hu
from sepnet.data.volume_io import read_ct, write_volume

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- readers


def _read_structseg(ref: CaseRef, require_label: bool) -> Case:
    ipath = ref.paths["image"]
    image, g = read_ct(ipath)
    lpath = ref.paths.get("label")
    if lpath is None:
        if require_label:
            raise DataError(f"{ref.root / 'label.nii.gz'}: label file missing")
        return Case(ref.case_id, image, None, g, annotated=(), sources=(str(ipath),))
    label = read_label(lpath, g, ipath)
    return Case(ref.case_id, image, label, g, annotated=ORGAN_IDS, sources=(str(ipath), str(lpath)))


def _read_mask_case(ref: CaseRef, files: dict[str, Path], table: dict[str, int], require_label: bool) -> Case:
    """A CT plus one binary mask file per organ name (``files``: name -> path; ``table``: name -> id)."""
    ipath = ref.paths["image"]
    image, g = read_ct(ipath)
    masks: dict[int, np.ndarray] = {}
    sources = [str(ipath)]
    for name, path in sorted(files.items()):
        organ = table.get(name)
        if organ is None:
            log.debug("%s: %s is not a StructSeg organ; ignored", path, name)
            continue
        m = read_mask(path, g, ipath, cropped=ref.format == "hanseg")
        masks[organ] = masks[organ] | m if organ in masks else m
        sources.append(str(path))
    if not masks:
        if require_label:
            raise DataError(f"{ref.root}: no organ mask files ({', '.join(sorted(table))}) found")
        return Case(ref.case_id, image, None, g, annotated=(), sources=tuple(sources))
    return Case(ref.case_id, image, paint(masks, g), g, annotated=annotated_ids(masks), sources=tuple(sources))


def _read_pddca(ref: CaseRef, require_label: bool) -> Case:
    sdir = ref.paths.get("structures")
    files = {p.name[: -len(".nrrd")]: p for p in sorted(sdir.glob("*.nrrd"))} if sdir else {}
    return _read_mask_case(ref, files, PDDCA_TO_STRUCTSEG, require_label)


def _read_hanseg(ref: CaseRef, require_label: bool) -> Case:
    files = {p.name.split("_OAR_", 1)[1][: -len(".seg.nrrd")]: p for p in sorted(ref.root.glob("*_OAR_*.seg.nrrd"))}
    return _read_mask_case(ref, files, HANSEG_TO_STRUCTSEG, require_label)


def _read_dicom(ref: CaseRef, require_label: bool) -> Case:
    import pydicom  # imported late, as everywhere here: pydicom loads only for DICOM input

    from sepnet.data import dicom_series, rtstruct

    root = ref.root
    sc = dicom_series.scan(root)
    if len(sc.rtstructs) > 1:
        names = ", ".join(str(p) for p, _ in sc.rtstructs)
        raise DataError(f"{root}: {len(sc.rtstructs)} RTSTRUCT files ({names}); keep one per case")
    rt_path, rt = sc.rtstructs[0] if sc.rtstructs else (None, None)
    if rt is not None:
        rt = pydicom.dcmread(rt_path, force=True)  # full read: contours
    ct = dicom_series.sort_series(dicom_series.choose_series(sc, root, rt), where=root)
    image = as_hu(dicom_series.read_series_pixels(ct, where=root), root)
    sources = tuple(str(f) for f in ct.files)
    if rt is None:
        if require_label:
            raise DataError(f"{root}: no RTSTRUCT file (label) found")
        return Case(ref.case_id, image, None, ct.geometry, annotated=(), sources=sources)
    masks = rtstruct.rtstruct_organ_masks(rt, ct.geometry, path=rt_path)
    if not masks and require_label:
        raise DataError(f"{rt_path}: no ROI name matches a StructSeg organ")
    label = paint(masks, ct.geometry)
    return Case(
        ref.case_id, image, label, ct.geometry, annotated=annotated_ids(masks), sources=(*sources, str(rt_path))
    )


READERS = {"structseg": _read_structseg, "pddca": _read_pddca, "hanseg": _read_hanseg, "dicom": _read_dicom}


# ----------------------------------------------------------------------------------------------- writers


def check_case(case: Case) -> None:
    """DataError unless the image is 3-D on ``case.geometry`` and the label (if any) has the image's shape."""
    if case.image.ndim != 3 or tuple(case.image.shape) != tuple(case.geometry.shape):
        raise DataError(f"case {case.case_id}: image shape {case.image.shape} != geometry {case.geometry.shape}")
    if case.label is not None and case.label.shape != case.image.shape:
        raise DataError(f"case {case.case_id}: label shape {case.label.shape} != image shape {case.image.shape}")


def _write_structseg(case: Case, d: Path) -> None:
    write_volume(case.image.astype(np.int16), case.geometry, d / "data.nii.gz")
    if case.label is not None:
        write_volume(case.label.astype(np.uint8), case.geometry, d / "label.nii.gz")


def _write_pddca(case: Case, d: Path) -> None:
    write_volume(case.image.astype(np.int16), case.geometry, d / "img.nrrd")
    if case.label is None:
        return
    for organ, name in STRUCTSEG_TO_PDDCA.items():
        if organ in case.annotated:
            write_volume((case.label == organ).astype(np.uint8), case.geometry, d / "structures" / f"{name}.nrrd")
    if 21 in case.annotated or 22 in case.annotated:
        m = np.isin(case.label, (21, 22)).astype(np.uint8)
        write_volume(m, case.geometry, d / "structures" / "Mandible.nrrd")


def _write_hanseg(case: Case, d: Path) -> None:
    cid, g = case.case_id, case.geometry
    write_volume(case.image.astype(np.int16), g, d / f"{cid}_IMG_CT.nrrd")
    if case.label is None:
        return
    masks: dict[str, np.ndarray] = {}
    for name, organ in HANSEG_TO_STRUCTSEG.items():
        if organ in (MANDIBLE, 2, 3) or organ not in case.annotated:
            continue
        masks[name] = case.label == organ
    # HaN-Seg splits each eye into an anterior and a posterior segment; their union is the eye. We cut at
    # the eye's centre of mass along y (LPS: -y is anterior) so that reading back gives the same eye.
    y_mm = np.broadcast_to(axis_mm(g, 1), g.shape)
    for organ, side in ((2, "L"), (3, "R")):
        if organ in case.annotated:
            eye = case.label == organ
            y_c = y_mm[eye].mean() if eye.any() else 0.0
            masks[f"Eye_A{side}"] = eye & (y_mm < y_c)
            masks[f"Eye_P{side}"] = eye & ~(y_mm < y_c)
    if 21 in case.annotated or 22 in case.annotated:
        masks["Bone_Mandible"] = np.isin(case.label, (21, 22))
    for name, m in masks.items():
        write_volume(m.astype(np.uint8), g, d / f"{cid}_OAR_{name}.seg.nrrd")


def _write_dicom(case: Case, d: Path) -> None:
    from sepnet.data.dicom_series import write_ct_series
    from sepnet.data.rtstruct import write_rtstruct_for_series

    ct = write_ct_series(case.image.astype(np.int16), case.geometry, d / "ct", case_id=case.case_id)
    if case.label is not None:
        names = {o: ORGAN_NAMES[o] for o in case.annotated}
        write_rtstruct_for_series(case.label, ct, d / "rtstruct.dcm", organ_names=names)


WRITERS = {"structseg": _write_structseg, "pddca": _write_pddca, "hanseg": _write_hanseg, "dicom": _write_dicom}
