"""Tests of the procedural head-and-neck phantom against the StructSeg statistics (docs/conventions.md, "Phantom")."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from sepnet.core.errors import DataError
from sepnet.core.organs import NAME_TO_ID, ORGAN_IDS
from sepnet.data.phantom import SIZES, make_case, write_phantom
from sepnet.jobs.cli import main as cli_main

N_SMALL = 3

# StructSeg 2019 means (docs/conventions.md, "Phantom")
VOLUME_CM3 = {
    "Lens_L": 0.27,
    "Lens_R": 0.27,
    "Pituitary": 0.58,
    "Opt_Chiasma": 1.05,
    "Eye_L": 9.1,
    "Eye_R": 9.1,
    "Brain_Stem": 27.0,
    "Temporal_Lobes_L": 106.0,
    "Temporal_Lobes_R": 106.0,
}
MEAN_HU = {
    "Inner_Ear_L": 1043,
    "Inner_Ear_R": 1043,
    "Mandible_L": 734,
    "Mandible_R": 734,
    "T_M_Joint_L": 408,
    "T_M_Joint_R": 408,
    "Brain_Stem": 29,
    "Eye_L": 25,
    "Eye_R": 25,
    "Parotid_Gland_L": 22,
    "Parotid_Gland_R": 22,
}
PAIRS = [(2, 3), (4, 5), (6, 7), (9, 10), (12, 13), (14, 15), (16, 17), (18, 19), (21, 22)]


@pytest.fixture(scope="module")
def small_cases():
    return [make_case(seed=(0, i), size="small") for i in range(N_SMALL)]


def _voxel_cm3(case) -> float:
    return float(np.prod(case.geometry.spacing)) / 1000.0


def _centroid_mm(case, organ: int) -> np.ndarray:
    zyx = np.argwhere(case.label == organ).mean(axis=0)
    return case.geometry.index_to_physical(zyx[::-1])[0]  # (x, y, z) LPS


def test_deterministic_for_a_seed_and_different_across_seeds(small_cases):
    again = make_case(seed=(0, 0), size="small")
    ref = small_cases[0]
    assert np.array_equal(again.image, ref.image) and np.array_equal(again.label, ref.label)
    assert again.geometry == ref.geometry
    other = small_cases[1]
    assert other.image.shape != ref.image.shape or not np.array_equal(other.image, ref.image)
    assert make_case(seed=1, size="tiny").image.tobytes() != make_case(seed=2, size="tiny").image.tobytes()


def test_types_ranges_and_geometry(small_cases):
    for c in small_cases:
        assert c.image.dtype == np.int16 and c.label.dtype == np.uint8
        assert c.image.shape == c.label.shape == c.geometry.shape
        assert c.image.min() >= -1024 and c.image.max() <= 3071
        assert c.label.max() <= 22
        assert c.geometry.direction == (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
        nz, ny, nx = c.image.shape
        assert ny == nx == SIZES["small"].n_xy
        sx, sy, sz = c.geometry.spacing
        assert sx == sy and 1.9 <= sx <= 2.1 and sz == 3.0
        # the organs (hence the head) are centred near physical (0, 0, 0)
        zyx = np.argwhere(c.label > 0).mean(axis=0)
        centre = c.geometry.index_to_physical(zyx[::-1])[0]
        assert np.all(np.abs(centre) < 60.0), centre
        # air outside (corner column) and soft tissue exist: a CT-like histogram
        assert np.median(c.image[:, :4, :4]) < -950
        assert np.mean((c.image > -200) & (c.image < 200)) > 0.1


def test_all_organs_in_every_case(small_cases):
    tiny = [make_case(seed=(7, i), size="tiny") for i in range(2)]
    for c in small_cases + tiny:
        present = set(np.unique(c.label).tolist())
        assert set(ORGAN_IDS) <= present, f"missing {set(ORGAN_IDS) - present}"


def test_tiny_fits_in_one_megabyte():
    c = make_case(seed=0, size="tiny")
    assert c.image.nbytes + c.label.nbytes < 1_000_000


def test_organ_volumes_within_50_percent_of_structseg(small_cases):
    for name, ref in VOLUME_CM3.items():
        k = NAME_TO_ID[name]
        vols = [np.count_nonzero(c.label == k) * _voxel_cm3(c) for c in small_cases]
        assert 0.5 * ref <= np.mean(vols) <= 1.5 * ref, (name, vols, ref)


def test_organ_hu_means_within_30_hu_of_structseg(small_cases):
    for name, ref in MEAN_HU.items():
        k = NAME_TO_ID[name]
        means = [float(c.image[c.label == k].mean()) for c in small_cases]
        assert abs(np.mean(means) - ref) <= 30.0, (name, means, ref)


def test_left_organs_at_plus_x(small_cases):
    for c in small_cases:
        for left, right in PAIRS:
            xl, xr = _centroid_mm(c, left)[0], _centroid_mm(c, right)[0]
            assert xl > xr + 10.0, (left, right, xl, xr)
            assert xl > 0 > xr


def test_noise_is_10_to_20_hu_and_spatially_correlated(small_cases):
    for c in small_cases:
        # interior of the brain stem: one tissue, so what varies is noise (plus a 3 HU texture)
        inner = ndimage.binary_erosion(c.label == 1, iterations=2)
        assert inner.sum() > 200
        v = c.image.astype(np.float64)
        sd = v[inner].std()
        assert 10.0 <= sd <= 20.0, sd
        # correlation of x-neighbours inside the region
        pair = inner[:, :, :-1] & inner[:, :, 1:]
        a = v[:, :, :-1][pair] - v[inner].mean()
        b = v[:, :, 1:][pair] - v[inner].mean()
        corr = float((a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean()))
        assert corr > 0.3, corr


def test_tiny_flat_organs_span_few_slices(small_cases):
    for c in small_cases:
        for k in (4, 5, 6, 7, 8):
            slices = np.count_nonzero((c.label == k).any(axis=(1, 2)))
            assert 1 <= slices <= 4, (k, slices)


def test_partial_volume_along_z(small_cases):
    # the lens (95 HU) against vitreous/fat: the slice above/below the lens shows intermediate HU, and the
    # skull (>1500 HU tables) has voxels at intermediate values in z-neighbours of full-bone voxels
    c = small_cases[0]
    v = c.image.astype(np.float64)
    smooth = ndimage.uniform_filter(v, size=(1, 3, 3))
    bone = smooth > 1400
    near = ndimage.binary_dilation(bone, structure=np.ones((3, 1, 1), bool)) & ~bone
    frac_mid = np.mean((smooth[near] > 300) & (smooth[near] < 1300))
    assert frac_mid > 0.3


def test_write_phantom_skips_existing_and_rejects_unwritable(tmp_path):
    paths = write_phantom(tmp_path / "ds", cases=2, seed=4, size="tiny")
    assert [p.name for p in paths] == ["phantom_000", "phantom_001"]
    stamp = (paths[0] / "data.nii.gz").stat().st_mtime_ns
    again = write_phantom(tmp_path / "ds", cases=3, seed=4, size="tiny")
    assert [p.name for p in again] == ["phantom_000", "phantom_001", "phantom_002"]
    assert (paths[0] / "data.nii.gz").stat().st_mtime_ns == stamp
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="file"):
        write_phantom(blocker / "sub", cases=1, seed=0, size="tiny")
    with pytest.raises(DataError):
        make_case(seed=0, size="huge")


def test_cli_writes_readable_structseg(tmp_path, capsys):
    out = tmp_path / "phantom"
    rc = cli_main(["phantom", str(out), "--cases", "2", "--seed", "11", "--size", "tiny"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "phantom_000" in printed and "phantom_001" in printed
    ref = make_case(seed=(11, 1), size="tiny")
    img = sitk.ReadImage(str(out / "phantom_001" / "data.nii.gz"))
    lab = sitk.ReadImage(str(out / "phantom_001" / "label.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(img), ref.image)
    assert np.array_equal(sitk.GetArrayFromImage(lab), ref.label)
    assert np.allclose(img.GetSpacing(), ref.geometry.spacing) and np.allclose(img.GetOrigin(), ref.geometry.origin)
    # an unwritable target is a one-line user error, exit code 2
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli_main(["phantom", str(blocker / "sub"), "--cases", "1", "--size", "tiny"]) == 2


def test_temporal_lobes_are_brain_tissue_inside_the_skull(small_cases):
    # the lobes are label-only and clipped to the brain: their voxels carry brain HU (WM 26, GM 40, CSF 8,
    # +-10 per case), never the skull (>= 650) or the air of the sinuses
    for c in small_cases:
        for name in ("Temporal_Lobes_L", "Temporal_Lobes_R"):
            v = c.image[c.label == NAME_TO_ID[name]].astype(np.float64)
            assert 5.0 <= np.median(v) <= 45.0, (name, np.median(v))
            assert -60.0 <= np.percentile(v, 1) and np.percentile(v, 99) <= 150.0, (name, np.percentile(v, [1, 99]))


def test_couch_lies_posterior_to_the_head(small_cases):
    # foam cushion (-900 HU) then a couch plate (-350 HU core, 350 HU skins), all behind (+y of) the labels
    for c in small_cases:
        last_labelled_row = int(np.nonzero((c.label > 0).any(axis=(0, 2)))[0].max())
        rows = np.median(c.image[:, last_labelled_row + 1 :, 40:88], axis=(0, 2))  # per y row, central columns
        foam = np.nonzero(np.abs(rows + 900.0) <= 20.0)[0]
        plate = np.nonzero(np.abs(rows + 350.0) <= 20.0)[0]
        assert foam.size >= 3 and foam.max() - foam.min() == foam.size - 1, rows  # one contiguous cushion
        plate = plate[plate > foam.max()]
        assert plate.size >= 2 and plate.max() - foam.max() <= 8, rows  # the 10 mm plate right behind it
