"""Readers/writers: round trips in every format on one synthetic case, grid alignment, bad input.

Independent truths: the synthetic case itself (organs drawn in physical mm, so left/right is known),
nibabel (RAS affine) for the NIfTI geometry, rt-utils (cv2 polygon fill) for our RTSTRUCT contours.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from sepnet.core.errors import DataError
from sepnet.core.organs import ORGAN_IDS, ORGAN_NAMES
from sepnet.data.case import Case, Geometry
from sepnet.data.organ_maps import MANDIBLE, match_roi_name
from sepnet.data.readers import (
    detect_format,
    list_cases,
    read_case,
    read_image,
    write_case,
    write_labels,
    write_rtstruct,
)

SHAPE = (12, 40, 48)  # (z, y, x)
SPACING = (0.9, 1.1, 2.5)  # (x, y, z) mm
ORIGIN = (-20.5, 30.25, -100.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIP_XY = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # 180 deg about z: +i points to patient right


def rot_z(deg: float) -> tuple[float, ...]:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


PDDCA_IDS = (1, 6, 7, 8, 12, 13, 21, 22)
HANSEG_IDS = (1, 2, 3, 6, 7, 8, 11, 12, 13, 20, 21, 22)
LARGE = (1, 2, 3, 12, 13, 20, 21, 22)


def make_case(direction=IDENTITY, case_id="case_01", shape=SHAPE, spacing=SPACING) -> Case:
    """12x40x48 int16 CT with organs drawn in physical mm around the volume centre (+X = patient left)."""
    g = Geometry(spacing=spacing, origin=ORIGIN, direction=direction, shape=shape)
    nz, ny, nx = shape
    kk, jj, ii = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    pts = g.index_to_physical(np.c_[ii.ravel(), jj.ravel(), kk.ravel()])
    centre = g.index_to_physical([(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2])[0]
    X, Y, Z = ((pts - centre).T).reshape(3, *shape)
    label = np.zeros(shape, np.uint8)

    def ball(cx, cy, cz, r):
        return (X - cx) ** 2 + (Y - cy) ** 2 + (Z - cz) ** 2 <= r**2

    label[(np.abs(X) < 14) & (Y > -19) & (Y < -14) & (Z < -4)] = 21  # mandible, split below
    label[(label == 21) & (X < 0)] = 22
    label[ball(0, 8, 0, 6)] = 1
    label[ball(12, -10, 4, 5)] = 2
    label[ball(-12, -10, 4, 5)] = 3
    label[ball(12, -14, 4, 1.2)] = 4
    label[(np.abs(X - 6) < 1.5) & (np.abs(Y + 4) < 1.5) & (np.abs(Z - 4) < 2)] = 6
    label[(np.abs(X + 6) < 1.5) & (np.abs(Y + 4) < 1.5) & (np.abs(Z - 4) < 2)] = 7
    label[ball(0, -3, 5, 2.5)] = 8
    label[ball(0, 0, -3, 1.6)] = 11
    label[(np.abs(X - 16) < 4) & (np.abs(Y - 5) < 6) & (np.abs(Z + 3) < 8)] = 12
    label[(np.abs(X + 16) < 4) & (np.abs(Y - 5) < 6) & (np.abs(Z + 3) < 8)] = 13
    label[(np.abs(X) < 3) & (np.abs(Y - 16) < 2.5)] = 20
    rng = np.random.default_rng(0)
    body = (X / 19) ** 2 + (Y / 21) ** 2 <= 1
    image = np.where(body, 30, -1000) + rng.normal(0, 15, shape) + 700 * np.isin(label, (21, 22))
    image = np.clip(np.rint(image), -1024, 3000).astype(np.int16)
    return Case(case_id, image, label, g, annotated=ORGAN_IDS)


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def restrict(label, ids):
    return np.where(np.isin(label, ids), label, 0).astype(np.uint8)


def assert_geometry(a: Geometry, b: Geometry, tol=1e-4):
    assert tuple(a.shape) == tuple(b.shape)
    np.testing.assert_allclose(a.spacing, b.spacing, atol=tol)
    np.testing.assert_allclose(a.origin, b.origin, atol=tol * 10)
    np.testing.assert_allclose(a.direction, b.direction, atol=tol)


# ----------------------------------------------------------------------------------------------- synthetic case


def test_synthetic_case_sides_follow_lps():
    """The fixture itself: Parotid_L (12) lies at larger physical x than Parotid_R (13), whatever the direction."""
    for direction in (IDENTITY, FLIP_XY, rot_z(30)):
        c = make_case(direction)
        g = c.geometry
        com = {o: g.index_to_physical(np.argwhere(c.label == o)[:, ::-1].mean(axis=0))[0] for o in (12, 13, 21, 22)}
        assert com[12][0] > com[13][0] + 20 and com[21][0] > com[22][0]
        assert all((c.label == o).sum() > 20 for o in LARGE)


# ----------------------------------------------------------------------------------------------- round trips


def test_structseg_round_trip_rotated(tmp_path):
    case = make_case(rot_z(20))
    root = write_case(case, tmp_path, format="structseg")
    assert root == tmp_path / "case_01" and (root / "data.nii.gz").is_file()
    assert detect_format(tmp_path) == "structseg" and detect_format(root) == "structseg"
    back = read_case(root)
    assert back.image.dtype == np.int16 and back.label.dtype == np.uint8
    np.testing.assert_array_equal(back.image, case.image)
    np.testing.assert_array_equal(back.label, case.label)
    assert_geometry(back.geometry, case.geometry)
    assert back.annotated == ORGAN_IDS and back.case_id == "case_01"
    assert set(back.sources) == {str(root / "data.nii.gz"), str(root / "label.nii.gz")}


def test_nifti_geometry_matches_nibabel_ras(tmp_path):
    """Peer check of the LPS convention: nibabel's RAS affine = diag(-1,-1,1) @ our LPS affine, arrays (x,y,z)."""
    case = make_case(rot_z(20))
    path = write_labels(case.label, case.geometry, tmp_path / "pred.nii.gz")
    img = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(img.dataobj), case.label.transpose(2, 1, 0))
    g = case.geometry
    lps = g.direction_matrix() * np.asarray(g.spacing)
    np.testing.assert_allclose(img.affine[:3, :3], np.diag([-1, -1, 1]) @ lps, atol=1e-5)
    np.testing.assert_allclose(img.affine[:3, 3], np.array(g.origin) * [-1, -1, 1], atol=1e-4)


