"""Which files make a case in each dataset layout: format detection and case listing (no pixels are read).

Layouts (``<case>`` is one folder; its name is the case id):

- ``structseg``: ``<case>/data.nii.gz`` + ``<case>/label.nii.gz`` (label optional for unlabelled input).
- ``pddca``: ``<case>/img.nrrd`` + ``<case>/structures/<Name>.nrrd`` binary masks.
- ``hanseg``: ``<case>/<case>_IMG_CT.nrrd`` + ``<case>/<case>_OAR_<Name>.seg.nrrd`` binary masks.
- ``dicom``: a folder holding one CT series (one file per slice, any sub-folder layout up to 3 levels)
  and at most one RTSTRUCT.

A case folder that is incomplete or broken (a label without its image, an image that is a broken link or
a symlink loop, a case of another format) is listed with ``CaseRef.problem`` set, so it is reported when
read, never silently dropped (docs/conventions.md, "Input validation").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from sepnet.core.errors import DataError
from sepnet.data.validation import stat_problem

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("structseg", "pddca", "hanseg", "dicom")


@dataclass
class CaseRef:
    """One case found in a dataset folder: its id (folder name), format and the files that make it up.

    ``paths`` always has ``root`` (the case folder) and, depending on the format, ``image``, ``label``
    (StructSeg, if present), ``structures`` (PDDCA folder, if present).
    ``problem``: set for a case folder that is incomplete or broken (e.g. a label without its image): the
    one-line cause, raised as a DataError by ``read_case``, so such a folder is reported, not dropped.
    """

    case_id: str
    format: str
    paths: dict[str, Path] = field(default_factory=dict)
    problem: str | None = None

    @property
    def root(self) -> Path:
        return self.paths["root"]


def case_format(d: Path) -> str | None:
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
            return f"{cts[0]}: {stat_problem(cts[0]) or 'unreadable'}"
        return f"{d}: no <case>_IMG_CT.nrrd image beside the organ masks"
    for name in _IMAGE_NAMES[fmt]:
        if os.path.lexists(d / name):
            return f"{d / name}: {stat_problem(d / name) or 'unreadable'}"
    return f"{d}: no image ({' or '.join(_IMAGE_NAMES[fmt])}) beside the label files"


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_format(path: str | os.PathLike) -> str:
    """Format of a dataset folder or of one case folder: one of FORMATS. DataError if none is recognised."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a folder" if path.exists() else f"{path}: folder not found")
    fmt = case_format(path)
    if fmt:
        return fmt
    partial = _partial_format(path)
    if partial:
        raise DataError(_incomplete_reason(path, partial))
    subs = _subdirs(path)
    for s in subs:
        fmt = case_format(s)
        if fmt:
            return fmt
    from sepnet.data.dicom_series import find_dicom_files  # imported late: pydicom loads only for DICOM

    if find_dicom_files(path, max_depth=3, limit=1):
        return "dicom"
    if not subs and not any(p for p in path.iterdir() if not p.name.startswith(".")):
        raise DataError(f"{path}: empty folder, no cases")
    raise DataError(f"{path}: no StructSeg, PDDCA, HaN-Seg or DICOM case found")


def make_ref(d: Path, fmt: str) -> CaseRef:
    """The CaseRef of case folder ``d`` in format ``fmt`` (``problem`` set if HaN-Seg has not one image)."""
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
        found = case_format(s)
        if found == fmt:
            refs.append(make_ref(s, fmt))
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
    from sepnet.data.dicom_series import find_dicom_files, read_header

    if find_dicom_files(root, max_depth=0, limit=1):
        return [root]
    subs = []
    studies = set()
    for s in _subdirs(root):
        files = find_dicom_files(s, max_depth=2, limit=1)
        if files:
            subs.append(s)
            studies.add(str(getattr(read_header(files[0]), "StudyInstanceUID", s)))
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
        refs = [make_ref(d, fmt) for d in _dicom_case_dirs(dataset)]
    elif case_format(dataset) == fmt:
        refs = [make_ref(dataset, fmt)]
    else:
        refs = _dataset_refs(dataset, fmt)
    if not any(r.problem is None for r in refs):
        raise DataError(refs[0].problem if refs else f"{dataset}: no {fmt} cases in this folder")
    return sorted(refs, key=lambda r: r.case_id)
