from __future__ import annotations

import numpy as np
import pytest

from sepnet.core.organs import (
    COMMON7,
    NAME_TO_ID,
    NUM_CLASSES,
    ORGAN_IDS,
    SMALL_ORGANS,
    STRUCTSEG22,
    SUBSETS,
    OrganSubset,
)


def test_small_organs_are_the_papers_eight():
    # Table 2 caption: lens, optical nerves, optical chiasma, pituitary and inner ears
    names = {"Lens_L", "Lens_R", "Opt_Nerve_L", "Opt_Nerve_R", "Opt_Chiasma", "Pituitary", "Inner_Ear_L",
             "Inner_Ear_R"}
    assert set(SMALL_ORGANS) == {NAME_TO_ID[n] for n in names}
    assert len(SMALL_ORGANS) == 8


def test_common7_is_the_papers_mixed_dataset_subset():
    assert COMMON7.num_classes == 8 and SUBSETS["common7"] is COMMON7
    assert COMMON7.class_names == ("background", "Brain_Stem", "Opt_Nerve_L", "Opt_Nerve_R", "Opt_Chiasma",
                                   "Parotid_Gland_L", "Parotid_Gland_R", "Mandible")
    labels = np.array([[0, 1, 2, 4, 6, 7, 8, 12, 13, 21, 22, 20]], dtype=np.uint8)
    sub = COMMON7.to_subset(labels)
    assert sub.dtype == np.uint8
    assert sub.tolist() == [[0, 1, 0, 0, 2, 3, 4, 5, 6, 7, 7, 0]]  # eye, lens, cord -> background
    # back to StructSeg ids: the merged mandible becomes its first id (21)
    assert COMMON7.from_subset(sub).tolist() == [[0, 1, 0, 0, 6, 7, 8, 12, 13, 21, 21, 0]]


def test_full_subset_is_the_identity():
    assert STRUCTSEG22.num_classes == NUM_CLASSES
    ids = np.arange(NUM_CLASSES, dtype=np.uint8)
    assert np.array_equal(STRUCTSEG22.to_subset(ids), ids)
    assert np.array_equal(STRUCTSEG22.from_subset(ids), ids)


def test_round_trip_of_a_custom_subset_and_annotated_classes():
    sub = OrganSubset.of([2, 3, 4, 5], name="eyes")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, NUM_CLASSES, size=(3, 5, 5))
    inside = np.isin(labels, [2, 3, 4, 5])
    back = sub.from_subset(sub.to_subset(labels))
    assert np.array_equal(back[inside], labels[inside]) and not back[~inside].any()
    # a dataset without lenses: background always annotated, eyes yes, lenses no
    assert sub.annotated_classes([1, 2, 3]).tolist() == [True, True, True, False, False]
    assert sub.annotated_classes(None).all()
    # a merged class needs all its ids annotated
    assert COMMON7.annotated_classes([i for i in ORGAN_IDS if i != 22])[-1] == False  # noqa: E712


def test_subset_errors():
    with pytest.raises(ValueError, match="unknown StructSeg id 30"):
        OrganSubset("bad", (("X", (30,)),))
    with pytest.raises(ValueError, match="in two classes"):
        OrganSubset("bad", (("A", (1,)), ("B", (1, 2))))
    with pytest.raises(ValueError, match="must lie in"):
        COMMON7.to_subset(np.array([23]))
    with pytest.raises(ValueError, match="must lie in"):
        COMMON7.from_subset(np.array([8]))


def test_lr_pairs_follow_the_class_names():
    from sepnet.core.inference import STRUCTSEG_LR_PAIRS
    from sepnet.core.organs import COMMON7, ORGAN_NAMES, STRUCTSEG22

    # 22 organs: the 9 StructSeg left/right pairs (Eye, Lens, Opt_Nerve, Parotid, Inner_Ear, Mid_Ear,
    # TM_Joint, Temporal_Lobe, Mandible halves), each (left id, right id) by name
    assert len(STRUCTSEG22.lr_pairs) == 9 and STRUCTSEG_LR_PAIRS == STRUCTSEG22.lr_pairs
    for a, b in STRUCTSEG22.lr_pairs:
        assert ORGAN_NAMES[a].endswith("_L") and ORGAN_NAMES[b] == ORGAN_NAMES[a][:-2] + "_R"
    # COMMON7: optic nerves (2, 3) and parotids (5, 6); the merged Mandible pairs with nothing
    assert COMMON7.lr_pairs == ((2, 3), (5, 6))