def test_pddca_round_trip_splits_mandible_at_midline(tmp_path):
    case = make_case(FLIP_XY)
    root = write_case(case, tmp_path, format="pddca")
    names = sorted(p.name for p in (root / "structures").iterdir())
    assert names == sorted(
        f"{n}.nrrd"
        for n in ("BrainStem", "Chiasm", "Mandible", "OpticNerve_L", "OpticNerve_R", "Parotid_L", "Parotid_R")
    )
    assert detect_format(tmp_path) == "pddca"
    back = read_case(root)
    np.testing.assert_array_equal(back.image, case.image)
    assert_geometry(back.geometry, case.geometry)
    assert back.annotated == PDDCA_IDS
    np.testing.assert_array_equal(back.label, restrict(case.label, PDDCA_IDS))


def test_pddca_missing_structure_is_not_annotated(tmp_path):
    root = write_case(make_case(), tmp_path, format="pddca")
    (root / "structures" / "Chiasm.nrrd").unlink()
    sitk.WriteImage(
        sitk.ReadImage(str(root / "structures" / "BrainStem.nrrd")), str(root / "structures" / "Submandibular_L.nrrd")
    )
    back = read_case(root)
    assert 8 not in back.annotated and not (back.label == 8).any()
    assert back.annotated == tuple(i for i in PDDCA_IDS if i != 8)


