from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sepnet.core.ensemble import vote_entropy
from sepnet.evaluation.uncertainty import (
    UncertaintyCounts,
    error_counts,
    error_rate_trend,
    fit_line,
    pool,
    vvc_dice_fit,
    vvc_dice_table,
)

# One constructed case, 11 voxels in a row, 3 members. Levels of 3 voters: L0 = 0 (3), L1 = 0.6365 (2:1),
# L2 = 1.0986 (1:1:1).
#          voxel:  0  1  2  3  4  5  6  7  8  9 10
MEMBERS = [
    [0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    [0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0],
    [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 0],
]
FUSED = [0, 0, 1, 1, 1, 1, 0, 0, 2, 0, 0]
REF = [0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 0]
# level:   0  0  0  0  1  1  1  1  2  2  0
# error:   -  x  -  x  -  x  x  -  x  -  -
# region:  b  b  o  o  o  o  b  b  o  b  b   (b = predicted background, o = predicted organ)
HAND = {
    "whole": {"voxels": [5, 4, 2], "errors": [2, 2, 1]},
    "background": {"voxels": [3, 2, 1], "errors": [1, 1, 0]},
    "organs": {"voxels": [2, 2, 1], "errors": [1, 1, 1]},
}


def _case(shape=(1, 1, 11)):
    members = np.array(MEMBERS, dtype=np.uint8).reshape(3, *shape)
    return members, np.array(FUSED, np.uint8).reshape(shape), np.array(REF, np.uint8).reshape(shape)


def test_error_counts_hand_counted():
    members, fused, ref = _case()
    c = error_counts(fused, ref, vote_entropy(members), n_members=3)
    for r, d in HAND.items():
        np.testing.assert_array_equal(c.voxels[r], d["voxels"])
        np.testing.assert_array_equal(c.errors[r], d["errors"])
    rows = {(row["region"], row["level"]): row for row in c.table()}
    assert rows[("whole", 1)]["error_rate"] == pytest.approx(2 / 5)
    assert rows[("whole", 2)]["error_rate"] == pytest.approx(2 / 4)
    assert rows[("organs", 3)]["error_rate"] == pytest.approx(1.0)
    assert rows[("background", 3)]["error_rate"] == pytest.approx(0.0)
    assert rows[("whole", 1)]["error_share"] == pytest.approx(2 / 5)
    assert rows[("whole", 3)]["error_share"] == pytest.approx(1 / 5)
    assert rows[("background", 1)]["error_share"] == pytest.approx(1 / 2)
    assert rows[("organs", 2)]["entropy"] == pytest.approx(0.6365, abs=1e-4)
    assert len(rows) == 9


def test_error_counts_annotated_excludes_unknown_truth():
    members, fused, ref = _case()
    # organ 2 is not annotated: voxel 8 (fused 2) has no known truth and is left out
    c = error_counts(fused, ref, vote_entropy(members), n_members=3, annotated=[1])
    np.testing.assert_array_equal(c.voxels["whole"], [5, 4, 1])
    np.testing.assert_array_equal(c.errors["whole"], [2, 2, 0])
    np.testing.assert_array_equal(c.voxels["organs"], [2, 2, 0])


def test_counts_pool_across_cases_and_round_trip():
    members, fused, ref = _case()
    one = error_counts(fused, ref, vote_entropy(members), n_members=3)
    members2, fused2, ref2 = _case((11, 1, 1))
    total = pool([one, error_counts(fused2, ref2, vote_entropy(members2), n_members=3)])
    np.testing.assert_array_equal(total.voxels["whole"], [10, 8, 4])
    np.testing.assert_array_equal(total.errors["organs"], [2, 2, 2])
    back = UncertaintyCounts.from_dict(total.to_dict())
    np.testing.assert_array_equal(back.errors["background"], total.errors["background"])
    with pytest.raises(ValueError):
        one + UncertaintyCounts(6)
    assert pool([]) is None


def test_error_rate_trend():
    members, fused, ref = _case()
    c = error_counts(fused, ref, vote_entropy(members), n_members=3)
    t = error_rate_trend(c)
    assert t["rate_certain"] == pytest.approx(0.4)
    assert t["rate_uncertain"] == pytest.approx(3 / 6)
    assert t["spearman"] > 0 and t["increases"] is True
    # background region: rates 1/3, 1/2, 0 -> not increasing (spearman -0.5)
    tb = error_rate_trend(c, region="background")
    assert tb["spearman"] == pytest.approx(-0.5)
    assert tb["increases"] is False
    assert error_rate_trend(UncertaintyCounts(3))["increases"] is None


def test_vvc_dice_table_and_fit():
    rows = [
        {"organ_id": 1, "vvc": 0.05, "dice": 0.85},
        {"organ_id": 1, "vvc": 0.15, "dice": 0.95},
        {"organ_id": 1, "vvc": float("nan"), "dice": 0.10},  # skipped
        {"organ_id": 2, "vvc": 0.2, "dice": 0.8},
        {"organ_id": 3, "vvc": 0.3, "dice": 0.7},
        {"organ_id": 4, "vvc": 0.4, "dice": 0.6},
    ]
    table = vvc_dice_table(rows)
    assert [r["organ_id"] for r in table] == [1, 2, 3, 4]
    assert table[0]["vvc"] == pytest.approx(0.1) and table[0]["dice"] == pytest.approx(0.9)
    assert table[0]["n"] == 2 and table[0]["organ"] == "Brain_Stem"
    fit = vvc_dice_fit(table)
    assert fit.slope == pytest.approx(-1.0) and fit.intercept == pytest.approx(1.0)
    assert fit.r == pytest.approx(-1.0) and fit.n == 4


def test_fit_line_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.random(22)
    y = 0.9 - 0.5 * x + 0.05 * rng.standard_normal(22)
    fit = fit_line(x, y)
    assert fit.r == pytest.approx(np.corrcoef(x, y)[0, 1])
    slope, intercept = np.polyfit(x, y, 1)
    assert fit.slope == pytest.approx(slope) and fit.intercept == pytest.approx(intercept)
    assert 0 <= fit.p < 0.05
    assert math.isnan(fit_line([1.0], [2.0]).r)


def test_counts_json_round_trip_keeps_cases_and_pools_them():
    from sepnet.evaluation.uncertainty import counts_from_json, counts_to_json

    a = UncertaintyCounts(2, {"whole": [5, 1], "background": [3, 1], "organs": [2, 0]},
                          {"whole": [1, 1], "background": [0, 1], "organs": [1, 0]})
    b = UncertaintyCounts(2, {"whole": [7, 0], "background": [7, 0], "organs": [0, 0]},
                          {"whole": [2, 0], "background": [2, 0], "organs": [0, 0]})
    d = json.loads(json.dumps(counts_to_json({"c0": a, "c1": b})))
    pooled, cases = counts_from_json(d)
    assert pooled.voxels["whole"].tolist() == [12, 1] and pooled.errors["whole"].tolist() == [3, 1]
    assert cases["c1"].errors["background"].tolist() == [2, 0] and set(cases) == {"c0", "c1"}
    assert counts_to_json({}) == {} and counts_from_json({}) == (None, {})
    # an older file without per-case counts still gives the pooled ones
    pooled, cases = counts_from_json(a.to_dict())
    assert pooled.voxels["whole"].tolist() == [5, 1] and cases == {}
