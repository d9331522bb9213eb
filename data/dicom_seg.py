"""DICOM-SEG (Segmentation Storage) output of a label map, through highdicom, and its reading back.

A label map (Z, Y, X) uint8 on the grid of a CT series (as ``sepnet.data.readers.read_image`` returns it:
slices sorted along the slice normal by :func:`sepnet.data.dicom_series.sort_series`) becomes one BINARY
SEG whose frame ``z`` is derived from the CT slice ``z`` (SourceImageSequence names its SOP instance).

Segments: one per organ present in the labels, numbered 1..N in ascending organ id (BINARY SEGs number
their segments consecutively from 1, so the segment number is not the organ id). Each carries:

- SegmentLabel = the organ name (``organ_names[id]``);
- TrackingID ``"label <id>"`` (with a TrackingUID derived from the series and the id): the organ id,
  which :func:`read_dicom_seg` reads back;
- property category / type: SNOMED "Anatomical Structure" / "Organ" (no per-organ code table yet);
- RecommendedDisplayCIELabValue from ``organ_colours`` (RGB) when given, else the fixed per-id colour
  of the RTSTRUCT ROIs (``sepnet.data.rtstruct``), so the two outputs of one case look alike;
- algorithm identification: AUTOMATIC, name "sepnet", version ``sepnet.__version__``, family
  "Artificial Intelligence".

UIDs are derived from the CT series and the label content: writing the same labels twice gives the same
UIDs, a different prediction for the same series gets different ones.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from sepnet.core.errors import DataError

ALGORITHM_NAME = "sepnet"
_TRACKING_PREFIX = "label "


def _ct_series(root: Path):
    """(CtSeries sorted along the slice normal, its headers in the same order) of the series in root."""
    from sepnet.data import dicom_series

    items = dicom_series.choose_series(dicom_series.scan(root), root)
    ct = dicom_series.sort_series(items, where=root)
    by_path = {p: h for p, h in items}
    return ct, [_with_type2_patient_study(by_path[p]) for p in ct.files]


# Type 2 (required, may be empty) patient/study attributes that highdicom copies from the CT; some series
# (ours among them) leave them out.
_TYPE2 = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
          "ReferringPhysicianName")


def _with_type2_patient_study(header):
    missing = [k for k in _TYPE2 if k not in header]
    if not missing:
        return header
    header = header.copy()
    for k in missing:
        setattr(header, k, "")
    return header


def _colour(organ: int, organ_colours: dict[int, tuple[int, int, int]] | None):
    import highdicom as hd

    from sepnet.data.rtstruct import _color  # one palette for RTSTRUCT and SEG

    rgb = organ_colours[organ] if organ_colours and organ in organ_colours else _color(organ)
    return hd.color.CIELabColor.from_rgb(*(int(v) for v in rgb))


def _segment(number: int, organ: int, name: str, *, series_uid: str, colour):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from sepnet import __version__
    from sepnet.data.dicom_series import make_uid

    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.DCM.ArtificialIntelligence, version=__version__)
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=name[:64],
        segmented_property_category=codes.SCT.AnatomicalStructure, segmented_property_type=codes.SCT.Organ,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        tracking_id=f"{_TRACKING_PREFIX}{organ}", tracking_uid=make_uid(series_uid, "seg-label", organ),
        display_color=colour)


def write_dicom_seg(
    labels: np.ndarray,
    ct_series_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    organ_names: dict[int, str],
    organ_colours: dict[int, tuple[int, int, int]] | None = None,
) -> Path:
    """Write ``labels`` (Z, Y, X) integer (organ ids 0..255, 0 = background) on the grid of the CT series
    in ``ct_series_dir`` as a BINARY DICOM-SEG Part-10 file at ``out_path`` (atomically); returns ``out_path``.

    organ_names: id -> segment label, for every id present. organ_colours: id -> (R, G, B) 0..255,
    default the RTSTRUCT palette. Only organs present get a segment. DataError (naming ``out_path``)
    when the shape differs from the series, an id has no name, or the map is all background: a SEG needs
    at least one segment, so a prediction without any organ writes no SEG.
    """
    import highdicom as hd

    from sepnet import __version__
    from sepnet.data.dicom_series import make_uid, save_dataset

    root, out_path = Path(ct_series_dir), Path(out_path)
    ct, headers = _ct_series(root)
    labels = np.asarray(labels)
    if labels.shape != tuple(ct.geometry.shape):
        raise DataError(f"{out_path}: label shape {labels.shape} does not match the CT series "
                        f"{tuple(ct.geometry.shape)} in {root}")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 255):
        raise DataError(f"{out_path}: labels must be integer organ ids in 0..255 (got {labels.dtype})")
    present = [int(v) for v in np.unique(labels) if v]
    unnamed = [v for v in present if v not in organ_names]
    if unnamed:
        raise DataError(f"{out_path}: label ids {unnamed} have no organ name")
    if not present:
        raise DataError(f"{out_path}: the label map has no organ voxels (a DICOM-SEG needs one segment)")
    lut = np.zeros(256, dtype=np.uint8)
    lut[present] = np.arange(1, len(present) + 1)
    digest = hashlib.sha1(np.ascontiguousarray(labels, dtype=np.uint8).tobytes()
                          + repr(sorted((k, organ_names[k]) for k in present)).encode()).hexdigest()
    segments = [_segment(n, organ, organ_names[organ], series_uid=ct.series_uid,
                         colour=_colour(organ, organ_colours)) for n, organ in enumerate(present, start=1)]
    seg = hd.seg.Segmentation(
        source_images=headers, pixel_array=lut[labels.astype(np.uint8)],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
        series_instance_uid=make_uid(ct.series_uid, "seg-series", digest), series_number=3,
        sop_instance_uid=make_uid(ct.series_uid, "seg", digest), instance_number=1,
        manufacturer=ALGORITHM_NAME, manufacturer_model_name="3D-SepNet", software_versions=__version__,
        device_serial_number="0", content_label="SEPNET", content_description="sepnet organs at risk")
    save_dataset(seg, out_path)  # atomic, through sepnet.hpc.atomic
    return out_path


def read_dicom_seg(path: str | os.PathLike, ct_series_dir: str | os.PathLike) -> tuple[np.ndarray, dict[int, str]]:
    """Read a DICOM-SEG back onto the grid of the CT series in ``ct_series_dir``.

    Returns (labels (Z, Y, X) uint8 organ ids, {organ id: segment label}). The organ id of a segment is its
    TrackingID ``"label <id>"`` (as :func:`write_dicom_seg` writes it), else its segment number. DataError
    naming ``path`` when it is unreadable, not a SEG, or does not derive from that CT series.
    """
    import highdicom as hd

    path, root = Path(path), Path(ct_series_dir)
    try:
        seg = hd.seg.segread(path)
    except Exception as e:  # pydicom/highdicom raise many types on a damaged or foreign file
        raise DataError(f"{path}: not a readable DICOM-SEG ({type(e).__name__}: {e})") from None
    ct, _ = _ct_series(root)
    refs = {uid for _, _, uid in seg.get_source_image_uids()}
    if not refs & set(ct.sop_uids):
        raise DataError(f"{path}: references none of the CT slices in {root}")
    numbers = list(seg.segment_numbers)
    ids = {n: _organ_id(seg.get_segment_description(n), n) for n in numbers}
    if any(i > 255 for i in ids.values()):
        raise DataError(f"{path}: organ ids {sorted(ids.values())} do not fit uint8")
    stacked = seg.get_pixels_by_source_instance(
        ct.sop_uids, segment_numbers=numbers, assert_missing_frames_are_empty=True, dtype=np.uint8)
    labels = np.zeros(stacked.shape[:3], dtype=np.uint8)
    for k, n in enumerate(numbers):
        labels[stacked[..., k] > 0] = ids[n]
    return labels, {ids[n]: str(seg.get_segment_description(n).segment_label) for n in numbers}


def _organ_id(desc, number: int) -> int:
    tid = str(getattr(desc, "TrackingID", "") or "")
    if tid.startswith(_TRACKING_PREFIX) and tid[len(_TRACKING_PREFIX):].isdigit():
        return int(tid[len(_TRACKING_PREFIX):])
    return number
