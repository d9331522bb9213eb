"""StructSeg 2019 Task 1 organ table (method-notes section 1).

Label id 0 is background; label maps are uint8. ``_L`` is the patient's left = +x in LPS.
"""

from __future__ import annotations

import numpy as np

# id -> (name, importance weight)
ORGANS: dict[int, tuple[str, int]] = {
    1: ("Brain_Stem", 100),
    2: ("Eye_L", 100),
    3: ("Eye_R", 100),
    4: ("Lens_L", 50),
    5: ("Lens_R", 50),
    6: ("Opt_Nerve_L", 80),
    7: ("Opt_Nerve_R", 80),
    8: ("Opt_Chiasma", 50),
    9: ("Temporal_Lobes_L", 80),
    10: ("Temporal_Lobes_R", 80),
    11: ("Pituitary", 80),
    12: ("Parotid_Gland_L", 50),
    13: ("Parotid_Gland_R", 50),
    14: ("Inner_Ear_L", 70),
    15: ("Inner_Ear_R", 70),
    16: ("Mid_Ear_L", 70),
    17: ("Mid_Ear_R", 70),
    18: ("T_M_Joint_L", 60),
    19: ("T_M_Joint_R", 60),
    20: ("Spinal_Cord", 100),
    21: ("Mandible_L", 100),
    22: ("Mandible_R", 100),
}

NUM_ORGANS = 22
NUM_CLASSES = NUM_ORGANS + 1  # with background
ORGAN_IDS: tuple[int, ...] = tuple(ORGANS)
ORGAN_NAMES: dict[int, str] = {i: n for i, (n, _) in ORGANS.items()}
NAME_TO_ID: dict[str, int] = {n: i for i, n in ORGAN_NAMES.items()}
WEIGHTS: dict[int, int] = {i: w for i, (_, w) in ORGANS.items()}

# Organs the paper calls small (Table 2's "small organ" average): lens, optic nerves, chiasm, pituitary.
SMALL_ORGANS: tuple[int, ...] = (4, 5, 6, 7, 8, 11)


def weighted_mean(values: dict[int, float]) -> float:
    """StructSeg importance-weighted mean: sum(w_i * m_i) / sum(w_i) over organs with finite values.

    values: organ id -> metric (DSC or HD95). NaN entries (not annotated / undefined) are skipped.
    """
    num = den = 0.0
    for organ, v in values.items():
        if v is None or not np.isfinite(v):
            continue
        num += WEIGHTS[organ] * float(v)
        den += WEIGHTS[organ]
    return num / den if den else float("nan")
