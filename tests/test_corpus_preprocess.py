"""Malformed-input corpus for ``sepnet preprocess``: every bad case gives one line naming it and its cause.

Each corpus entry builds a dataset of two cases, ``good`` and ``bad`` (``bad`` damaged in one way), in one
of the four formats, and runs ``sepnet preprocess`` (``sepnet.jobs.cli.main``, in-process): the exit status
must be 1, the failure line must name ``bad`` and match the cause, and ``good`` must be in the store.
One real ``sepnet preprocess`` subprocess per format then runs the whole corpus of that format at once:
exit 1, one line per bad case, no "Traceback" in stderr, the good case written.

Independent truth: the damage is applied to files written by ``sepnet.data.readers.write_case`` with
nibabel (raw NIfTI header fields), pydicom (DICOM attributes) or bytes, never through the readers.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from sepnet.data.case import Case, Geometry
from sepnet.data.phantom import make_case
from sepnet.data.readers import write_case
from sepnet.data.store import Store
from sepnet.jobs.cli import main

# --------------------------------------------------------------------------- the base case


@lru_cache(maxsize=1)
def _base() -> Case:
    """A 16-slice (z 14..29) cut of the tiny phantom (64x64 in-plane): brain stem, parotids, mandible, cord."""
    c = make_case(seed=0, size="tiny", case_id="base")
    z0, z1 = 14, 30
    g = c.geometry
    origin = tuple(float(v) for v in g.index_to_physical([0, 0, z0])[0])
    geo = Geometry(spacing=g.spacing, origin=origin, direction=g.direction, shape=(z1 - z0, *g.shape[1:]))
    return Case("base", c.image[z0:z1].copy(), c.label[z0:z1].copy(), geo, annotated=c.annotated)


def _write(root: Path, fmt: str, case_id: str) -> Path:
    c = _base()
    return write_case(replace(c, case_id=case_id, image=c.image.copy(), label=c.label.copy()), root, format=fmt)


def _sitk_write(arr: np.ndarray, g: Geometry, path: Path) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(map(float, g.spacing)))
    img.SetOrigin(tuple(map(float, g.origin)))
    img.SetDirection(tuple(map(float, g.direction)))
    sitk.WriteImage(img, str(path), True)


def _shifted(g: Geometry, di: float, shape=None) -> Geometry:
    """g moved by di voxels along x (and optionally another shape)."""
    return Geometry(g.spacing, tuple(g.index_to_physical([di, 0, 0])[0]), g.direction, shape or g.shape)


# --------------------------------------------------------------------------- damage helpers


def _patch_nifti_header(path: Path, **fields) -> None:
    """Set raw NIfTI-1 header fields (e.g. pixdim) without nibabel's repairs, keeping the voxel data."""
    raw = gzip.decompress(path.read_bytes())
    h = nib.Nifti1Header(raw[:348], check=False)
    for k, v in fields.items():
        h[k] = v
    path.write_bytes(gzip.compress(h.binaryblock + raw[348:]))


def _nifti(arr: np.ndarray, path: Path, affine=None) -> None:
    nib.save(nib.Nifti1Image(arr, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine), str(path))


def _nrrd_header_replace(path: Path, old: str, new: str) -> None:
    raw = path.read_bytes()
    i = raw.index(b"\n\n")
    head = raw[:i].decode()
    assert old in head, head
    path.write_bytes(head.replace(old, new).encode() + raw[i:])


def _edit_nrrd_directions(path: Path, edit: Callable[[list[list[str]]], None]) -> None:
    """Apply ``edit`` to the NRRD header's three space-direction vectors (lists of number strings)."""
    head = path.read_bytes().split(b"\n\n")[0].decode()
    dirs = re.search(r"space directions: (.*)", head).group(1)
    vecs = [v.strip("()").split(",") for v in dirs.split(" ")]
    edit(vecs)
    _nrrd_header_replace(path, dirs, " ".join("(" + ",".join(v) + ")" for v in vecs))


def _dicom_edit(path: Path, edit: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path)


def _ct_files(case: Path) -> list[Path]:
    return sorted((case / "ct").glob("*.dcm"))


def _rt_shift(dx: float = 0.0, dz: float = 0.0, roi: int = 0):
    def edit(ds):
        for c in ds.ROIContourSequence[roi].ContourSequence:
            pts = np.asarray([float(v) for v in c.ContourData]).reshape(-1, 3) + [dx, 0.0, dz]
            c.ContourData = [f"{v:.4f}" for v in pts.ravel()]

    return edit