def test_hanseg_round_trip(tmp_path):
    case = make_case(IDENTITY, case_id="case_07")
    root = write_case(case, tmp_path, format="hanseg")
    assert (root / "case_07_IMG_CT.nrrd").is_file()
    for name in ("Eye_AL", "Eye_PL", "Bone_Mandible", "OpticNrv_R", "OpticChiasm", "Brainstem", "SpinalCord"):
        m = sitk.GetArrayFromImage(sitk.ReadImage(str(root / f"case_07_OAR_{name}.seg.nrrd")))
        assert m.any(), name
    assert detect_format(root) == "hanseg"
    back = read_case(root)
    np.testing.assert_array_equal(back.image, case.image)
    assert back.annotated == HANSEG_IDS
    np.testing.assert_array_equal(back.label, restrict(case.label, HANSEG_IDS))


def test_dicom_round_trip_rotated(tmp_path):
    case = make_case(rot_z(15))
    root = write_case(case, tmp_path, format="dicom")
    assert len(list((root / "ct").glob("*.dcm"))) == SHAPE[0] and (root / "rtstruct.dcm").is_file()
    assert detect_format(tmp_path) == "dicom"
    ct0 = pydicom.dcmread(root / "ct" / "CT_0001.dcm")
    assert float(ct0.RescaleIntercept) == -1024 and ct0.PixelRepresentation == 0  # rescale path exercised
    back = read_case(root, require_label=True)
    np.testing.assert_array_equal(back.image, case.image)  # HU exact
    assert_geometry(back.geometry, case.geometry)
    assert back.annotated == ORGAN_IDS  # all 22 ROIs written, absent ones without contours
    for organ in LARGE:
        assert dice(back.label == organ, case.label == organ) >= 0.9, ORGAN_NAMES[organ]
    # In practice the marching-squares contours re-rasterise exactly on compact organs.
    assert (back.label == case.label).mean() > 0.999


def test_rtstruct_readable_by_rt_utils(tmp_path):
    """A peer reader (rt-utils, cv2 polygon fill) gets the same organs from our RTSTRUCT."""
    rt_utils = pytest.importorskip("rt_utils")
    # Square pixels on a square slice: rt-utils 1.2.7 allocates (Columns, Rows) masks and pairs
    # PixelSpacing[0] (the row spacing, along y) with the row direction (x), harmless only when they agree.
    case = make_case(IDENTITY, shape=(12, 44, 44), spacing=(1.0, 1.0, 2.5))
    root = write_case(case, tmp_path, format="dicom")
    rt = rt_utils.RTStructBuilder.create_from(
        dicom_series_path=str(root / "ct"), rt_struct_path=str(root / "rtstruct.dcm")
    )
    assert set(rt.get_roi_names()) == set(ORGAN_NAMES.values())
    # cv2.fillPoly also fills pixels the polygon edge merely touches, so rt-utils' mask contains ours and
    # stays within its one-voxel in-plane dilation (Dice 0.8-0.9 on these small organs).
    ring = np.zeros((1, 3, 3), bool)
    ring[0] = True
    for organ in (1, 2, 12, 13, 20, 21, 22):
        m = rt.get_roi_mask_by_name(ORGAN_NAMES[organ]).transpose(2, 0, 1)  # (rows, cols, slices) -> (z, y, x)
        ours = case.label == organ
        assert not (ours & ~m).any(), ORGAN_NAMES[organ]
        assert not (m & ~ndi.binary_dilation(ours, ring)).any(), ORGAN_NAMES[organ]
        assert dice(m, ours) > 0.75


def test_dicom_left_handed_volume_reads_back_reversed(tmp_path):
    """DICOM sorts slices along row x column, so a left-handed grid returns with z reversed: same physics."""
    left = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    case = make_case(left)
    case.image[0, 0, 0] = -2048  # below the unsigned range: stored signed, intercept 0
    root = write_case(case, tmp_path, format="dicom")
    assert pydicom.dcmread(root / "ct" / "CT_0001.dcm").PixelRepresentation == 1
    back = read_case(root)
    np.testing.assert_array_equal(back.image, case.image[::-1])
    np.testing.assert_allclose(
        back.geometry.origin, case.geometry.index_to_physical([0, 0, SHAPE[0] - 1])[0], atol=1e-3
    )
    assert np.linalg.det(back.geometry.direction_matrix()) > 0


