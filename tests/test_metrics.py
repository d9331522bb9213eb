"""Metrics against hand-computed values and against medpy (pooled HD95, ASSD) and MONAI (max HD95)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from medpy.metric import binary as medpy_binary
from monai.metrics import compute_hausdorff_distance

from sepnet.core.errors import DataError
from sepnet.core.organs import WEIGHTS
from sepnet.evaluation.metrics import (
    Flag,
    OrganMetrics,
    assd,
    dice,
    evaluate_case,
    hausdorff,
    metrics_table,
    surface_distances,
    to_rows,
)

ANISO = (3.0, 1.0, 1.0)


def ellipsoid(shape, centre, radii_mm, spacing=ANISO):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (
        ((z - centre[0]) * spacing[0] / radii_mm[0]) ** 2
        + ((y - centre[1]) * spacing[1] / radii_mm[1]) ** 2
        + ((x - centre[2]) * spacing[2] / radii_mm[2]) ** 2
    ) <= 1.0


def monai_hd(a, b, spacing, percentile=95):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = compute_hausdorff_distance(
            torch.from_numpy(a)[None, None].float(),
            torch.from_numpy(b)[None, None].float(),
            percentile=percentile,
            spacing=spacing,
        )
    return float(t.item())


# ----------------------------------------------------------------------------------------- hand-computed


def two_cubes():
    """3x3x3 cubes, B five slices above A. Boundary = 26 voxels (all but the centre).

    With z spacing 3 mm, each boundary voxel of A is nearest to B's bottom face straight above it:
    9 voxels at 15 mm (A's bottom), 8 at 12 mm (middle ring), 9 at 9 mm (A's top); B->A symmetric.
    """
    a = np.zeros((12, 5, 5), bool)
    b = np.zeros_like(a)
    a[2:5, 1:4, 1:4] = True
    b[7:10, 1:4, 1:4] = True
    return a, b


def test_two_cubes_hand_computed_mm():
    a, b = two_cubes()
    d_ab, d_ba = surface_distances(a, b, spacing_zyx=ANISO)
    assert sorted(d_ab.tolist()) == [9.0] * 9 + [12.0] * 8 + [15.0] * 9
    assert sorted(d_ba.tolist()) == sorted(d_ab.tolist())
    for conv in ("max", "pooled"):
        assert hausdorff(a, b, spacing_zyx=ANISO, convention=conv) == pytest.approx(15.0, abs=1e-12)
    # linear interpolation: directed, rank 0.34 * 25 = 8.5 -> between 9 and 12; pooled rank 0.34 * 51 = 17.34
    assert hausdorff(a, b, spacing_zyx=ANISO, percentile=34) == pytest.approx(10.5, abs=1e-12)
    assert hausdorff(a, b, spacing_zyx=ANISO, percentile=34, convention="pooled") == pytest.approx(10.02, abs=1e-12)
    assert assd(a, b, spacing_zyx=ANISO) == pytest.approx((81 + 96 + 135) / 26, abs=1e-12)  # = 12 mm
    assert dice(a, b) == 0.0


def test_max_and_pooled_differ_on_asymmetric_masks():
    # one voxel vs a 10-voxel line along x at 2 mm; in a (1, 1, 10) grid every voxel is a boundary voxel.
    a = np.zeros((1, 1, 10), bool)
    b = np.ones((1, 1, 10), bool)
    a[0, 0, 0] = True
    sp = (3.0, 1.0, 2.0)
    # A->B: [0]; B->A: 0, 2, ..., 18
    assert hausdorff(a, b, spacing_zyx=sp, convention="max") == pytest.approx(16 + 0.55 * 2, abs=1e-12)  # 17.1
    assert hausdorff(a, b, spacing_zyx=sp, convention="pooled") == pytest.approx(17.0, abs=1e-12)
    assert hausdorff(a, b, spacing_zyx=sp, percentile=100) == pytest.approx(18.0)
    assert assd(a, b, spacing_zyx=sp) == pytest.approx(90 / 11, abs=1e-12)
    assert dice(a, b) == pytest.approx(2 / 11)


def test_sphere_shifted_one_slice_is_three_mm():
    # every boundary voxel p of A has p + (1, 0, 0) on B's boundary (3 mm away), so HD <= 3 mm; about a
    # third of the distances are exactly 3 mm, so the 95th percentile is 3.0 in both conventions.
    a = ellipsoid((20, 30, 30), (9.5, 14.5, 14.5), (10.0, 10.0, 10.0))
    b = np.roll(a, 1, axis=0)
    for conv in ("max", "pooled"):
        assert hausdorff(a, b, spacing_zyx=ANISO, convention=conv) == 3.0
        assert hausdorff(a, b, spacing_zyx=ANISO, convention=conv, percentile=100) == 3.0
    assert medpy_binary.hd95(a, b, voxelspacing=ANISO) == 3.0
    assert 0.0 < assd(a, b, spacing_zyx=ANISO) < 3.0


def test_identity_is_zero():
    a = ellipsoid((12, 20, 20), (6, 10, 9), (12.0, 7.0, 5.0))
    assert dice(a, a) == 1.0
    assert hausdorff(a, a, spacing_zyx=ANISO) == 0.0
    assert hausdorff(a, a, spacing_zyx=ANISO, convention="pooled") == 0.0
    assert assd(a, a, spacing_zyx=ANISO) == 0.0


def test_dice_hand_computed():
    a = np.zeros((2, 2, 4), bool)
    b = np.zeros_like(a)
    a[0, 0, :3] = True  # 3 voxels
    b[0, 0, 1:] = True  # 3 voxels, 2 shared
    assert dice(a, b) == pytest.approx(4 / 6)


# ----------------------------------------------------------------------------------------- peers


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_equals_medpy_pooled_and_monai_max(seed):
    rng = np.random.default_rng(seed)
    shape = (16, 40, 40)
    a = ellipsoid(shape, rng.uniform([5, 12, 12], [10, 28, 28]), rng.uniform([6, 5, 5], [15, 12, 12]))
    b = ellipsoid(shape, rng.uniform([5, 12, 12], [10, 28, 28]), rng.uniform([6, 5, 5], [15, 12, 12]))
    assert a.any() and b.any()
    ours_pooled = hausdorff(a, b, spacing_zyx=ANISO, convention="pooled")
    ours_max = hausdorff(a, b, spacing_zyx=ANISO, convention="max")
    assert abs(ours_pooled - medpy_binary.hd95(a, b, voxelspacing=ANISO)) <= 1e-6
    assert abs(ours_max - monai_hd(a, b, ANISO)) <= 1e-4
    assert abs(assd(a, b, spacing_zyx=ANISO) - medpy_binary.assd(a, b, voxelspacing=ANISO)) <= 1e-6


def test_masks_touching_the_array_border_match_medpy():
    # the crop must treat outside-the-array as background exactly as medpy's erosion does
    shape = (10, 24, 24)
    a = ellipsoid(shape, (0, 12, 23), (15.0, 9.0, 9.0))  # clipped by z = 0 and x = 23 faces
    b = ellipsoid(shape, (2, 10, 20), (12.0, 8.0, 8.0))
    sp = (2.5, 0.8, 1.2)
    assert abs(hausdorff(a, b, spacing_zyx=sp, convention="pooled") - medpy_binary.hd95(a, b, voxelspacing=sp)) < 1e-6
    assert abs(hausdorff(a, b, spacing_zyx=sp) - monai_hd(a, b, sp)) < 1e-4
    assert abs(assd(a, b, spacing_zyx=sp) - medpy_binary.assd(a, b, voxelspacing=sp)) < 1e-6


# ----------------------------------------------------------------------------------------- empty masks


def test_empty_masks_binary_functions():
    e = np.zeros((4, 5, 6), bool)
    a = e.copy()
    a[1:3, 1:3, 1:3] = True
    assert dice(e, e) == 1.0
    assert hausdorff(e, e, spacing_zyx=ANISO) == 0.0
    assert assd(e, e, spacing_zyx=ANISO) == 0.0
    for p, r in ((e, a), (a, e)):
        assert dice(p, r) == 0.0
        assert math.isnan(hausdorff(p, r, spacing_zyx=ANISO))
        assert math.isnan(hausdorff(p, r, spacing_zyx=ANISO, convention="pooled"))
        assert math.isnan(assd(p, r, spacing_zyx=ANISO))
        assert surface_distances(p, r, spacing_zyx=ANISO) is None


def test_evaluate_case_flags_every_empty_case():
    ref = np.zeros((6, 10, 10), np.uint8)
    pred = np.zeros_like(ref)
    ref[1:3, 1:4, 1:4] = 1  # organ 1: present in ref, missed  -> pred_empty
    pred[3:5, 5:8, 5:8] = 2  # organ 2: predicted, absent in ref -> ref_empty
    # organ 3: absent in both -> both_empty; organ 4: not annotated (but predicted)
    pred[0, 8:10, 8:10] = 4
    res = {m.organ: m for m in evaluate_case(pred, ref, spacing_zyx=ANISO, organs=(1, 2, 3, 4), annotated=(1, 2, 3))}
    v = 3.0 / 1000  # cm3 per voxel
    m1, m2, m3, m4 = res[1], res[2], res[3], res[4]
    assert m1.flag == Flag.PRED_EMPTY and m1.dice == 0.0 and math.isnan(m1.hd95) and math.isnan(m1.assd)
    assert m1.vol_pred_cm3 == 0.0 and m1.vol_ref_cm3 == pytest.approx(18 * v)
    assert m2.flag == Flag.REF_EMPTY and m2.dice == 0.0 and math.isnan(m2.hd95) and math.isnan(m2.assd)
    assert m2.vol_pred_cm3 == pytest.approx(18 * v) and m2.vol_ref_cm3 == 0.0
    assert m3.flag == Flag.BOTH_EMPTY and (m3.dice, m3.hd95, m3.assd) == (1.0, 0.0, 0.0)
    assert m4.flag == Flag.NOT_ANNOTATED and math.isnan(m4.dice) and math.isnan(m4.hd95) and math.isnan(m4.vol_ref_cm3)
    assert m4.vol_pred_cm3 == pytest.approx(4 * v)
    # an entirely empty pair of maps does not crash either
    flags = {m.flag for m in evaluate_case(np.zeros_like(ref), np.zeros_like(ref), spacing_zyx=ANISO)}
    assert flags == {Flag.BOTH_EMPTY}


# ----------------------------------------------------------------------------------------- label maps


def three_organ_case(seed=0):
    rng = np.random.default_rng(seed)
    shape = (14, 48, 48)
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for organ, c, r in (
        (1, (6, 12, 12), (12.0, 8.0, 7.0)),
        (4, (5, 30, 34), (6.0, 4.0, 4.0)),
        (20, (9, 33, 12), (9, 9, 6)),
    ):
        ref[ellipsoid(shape, c, r)] = organ
        c2 = np.asarray(c, float) + rng.normal(0, [0.4, 1.0, 1.0])
        pred[ellipsoid(shape, c2, np.asarray(r) * rng.uniform(0.85, 1.15, 3))] = organ
    pred[0, 47, 47] = 1  # a far-away stray voxel of organ 1, at the array corner
    return pred, ref


def test_evaluate_case_equals_binary_functions_and_peers():
    pred, ref = three_organ_case()
    res = evaluate_case(pred, ref, spacing_zyx=ANISO, organs=(1, 4, 20))
    assert [m.organ for m in res] == [1, 4, 20]
    assert [m.name for m in res] == ["Brain_Stem", "Lens_L", "Spinal_Cord"]
    for m in res:
        p, r = pred == m.organ, ref == m.organ
        assert m.flag == Flag.OK
        assert m.dice == pytest.approx(2 * np.sum(p & r) / (p.sum() + r.sum()), abs=1e-12)
        assert abs(m.hd95 - monai_hd(p, r, ANISO)) < 1e-4
        assert abs(m.assd - medpy_binary.assd(p, r, voxelspacing=ANISO)) < 1e-6
        assert m.vol_pred_cm3 == pytest.approx(p.sum() * 3.0 / 1000)
        assert m.vol_ref_cm3 == pytest.approx(r.sum() * 3.0 / 1000)
    pooled = evaluate_case(pred, ref, spacing_zyx=ANISO, organs=(1, 4, 20), convention="pooled")
    for m in pooled:
        p, r = pred == m.organ, ref == m.organ
        assert abs(m.hd95 - medpy_binary.hd95(p, r, voxelspacing=ANISO)) < 1e-6
    # the stray corner voxel of organ 1 stretches its box to the array corner; the full HD sees it
    hd100 = evaluate_case(pred, ref, spacing_zyx=ANISO, organs=(1,), percentile=100)[0].hd95
    assert hd100 == pytest.approx(monai_hd(pred == 1, ref == 1, ANISO, percentile=100), abs=1e-4)


def test_evaluate_case_rejects_bad_input():
    a = np.zeros((4, 5, 6), np.uint8)
    with pytest.raises(DataError, match=r"\(4, 5, 6\).*\(4, 6, 5\)"):
        evaluate_case(a, np.zeros((4, 6, 5), np.uint8), spacing_zyx=ANISO)
    with pytest.raises(DataError, match="shape"):
        dice(np.zeros((3, 3), bool), np.zeros((3, 4), bool))
    with pytest.raises(ValueError, match="spacing"):
        evaluate_case(a, a, spacing_zyx=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="convention"):
        evaluate_case(a, a, spacing_zyx=ANISO, convention="mean")


# ----------------------------------------------------------------------------------------- aggregation


def om(organ, dice_, hd, flag=Flag.OK):
    return OrganMetrics(organ, str(organ), dice_, hd, hd / 2, 1.0, 1.0, flag)


def test_metrics_table_weighted_by_hand():
    # organ 1 weight 100, organ 4 weight 50, organ 20 weight 100
    assert (WEIGHTS[1], WEIGHTS[4], WEIGHTS[20]) == (100, 50, 100)
    nan = float("nan")
    cases = {
        "a": [om(1, 0.9, 2.0), om(4, 0.6, 4.0), om(20, 0.8, 3.0)],
        "b": [om(1, 0.7, 4.0), om(4, 0.0, nan, Flag.PRED_EMPTY), om(20, nan, nan, Flag.NOT_ANNOTATED)],
    }
    t = metrics_table(cases)
    rows = {r["organ"]: r for r in t["organs"]}
    assert rows[1]["dice_mean"] == pytest.approx(0.8) and rows[1]["dice_std"] == pytest.approx(0.1)
    assert rows[4]["dice_mean"] == pytest.approx(0.3) and rows[4]["hd95_mean"] == pytest.approx(4.0)
    assert rows[4]["n_pred_empty"] == 1 and rows[20]["n_not_annotated"] == 1 and rows[20]["n"] == 1
    assert rows[20]["dice_mean"] == pytest.approx(0.8)
    s = t["summary"]
    assert s["dice_mean"] == pytest.approx((0.8 + 0.3 + 0.8) / 3)
    assert s["dice_weighted"] == pytest.approx((100 * 0.8 + 50 * 0.3 + 100 * 0.8) / 250)
    assert s["hd95_weighted"] == pytest.approx((100 * 3.0 + 50 * 4.0 + 100 * 3.0) / 250)
    case_a = (100 * 0.9 + 50 * 0.6 + 100 * 0.8) / 250
    case_b = (100 * 0.7 + 50 * 0.0) / 150
    assert s["dice_weighted_case_mean"] == pytest.approx((case_a + case_b) / 2)
    assert s["dice_weighted_case_std"] == pytest.approx(abs(case_a - case_b) / 2)
    # with a penalty the missed organ's HD95 counts as that many mm
    t2 = metrics_table(cases, hd_penalty_mm=100.0)
    assert {r["organ"]: r for r in t2["organs"]}[4]["hd95_mean"] == pytest.approx(52.0)
    assert t2["summary"]["hd95_weighted_case_mean"] == pytest.approx(
        ((100 * 2 + 50 * 4 + 100 * 3) / 250 + (100 * 4 + 50 * 100) / 150) / 2
    )


def test_metrics_table_counts_missed_organs_beside_the_hd_mean():
    # the lens is missed and the brain stem absent in both: the weighted HD95 is 0.0 mm only because the
    # missed lens is not in it, so the summary says one organ was missed
    nan = float("nan")
    t = metrics_table({"a": [om(4, 0.0, nan, Flag.PRED_EMPTY), om(1, 1.0, 0.0, Flag.BOTH_EMPTY)]})
    s = t["summary"]
    assert s["hd95_weighted"] == 0.0 and s["missed"] == 1
    both = metrics_table({"a": [om(4, 0.0, nan, Flag.PRED_EMPTY)], "b": [om(4, 0.0, nan, Flag.PRED_EMPTY),
                                                                          om(2, 0.0, nan, Flag.REF_EMPTY)]})
    assert both["summary"]["missed"] == 2  # ref_empty is a false positive, not a miss


def test_to_rows_flat_and_flag_strings():
    rows = to_rows({"c1": [om(1, 0.5, 2.0), om(2, 0.0, float("nan"), Flag.REF_EMPTY)]})
    assert [r["case"] for r in rows] == ["c1", "c1"]
    assert rows[1]["flag"] == "ref_empty" and type(rows[1]["flag"]) is str
    assert set(rows[0]) == {"case", "organ", "name", "dice", "hd95", "assd", "vol_pred_cm3", "vol_ref_cm3", "flag"}


def test_thin_diagonal_tubes_match_medpy_and_monai():
    # a diagonal tube fills little of its box: the sparse-boundary (KD-tree) path must agree too
    shape = (12, 40, 40)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    a = ((y - x) ** 2 <= 2) & (np.abs(z * 3.0 - 18) <= 4)
    b = ((y - x - 3) ** 2 <= 2) & (np.abs(z * 3.0 - 20) <= 6)
    assert a.size > 8 * np.count_nonzero(a)  # sparse
    assert (
        abs(hausdorff(a, b, spacing_zyx=ANISO, convention="pooled") - medpy_binary.hd95(a, b, voxelspacing=ANISO))
        < 1e-6
    )
    assert abs(hausdorff(a, b, spacing_zyx=ANISO) - monai_hd(a, b, ANISO)) < 1e-4
    assert abs(assd(a, b, spacing_zyx=ANISO) - medpy_binary.assd(a, b, voxelspacing=ANISO)) < 1e-6


def test_edt_and_kdtree_paths_agree(monkeypatch):
    import sepnet.evaluation.metrics as metrics_module

    pred, ref = three_organ_case(seed=4)
    results = []
    for ratio in (0, 10**12):  # always KD-tree, never KD-tree
        monkeypatch.setattr(metrics_module, "_KD_RATIO", ratio)
        results.append(evaluate_case(pred, ref, spacing_zyx=ANISO, organs=(1, 4, 20)))
    for kd, edt in zip(*results):
        assert kd.hd95 == pytest.approx(edt.hd95, abs=1e-9) and kd.assd == pytest.approx(edt.assd, abs=1e-9)


def test_scattered_noise_masks_match_medpy():
    # many tiny components, voxels on every array face: a stress test of boundary and cropping
    rng = np.random.default_rng(7)
    a = rng.random((8, 30, 40)) < 0.3
    b = rng.random((8, 30, 40)) < 0.05
    sp = (3.0, 1.5, 0.7)
    assert hausdorff(a, b, spacing_zyx=sp, convention="pooled") == pytest.approx(
        medpy_binary.hd95(a, b, voxelspacing=sp), abs=1e-6
    )
    assert assd(a, b, spacing_zyx=sp) == pytest.approx(medpy_binary.assd(a, b, voxelspacing=sp), abs=1e-6)