def _first_contoured_roi(path: Path) -> int:
    ds = pydicom.dcmread(path)
    return next(i for i, r in enumerate(ds.ROIContourSequence) if "ContourSequence" in r)


# --------------------------------------------------------------------------- corpus entries
# name -> (format, damage(bad_case_folder, dataset_root), regex the failure line must match)

Damage = Callable[[Path, Path], None]
CORPUS: dict[str, tuple[str, Damage, str]] = {}


def entry(name: str, fmt: str, cause: str):
    def deco(fn: Damage) -> Damage:
        CORPUS[name] = (fmt, fn, cause)
        return fn

    return deco


# ---- StructSeg (NIfTI)


@entry("ss_label_without_image", "structseg", r"bad: no image \(data\.nii\.gz or data\.nii\)")
def _(bad, root):
    (bad / "data.nii.gz").unlink()


@entry("ss_image_symlink_loop", "structseg", r"bad/data\.nii\.gz: symbolic link loop")
def _(bad, root):
    (bad / "data.nii.gz").unlink()
    os.symlink("data.nii.gz", bad / "data.nii.gz")


@entry("ss_image_broken_symlink", "structseg", r"bad/data\.nii\.gz: broken symbolic link")
def _(bad, root):
    (bad / "data.nii.gz").unlink()
    os.symlink("nowhere.nii.gz", bad / "data.nii.gz")


@entry("ss_label_fewer_slices", "structseg", r"bad/label\.nii\.gz: grid \(shape \(14, .* keeps labels on the image")
def _(bad, root):
    lab = nib.load(bad / "label.nii.gz")
    arr = np.asanyarray(lab.dataobj)[:, :, :-2]  # nibabel order (x, y, z): two top slices missing
    nib.save(nib.Nifti1Image(arr, lab.affine, lab.header), str(bad / "label.nii.gz"))


@entry("ss_label_half_voxel_shift", "structseg", r"bad/label\.nii\.gz: grid .* does not match image")
def _(bad, root):
    c = _base()
    _sitk_write(c.label, _shifted(c.geometry, 0.5), bad / "label.nii.gz")


@entry("ss_zero_slice_spacing", "structseg", r"bad/data\.nii\.gz: voxel spacing \(pixdim\) \[.*, 0\.0\]")
def _(bad, root):
    for name in ("data.nii.gz", "label.nii.gz"):  # both: the label must not be what catches it
        _patch_nifti_header(bad / name, pixdim=[1, 3.85, 3.85, 0, 1, 1, 1, 1], sform_code=0, qform_code=0)


@entry("ss_nan_spacing", "structseg", r"bad/data\.nii\.gz: voxel spacing \(pixdim\) \[.*nan")
def _(bad, root):
    _patch_nifti_header(bad / "data.nii.gz", pixdim=[1, np.nan, 3.85, 4, 1, 1, 1, 1], sform_code=0, qform_code=0)


@entry("ss_sheared_sform", "structseg", r"bad/data\.nii\.gz \(sform\): direction matrix .* not orthonormal")
def _(bad, root):
    h = nib.load(bad / "data.nii.gz").header
    srow = np.asarray(h["srow_x"]).copy()
    srow[1] = 2.0  # x depends on j: a shear
    _patch_nifti_header(bad / "data.nii.gz", srow_x=srow, sform_code=1)


@entry("ss_nan_hu", "structseg", r"bad/data\.nii\.gz: 1 NaN/inf HU values")
def _(bad, root):
    c = _base()
    img = c.image.astype(np.float32)
    img[3, 4, 5] = np.nan
    _sitk_write(img, c.geometry, bad / "data.nii.gz")


@entry("ss_inf_hu", "structseg", r"bad/data\.nii\.gz: 2 NaN/inf HU values")
def _(bad, root):
    c = _base()
    img = c.image.astype(np.float32)
    img[3, 4, 5:7] = np.inf
    _sitk_write(img, c.geometry, bad / "data.nii.gz")


@entry("ss_2d_image", "structseg", r"bad/data\.nii\.gz: .*2-D image")
def _(bad, root):
    sitk.WriteImage(sitk.GetImageFromArray(_base().image[0]), str(bad / "data.nii.gz"))