def test_write_rtstruct_on_dicom_input(tmp_path):
    case = make_case(rot_z(15))
    root = write_case(case, tmp_path, format="dicom")
    image, g = read_image(root / "ct")
    np.testing.assert_array_equal(image, case.image)
    out = write_rtstruct(
        case.label, root / "ct", tmp_path / "pred" / "rt.dcm", organ_names={1: "Brainstem", 12: "Parotid L"}
    )
    ds = pydicom.dcmread(out)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["Brainstem", "Parotid L"]
    assert ds.StudyInstanceUID == pydicom.dcmread(root / "ct" / "CT_0001.dcm").StudyInstanceUID
    assert ds.SOPInstanceUID != pydicom.dcmread(root / "rtstruct.dcm").SOPInstanceUID  # content-dependent UIDs
    (root / "rtstruct.dcm").replace(tmp_path / "orig_rt.dcm")
    out.replace(root / "rtstruct.dcm")
    back = read_case(root)
    assert back.annotated == (1, 12)  # names matched by the tolerant map
    assert dice(back.label == 12, case.label == 12) >= 0.9
    with pytest.raises(DataError, match="does not match the CT series"):
        write_rtstruct(case.label[:-1], root / "ct", tmp_path / "bad.dcm")


def test_read_image_single_files(tmp_path):
    case = make_case(rot_z(5))
    root = write_case(case, tmp_path, format="structseg")
    img, g = read_image(root / "data.nii.gz")
    np.testing.assert_array_equal(img, case.image)
    assert_geometry(g, case.geometry)
    root2 = write_case(case, tmp_path / "p", format="pddca")
    img2, g2 = read_image(root2 / "img.nrrd")
    np.testing.assert_array_equal(img2, case.image)
    assert_geometry(g2, case.geometry)


def test_list_cases_and_unlabelled(tmp_path):
    for cid in ("b", "a"):
        write_case(make_case(case_id=cid), tmp_path, format="structseg")
    (tmp_path / "b" / "label.nii.gz").unlink()
    refs = list_cases(tmp_path)
    assert [r.case_id for r in refs] == ["a", "b"] and {r.format for r in refs} == {"structseg"}
    assert "label" in refs[0].paths and "label" not in refs[1].paths
    unl = read_case(refs[1])
    assert unl.label is None and unl.annotated == ()
    with pytest.raises(DataError, match=r"b/label\.nii\.gz: label file missing"):
        read_case(refs[1], require_label=True)


def test_dicom_dataset_of_several_cases(tmp_path):
    small = make_case()
    for cid in ("p1", "p2"):
        small.case_id = cid
        write_case(small, tmp_path, format="dicom")
    refs = list_cases(tmp_path)
    assert [r.case_id for r in refs] == ["p1", "p2"] and refs[0].format == "dicom"
    (tmp_path / "p2" / "rtstruct.dcm").unlink()
    with pytest.raises(DataError, match="no RTSTRUCT"):
        read_case(refs[1], require_label=True)
    assert read_case(refs[1]).label is None


# ----------------------------------------------------------------------------------------------- alignment


def _write_label(arr, g: Geometry, path: Path):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(g.spacing)
    img.SetOrigin(g.origin)
    img.SetDirection(g.direction)
    sitk.WriteImage(img, str(path), True)


def test_label_on_flipped_direction_is_aligned(tmp_path):
    case = make_case(rot_z(20))
    root = write_case(case, tmp_path, format="structseg")
    g = case.geometry
    d = g.direction_matrix().copy()
    d[:, 0] *= -1  # x index axis reversed ...
    flipped = Geometry(g.spacing, tuple(g.index_to_physical([SHAPE[2] - 1, 0, 0])[0]), tuple(d.ravel()), g.shape)
    _write_label(np.ascontiguousarray(case.label[:, :, ::-1]), flipped, root / "label.nii.gz")  # ... same physics
    assert not np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(root / "label.nii.gz"))), case.label)
    np.testing.assert_array_equal(read_case(root).label, case.label)


