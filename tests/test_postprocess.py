from __future__ import annotations

import numpy as np
import pytest

from sepnet.core.postprocess import (
    PostprocessDecision,
    apply_postprocessing,
    choose_postprocessing,
    keep_largest_component,
)
from sepnet.evaluation.metrics import dice


def _blob_and_stray():
    ref = np.zeros((6, 10, 10), np.uint8)
    ref[1:4, 2:6, 2:6] = 3  # one 48-voxel organ
    pred = ref.copy()
    pred[5, 9, 9] = 3  # a stray voxel far away
    pred[0, 0, 0] = 5  # another organ, untouched when only 3 is processed
    return pred, ref


def test_keep_largest_removes_a_stray_voxel():
    pred, ref = _blob_and_stray()
    out = keep_largest_component(pred, [3])
    assert out[5, 9, 9] == 0 and out[0, 0, 0] == 5
    assert np.array_equal(out == 3, ref == 3)
    assert pred[5, 9, 9] == 3  # input untouched
    assert out.dtype == pred.dtype


def test_connectivity_6_vs_26():
    lab = np.zeros((3, 3, 3), np.uint8)
    lab[0, 0, 0] = lab[1, 1, 1] = lab[0, 0, 1] = 1  # (1,1,1) touches the pair by a corner/edge only
    assert (keep_largest_component(lab, [1], connectivity=26) == 1).sum() == 3
    six = keep_largest_component(lab, [1], connectivity=6)
    assert (six == 1).sum() == 2 and six[1, 1, 1] == 0
    with pytest.raises(ValueError, match="connectivity"):
        keep_largest_component(lab, [1], connectivity=18)


def test_choice_keeps_it_where_it_helps_and_not_where_the_organ_has_two_parts():
    # organ 3: a blob plus a stray voxel -> postprocessing helps; organ 7: two true components of
    # 8 and 4 voxels, both predicted -> keep-largest would delete a true part -> not chosen
    preds, refs = [], []
    for shift in (0, 1):
        pred, ref = _blob_and_stray()
        ref[1:3, 7 + shift:9 + shift, 0:2] = 7
        ref[4:5, 0:2, 7:9] = 7
        pred[ref == 7] = 7
        preds.append(pred)
        refs.append(ref)
    d = choose_postprocessing(preds, refs, organs=[3, 5, 7])
    assert 3 in d.organs and 7 not in d.organs
    # dice as evaluation.metrics computes it
    hand3 = np.mean([dice(p == 3, r == 3) for p, r in zip(preds, refs)])
    assert d.dice_before[3] == pytest.approx(hand3) and d.dice_after[3] == 1.0
    assert d.dice_after[7] < d.dice_before[7] == 1.0
    # organ 5: a single component (no change) costs nothing -> chosen; Dice 0 before and after
    assert 5 in d.organs and d.dice_before[5] == d.dice_after[5] == 0.0
    out = apply_postprocessing(preds[0], d)
    assert out[5, 9, 9] == 0 and (out == 7).sum() == (preds[0] == 7).sum()
    assert PostprocessDecision.from_dict(d.to_dict()) == d


def test_not_annotated_cases_are_left_out():
    pred, ref = _blob_and_stray()
    empty_ref = np.zeros_like(ref)
    d = choose_postprocessing([pred, pred], [ref, empty_ref], organs=[3], annotated=[None, [1, 2]])
    assert d.cases == {3: 1} and d.organs == (3,)
    d = choose_postprocessing([pred], [empty_ref], organs=[3], annotated=[[1]])
    assert d.organs == () and d.cases == {}


def test_errors():
    with pytest.raises(ValueError, match="predictions but"):
        choose_postprocessing([np.zeros((2, 2, 2))], [], organs=[1])
    with pytest.raises(ValueError, match="differ in shape"):
        choose_postprocessing([np.zeros((2, 2, 2))], [np.zeros((2, 2, 3))], organs=[1])
    with pytest.raises(ValueError, match=r"\(Z, Y, X\)"):
        keep_largest_component(np.zeros((2, 2)), [1])