@entry("ss_4d_image", "structseg", r"bad/data\.nii\.gz: 4-D image of size 64x64x16x2")
def _(bad, root):
    arr = np.stack([_base().image.transpose(2, 1, 0)] * 2, axis=-1)  # (x, y, z, t)
    _nifti(arr, bad / "data.nii.gz")


@entry("ss_complex_dtype", "structseg", r"bad/data\.nii\.gz: .*(dtype complex64 is not numeric|unreadable)")
def _(bad, root):
    _nifti(_base().image.transpose(2, 1, 0).astype(np.complex64), bad / "data.nii.gz")


@entry("ss_truncated_gzip", "structseg", r"bad/data\.nii\.gz: truncated or corrupt file")
def _(bad, root):
    data = (bad / "data.nii.gz").read_bytes()
    (bad / "data.nii.gz").write_bytes(data[: len(data) // 2])


@entry("ss_empty_image_file", "structseg", r"bad/data\.nii\.gz: empty file")
def _(bad, root):
    (bad / "data.nii.gz").write_bytes(b"")


@entry("ss_not_nifti", "structseg", r"bad/data\.nii\.gz: (truncated or corrupt|not a NIfTI)")
def _(bad, root):
    (bad / "data.nii.gz").write_bytes(gzip.compress(b"hello, this is not an image" * 40))


@entry("ss_label_values_over_22", "structseg", r"bad/label\.nii\.gz: label values 0\.\.30 outside 0\.\.22")
def _(bad, root):
    c = _base()
    lab = c.label.copy()
    lab[0, 0, 0] = 30
    _sitk_write(lab, c.geometry, bad / "label.nii.gz")


@entry("ss_label_non_integer", "structseg", r"bad/label\.nii\.gz: non-integer label values")
def _(bad, root):
    c = _base()
    _sitk_write(c.label.astype(np.float32) * 0.5, c.geometry, bad / "label.nii.gz")


@entry("ss_label_missing", "structseg", r"bad/label\.nii\.gz: label file missing")
def _(bad, root):
    (bad / "label.nii.gz").unlink()


@entry("ss_foreign_case_folder", "structseg", r"bad: a pddca case in a structseg dataset")
def _(bad, root):
    shutil.rmtree(bad)
    _write(root, "pddca", "bad")


# ---- PDDCA (NRRD, full-grid masks)


@entry("pd_mask_cropped", "pddca", r"bad/structures/BrainStem\.nrrd: grid .* keeps labels on the image grid")
def _(bad, root):
    c = _base()
    m = (c.label == 1)[:, 8:56, 8:56].astype(np.uint8)
    sub = Geometry(c.geometry.spacing, tuple(c.geometry.index_to_physical([8, 8, 0])[0]), c.geometry.direction,
                   m.shape)
    _sitk_write(m, sub, bad / "structures" / "BrainStem.nrrd")


@entry("pd_zero_spacing", "pddca", r"bad/img\.nrrd: unreadable image .*spacing")
def _(bad, root):
    _edit_nrrd_directions(bad / "img.nrrd", lambda v: v.__setitem__(2, ["0", "0", "0"]))


@entry("pd_sheared_direction", "pddca", r"bad/img\.nrrd: direction matrix .* not orthonormal")
def _(bad, root):
    def shear(v):  # the y index axis tilted towards the x axis' direction
        v[1] = [str(float(a) + 0.5 * float(b)) for a, b in zip(v[1], v[0])]

    _edit_nrrd_directions(bad / "img.nrrd", shear)


@entry("pd_truncated_image", "pddca", r"bad/img\.nrrd: unreadable image")
def _(bad, root):
    data = (bad / "img.nrrd").read_bytes()
    (bad / "img.nrrd").write_bytes(data[: len(data) - 500])


@entry("pd_no_structures", "pddca", r"bad: no organ mask files")
def _(bad, root):
    shutil.rmtree(bad / "structures")


@entry("pd_image_missing", "pddca", r"bad: no image \(img\.nrrd\)")
def _(bad, root):
    (bad / "img.nrrd").unlink()


@entry("pd_mask_nan", "pddca", r"bad/structures/BrainStem\.nrrd: NaN/inf in the mask")
def _(bad, root):
    c = _base()
    m = (c.label == 1).astype(np.float32)
    m[0, 0, 0] = np.nan
    _sitk_write(m, c.geometry, bad / "structures" / "BrainStem.nrrd")


# ---- HaN-Seg (NRRD, cropped .seg.nrrd masks)


def _hanseg_mask(bad: Path, name: str) -> Path:
    return bad / f"bad_OAR_{name}.seg.nrrd"


@entry("hs_mask_outside_image", "hanseg", r"bad_OAR_Brainstem\.seg\.nrrd: \d+ labelled voxels lie outside the image")
def _(bad, root):
    c = _base()
    big = np.zeros((16, 64, 80), np.uint8)
    big[:, :, :64] = c.label == 1
    big[5:8, 30:34, 70:74] = 1  # beyond the image's x extent
    _sitk_write(big, replace(c.geometry, shape=big.shape), _hanseg_mask(bad, "Brainstem"))


@entry("hs_mask_half_voxel_shift", "hanseg", r"bad_OAR_Brainstem\.seg\.nrrd: grid .* does not match image")
def _(bad, root):
    c = _base()
    _sitk_write((c.label == 1).astype(np.uint8), _shifted(c.geometry, 0.5), _hanseg_mask(bad, "Brainstem"))


@entry("hs_two_images", "hanseg", r"bad: 2 \*_IMG_CT\.nrrd files, expected one")
def _(bad, root):
    shutil.copy(bad / "bad_IMG_CT.nrrd", bad / "other_IMG_CT.nrrd")


@entry("hs_masks_without_image", "hanseg", r"bad: no <case>_IMG_CT\.nrrd image")
def _(bad, root):
    (bad / "bad_IMG_CT.nrrd").unlink()


@entry("hs_nan_hu", "hanseg", r"bad/bad_IMG_CT\.nrrd: 1 NaN/inf HU values")
def _(bad, root):
    c = _base()
    img = c.image.astype(np.float32)
    img[1, 2, 3] = np.nan
    _sitk_write(img, c.geometry, bad / "bad_IMG_CT.nrrd")


@entry("hs_4d_image", "hanseg", r"bad/bad_IMG_CT\.nrrd: .*(components per voxel|4-D image)")
def _(bad, root):
    c = _base()
    img = sitk.GetImageFromArray(np.stack([c.image] * 3, axis=-1), isVector=True)
    sitk.WriteImage(img, str(bad / "bad_IMG_CT.nrrd"))


# ---- DICOM CT + RTSTRUCT


@entry("dc_missing_slice", "dicom", r"bad: non-uniform slice spacing .* or missing slices")
def _(bad, root):
    _ct_files(bad)[7].unlink()


@entry("dc_duplicate_position", "dicom", r"bad: two CT slices share one position")
def _(bad, root):
    f = _ct_files(bad)
    pos = pydicom.dcmread(f[4]).ImagePositionPatient
    _dicom_edit(f[5], lambda ds: setattr(ds, "ImagePositionPatient", pos))


@entry("dc_mixed_series", "dicom", r"bad: 2 CT series in one case folder \(16, 16 slices\); keep one")
def _(bad, root):
    _write(root / "_other", "dicom", "other")
    shutil.copytree(root / "_other" / "other" / "ct", bad / "ct2")
    shutil.rmtree(root / "_other")
    (bad / "rtstruct.dcm").unlink()  # nothing says which series is meant


@entry("dc_non_ct_modality", "dicom", r"bad: no CT image series found \(found 16 MR file\(s\)\)")
def _(bad, root):
    for f in _ct_files(bad):
        _dicom_edit(f, lambda ds: setattr(ds, "Modality", "MR"))


@entry("dc_rtstruct_other_series", "dicom", r"bad: the RTSTRUCT references CT series 1\.2\.3\.4\.5, which is not")
def _(bad, root):
    def edit(ds):
        ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[
            0
        ].SeriesInstanceUID = "1.2.3.4.5"

    _dicom_edit(bad / "rtstruct.dcm", edit)


@entry("dc_contour_outside_image", "dicom", r"bad/rtstruct\.dcm: ROI '.*' has a contour outside the CT image")
def _(bad, root):
    _dicom_edit(bad / "rtstruct.dcm", _rt_shift(dx=400.0, roi=_first_contoured_roi(bad / "rtstruct.dcm")))


@entry("dc_contour_between_slices", "dicom", r"bad/rtstruct\.dcm: ROI '.*' has a contour between CT slice planes")
def _(bad, root):
    _dicom_edit(bad / "rtstruct.dcm", _rt_shift(dz=2.0, roi=_first_contoured_roi(bad / "rtstruct.dcm")))


@entry("dc_zero_pixel_spacing", "dicom", r"CT_0001\.dcm: PixelSpacing \[0\.0, 0\.0\] mm")
def _(bad, root):
    for f in _ct_files(bad):
        _dicom_edit(f, lambda ds: setattr(ds, "PixelSpacing", [0, 0]))


@entry("dc_oblique_non_orthogonal", "dicom", r"CT_0001\.dcm: ImageOrientationPatient .* not two orthonormal")
def _(bad, root):
    for f in _ct_files(bad):
        _dicom_edit(f, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0.5, 0.866, 0]))