def test_label_with_permuted_axes_is_aligned_but_subgrid_is_refused(tmp_path):
    """StructSeg labels share the image grid: the same voxels in another axis order are read back exactly,
    a crop (sub-grid) or fewer slices are errors (missing slices are not background)."""
    case = make_case(IDENTITY)
    root = write_case(case, tmp_path, format="structseg")
    g = case.geometry
    # x and y index axes swapped (array transposed, direction columns swapped): same voxels, other order
    d = g.direction_matrix()[:, [1, 0, 2]]
    perm = Geometry(
        (g.spacing[1], g.spacing[0], g.spacing[2]), g.origin, tuple(d.ravel()), (SHAPE[0], SHAPE[2], SHAPE[1])
    )
    _write_label(np.ascontiguousarray(case.label.transpose(0, 2, 1)), perm, root / "label.nii.gz")
    np.testing.assert_array_equal(read_case(root).label, case.label)
    # a cropped label (sub-grid holding every organ voxel): refused in this layout
    zs, ys, xs = (np.nonzero(case.label.any(axis=a))[0] for a in ((1, 2), (0, 2), (0, 1)))
    crop = case.label[zs[0] : zs[-1] + 1, ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
    sub = Geometry(g.spacing, tuple(g.index_to_physical([xs[0], ys[0], zs[0]])[0]), g.direction, crop.shape)
    _write_label(np.ascontiguousarray(crop), sub, root / "label.nii.gz")
    with pytest.raises(DataError, match=r"label\.nii\.gz: grid .* differs from image .* keeps labels on the image"):
        read_case(root)
    _write_label(np.ascontiguousarray(case.label[:-2]), g, root / "label.nii.gz")  # two slices short, same origin
    with pytest.raises(DataError, match=r"shape \(10, 40, 48\).* differs from image"):
        read_case(root)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def sroot(tmp_path):
    return write_case(make_case(rot_z(10)), tmp_path, format="structseg")


def test_truncated_nifti(sroot):
    data = (sroot / "data.nii.gz").read_bytes()
    (sroot / "data.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"data\.nii\.gz: truncated"):
        read_case(sroot)
    raw = gzip.decompress(data)
    (sroot / "data.nii.gz").unlink()
    (sroot / "data.nii").write_bytes(raw[: len(raw) - 100])  # uncompressed and short
    with pytest.raises(DataError, match=r"data\.nii: truncated"):
        read_case(sroot)


def test_unalignable_label_grids(sroot):
    case = read_case(sroot)
    g = case.geometry
    half = Geometry(g.spacing, tuple(g.index_to_physical([0.5, 0, 0])[0]), g.direction, g.shape)  # half-voxel shift
    _write_label(case.label, half, sroot / "label.nii.gz")
    with pytest.raises(DataError, match=r"label\.nii\.gz: grid .* does not match image .*data\.nii\.gz"):
        read_case(sroot)
    coarse = Geometry((1.8, 1.1, 2.5), g.origin, g.direction, (12, 40, 24))  # other spacing, other shape
    _write_label(np.ascontiguousarray(case.label[:, :, ::2]), coarse, sroot / "label.nii.gz")
    with pytest.raises(DataError, match="does not match image"):
        read_case(sroot)
    big = np.zeros((12, 40, 60), np.uint8)  # a larger grid on the image lattice: not the image grid
    _write_label(big, g, sroot / "label.nii.gz")
    with pytest.raises(DataError, match="keeps labels on the image grid"):
        read_case(sroot)


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.full(SHAPE, 30, np.uint8), r"label values 30\.\.30 outside 0\.\.22"),
        (np.full(SHAPE, 1.5, np.float32), "non-integer label values"),
        (np.full(SHAPE, -1, np.int16), r"label values -1\.\.-1 outside"),
    ],
)
def test_bad_label_values(sroot, arr, match):
    g = read_case(sroot).geometry
    _write_label(arr, g, sroot / "label.nii.gz")
    with pytest.raises(DataError, match=r"label\.nii\.gz: " + match):
        read_case(sroot)