@entry("dc_no_rtstruct", "dicom", r"bad: no RTSTRUCT file \(label\) found")
def _(bad, root):
    (bad / "rtstruct.dcm").unlink()


@entry("dc_two_rtstructs", "dicom", r"bad: 2 RTSTRUCT files")
def _(bad, root):
    shutil.copy(bad / "rtstruct.dcm", bad / "rtstruct2.dcm")


@entry("dc_truncated_pixels", "dicom", r"bad: (cannot read the CT series|CT series pixel data)")
def _(bad, root):
    f = _ct_files(bad)[3]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 3000])


@entry("dc_only_rtstruct", "dicom", r"bad: no CT image series found")
def _(bad, root):
    shutil.rmtree(bad / "ct")


# --------------------------------------------------------------------------- running


def _build(root: Path, name: str) -> None:
    fmt, damage, _ = CORPUS[name]
    _write(root, fmt, "good")
    damage(_write(root, fmt, "bad"), root)


def _args(dataset: Path, store: Path, fmt: str) -> list[str]:
    return ["preprocess", str(dataset), str(store), "--format", fmt, "--workers", "1", "--no-progress",
            "--crop", "none", "--transforms", "SLF1", "--chunks", "1,8,64,64"]


def _failure_lines(text: str, case_id: str) -> list[str]:
    return [ln for ln in text.splitlines() if f"failed case {case_id}:" in ln]


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_case_is_reported_and_good_case_written(name, tmp_path, caplog):
    fmt, _, cause = CORPUS[name]
    _build(tmp_path / "ds", name)
    with caplog.at_level(logging.WARNING):
        rc = main(_args(tmp_path / "ds", tmp_path / "store", fmt))
    lines = _failure_lines(caplog.text, "bad")
    assert rc == 1, caplog.text
    assert len(lines) == 1, caplog.text
    assert re.search(cause, lines[0]), lines[0]
    assert "Traceback" not in caplog.text
    assert Store(tmp_path / "store").case_ids == ["good"]


def test_corpus_is_large_enough_and_covers_every_format():
    fmts = [fmt for fmt, _, _ in CORPUS.values()]
    assert len(CORPUS) >= 40 and set(fmts) == {"structseg", "pddca", "hanseg", "dicom"}


@pytest.mark.parametrize("fmt", ["structseg", "pddca", "hanseg", "dicom"])
def test_whole_corpus_of_a_format_in_one_cli_run(fmt, tmp_path):
    """One real ``sepnet preprocess`` subprocess over every bad case of a format plus one good case."""
    ds = tmp_path / "ds"
    names = sorted(n for n, (f, _, _) in CORPUS.items() if f == fmt)
    _write(ds, fmt, "good")
    bad_ids = {}
    for i, name in enumerate(names):
        cid = f"bad{i:02d}"
        (ds / "_tmp").mkdir()
        _build(ds / "_tmp", name)
        for d in (ds / "_tmp").iterdir():
            if d.name == "bad":
                d.rename(ds / cid)
        shutil.rmtree(ds / "_tmp")
        bad_ids[cid] = name
        if fmt == "hanseg":  # HaN-Seg file names carry the case id
            for p in (ds / cid).iterdir():
                if p.name.startswith("bad_"):
                    p.rename(p.with_name(cid + p.name[3:]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sepnet = Path(sys.executable).with_name("sepnet")
    out = subprocess.run([str(sepnet), *_args(ds, tmp_path / "store", fmt)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    for cid, name in bad_ids.items():
        lines = _failure_lines(out.stderr, cid)
        assert len(lines) == 1, (name, out.stderr[-3000:])
        cause = CORPUS[name][2].replace("bad", cid)
        assert re.search(cause, lines[0]), (name, lines[0])
    assert Store(tmp_path / "store").case_ids == ["good"]
    assert f"1 written, 0 up to date, {len(bad_ids)} failed" in out.stdout