def test_integral_float_label_is_accepted(sroot):
    case = read_case(sroot)
    _write_label(case.label.astype(np.float32), case.geometry, sroot / "label.nii.gz")
    np.testing.assert_array_equal(read_case(sroot).label, case.label)


def test_nan_hu_and_2d_image(sroot):
    case = read_case(sroot)
    img = case.image.astype(np.float32)
    img[3, 4, 5] = np.nan
    _write_label(img, case.geometry, sroot / "data.nii.gz")
    with pytest.raises(DataError, match=r"data\.nii\.gz: 1 NaN/inf HU"):
        read_case(sroot)
    sitk.WriteImage(sitk.GetImageFromArray(case.image[0]), str(sroot / "data.nii.gz"))
    with pytest.raises(DataError, match=r"data\.nii\.gz: 2-D image"):
        read_case(sroot)
    with pytest.raises(DataError, match="2-D image"):
        read_image(sroot / "data.nii.gz")


def test_empty_and_unknown_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: empty folder"):
        list_cases(tmp_path / "empty")
    (tmp_path / "junk" / "x").mkdir(parents=True)
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="junk: no StructSeg"):
        list_cases(tmp_path / "junk")
    with pytest.raises(DataError, match="no pddca cases"):
        list_cases(tmp_path / "junk", format="pddca")
    with pytest.raises(DataError, match="folder not found"):
        list_cases(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------- name map


@pytest.mark.parametrize(
    "name, organ",
    [
        ("Brainstem", 1), ("BrainStem", 1), ("brain stem", 1), ("BRAIN_STEM", 1),
        ("Parotid L", 12), ("Lt Parotid", 12), ("Parotid_Gland_L", 12), ("ParotidL", 12), ("RT PAROTID", 13),
        ("Left parotid gland", 12), ("OpticNerve_L", 6), ("Optic Nerve R", 7), ("OpticNrv_R", 7),
        ("Chiasm", 8), ("Opt_Chiasma", 8), ("SpinalCord", 20), ("Spinal Cord", 20), ("Cord", 20),
        ("TMJ_L", 18), ("Temporomandibular Joint R", 19), ("Middle ear L", 16), ("Mandible", MANDIBLE),
        ("Mandible_R", 22), ("Brainstem_PRV", None), ("SpinalCord+5mm", None), ("PTV70", None), ("Eye", None),
        ("Parotid L R", None), ("Chiasm_L", None), ("Submandibular_L", None), ("Cochlea_L", None),
    ],
)  # fmt: skip
def test_roi_name_map(name, organ):
    assert match_roi_name(name) == organ


def test_every_structseg_name_maps_to_itself():
    assert all(match_roi_name(n) == i for i, n in ORGAN_NAMES.items())


def test_dicom_ragged_organs_with_holes_round_trip_exactly(tmp_path):
    """Touching ragged blobs (marching-squares saddles) and a ring (inner contour = hole) survive RTSTRUCT."""
    case = make_case(rot_z(15))
    f = ndi.gaussian_filter(np.random.default_rng(1).normal(size=SHAPE), (0.7, 2, 2))
    lab = np.zeros(SHAPE, np.uint8)
    lab[f > 0.08] = 9
    lab[f < -0.08] = 10
    lab[:, 10:30, 10:30] = 20
    lab[:, 14:26, 14:26] = np.where(lab[:, 14:26, 14:26] == 20, 0, lab[:, 14:26, 14:26])
    case.label = lab
    back = read_case(write_case(case, tmp_path, format="dicom"))
    for organ in (9, 10, 20):
        assert dice(back.label == organ, lab == organ) >= 0.9
    np.testing.assert_array_equal(back.label, lab)  # measured: exact (pixel-centre fill of iso-0.5 contours)


def test_hanseg_cropped_mask_and_rewrite(tmp_path):
    case = make_case(FLIP_XY, case_id="case_02")
    root = write_case(case, tmp_path, format="hanseg")
    g = case.geometry
    m = (case.label == 12)[:, 5:35, 2:20]  # Parotid_L inside this box: a Slicer-style cropped .seg.nrrd
    assert m.sum() == (case.label == 12).sum()
    sub = Geometry(g.spacing, tuple(g.index_to_physical([2, 5, 0])[0]), g.direction, m.shape)
    _write_label(m.astype(np.uint8), sub, root / "case_02_OAR_Parotid_L.seg.nrrd")
    np.testing.assert_array_equal(read_case(root).label, restrict(case.label, HANSEG_IDS))
    big = np.zeros((12, 40, 60), np.uint8)  # a super-grid: fine while its organ voxels lie in the image ...
    big[:, 5:35, 2:20] = m
    _write_label(big, Geometry(g.spacing, g.origin, g.direction, big.shape), root / "case_02_OAR_Parotid_L.seg.nrrd")
    np.testing.assert_array_equal(read_case(root).label, restrict(case.label, HANSEG_IDS))
    big[:, :, 50:] = 1  # ... and an error once some fall outside it
    _write_label(big, Geometry(g.spacing, g.origin, g.direction, big.shape), root / "case_02_OAR_Parotid_L.seg.nrrd")
    with pytest.raises(DataError, match=r"Parotid_L\.seg\.nrrd: \d+ labelled voxels lie outside the image"):
        read_case(root)
    case.image[0, 0, 0] = 123  # writing again replaces the folder as a whole
    root = write_case(case, tmp_path, format="hanseg")
    assert read_case(root).image[0, 0, 0] == 123 and sorted(p.name for p in tmp_path.iterdir()) == ["case_02"]


def test_truncated_nrrd_and_dicom_file_path(tmp_path):
    case = make_case()
    root = write_case(case, tmp_path / "p", format="pddca")
    data = (root / "img.nrrd").read_bytes()
    (root / "img.nrrd").write_bytes(data[: len(data) - 2000])
    with pytest.raises(DataError, match=r"img\.nrrd: unreadable image"):
        read_case(root)
    droot = write_case(case, tmp_path / "d", format="dicom")
    image, g = read_image(droot / "ct" / "CT_0003.dcm")  # a file of the series stands for its folder
    np.testing.assert_array_equal(image, case.image)


def test_incomplete_case_folders_are_listed_with_their_problem(tmp_path):
    """A label without its image or an image that is a symlink loop is reported on read, never dropped."""
    for cid in ("a", "noimg", "loop"):
        write_case(make_case(case_id=cid), tmp_path, format="structseg")
    (tmp_path / "noimg" / "data.nii.gz").unlink()
    (tmp_path / "loop" / "data.nii.gz").unlink()
    (tmp_path / "loop" / "data.nii.gz").symlink_to("data.nii.gz")
    (tmp_path / "notes").mkdir()  # no case file at all: ignored (with a warning)
    refs = {r.case_id: r for r in list_cases(tmp_path)}
    assert sorted(refs) == ["a", "loop", "noimg"] and refs["a"].problem is None
    with pytest.raises(DataError, match=r"noimg: no image \(data\.nii\.gz or data\.nii\)"):
        read_case(refs["noimg"])
    with pytest.raises(DataError, match=r"loop/data\.nii\.gz: symbolic link loop"):
        read_case(refs["loop"])
    with pytest.raises(DataError, match=r"noimg: no image"):  # a case folder given directly
        read_case(tmp_path / "noimg")


def test_zero_slice_spacing_in_the_raw_nifti_header(sroot):
    """nibabel and SimpleITK both repair pixdim 0 to 1 mm; the raw header decides."""
    p = sroot / "data.nii.gz"
    raw = gzip.decompress(p.read_bytes())
    h = nib.Nifti1Header(raw[:348], check=False)
    h["pixdim"][3], h["sform_code"], h["qform_code"] = 0, 0, 0
    p.write_bytes(gzip.compress(h.binaryblock + raw[348:]))
    assert sitk.ReadImage(str(p)).GetSpacing()[2] == 1.0  # the repair we must not trust
    with pytest.raises(DataError, match=r"data\.nii\.gz: voxel spacing \(pixdim\) \[0\.9, 1\.1, 0\.0\]"):
        read_case(sroot)
