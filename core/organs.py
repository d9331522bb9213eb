"""StructSeg 2019 Task 1 organ table (docs/conventions.md).

Label id 0 is background; label maps are uint8. ``_L`` is the patient's left = +x in LPS.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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

# Organs the paper calls small (Table 2 caption: "lens, optical nerves, optical chiasma, pituitary and
# inner ears"; its small-organ average is over these 8).
SMALL_ORGANS: tuple[int, ...] = (4, 5, 6, 7, 8, 11, 14, 15)


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


@dataclass(frozen=True)
class OrganSubset:
    """The organs a study segments: class k (1..K) is the union of the StructSeg ids ``classes[k-1][1]``.

    ``classes``: ((name, (StructSeg id, ...)), ...); class 0 is background, so ``num_classes = K + 1``.
    StructSeg organs outside the subset map to background. A class made of several ids (the paper's
    whole mandible = 21 + 22) maps back to its first id (the split is lost).
    """

    name: str
    classes: tuple[tuple[str, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        seen: set[int] = set()
        for cname, ids in self.classes:
            for i in ids:
                if i not in ORGANS:
                    raise ValueError(f"organ subset {self.name}: class {cname} names unknown StructSeg id {i}")
                if i in seen:
                    raise ValueError(f"organ subset {self.name}: StructSeg id {i} is in two classes")
                seen.add(i)
            if not ids:
                raise ValueError(f"organ subset {self.name}: class {cname} has no StructSeg id")

    @classmethod
    def of(cls, ids: Iterable[int], *, name: str = "custom") -> OrganSubset:
        """One class per StructSeg id, in the order given (e.g. ``OrganSubset.of(ORGAN_IDS)``)."""
        return cls(name, tuple((ORGAN_NAMES[int(i)], (int(i),)) for i in ids))

    @property
    def num_classes(self) -> int:
        return len(self.classes) + 1

    @property
    def class_names(self) -> tuple[str, ...]:
        return ("background", *(n for n, _ in self.classes))

    @property
    def lr_pairs(self) -> tuple[tuple[int, int], ...]:
        """Class index pairs (left, right) whose channels swap under a left-right mirror: classes named
        ``<organ>_L`` / ``<organ>_R`` (a merged class such as COMMON7's Mandible pairs with nothing)."""
        index = {n: k for k, n in enumerate(self.class_names)}
        return tuple((k, index[n[:-2] + "_R"]) for n, k in index.items()
                     if n.endswith("_L") and n[:-2] + "_R" in index)

    def lut(self) -> np.ndarray:
        """(NUM_CLASSES,) uint8: StructSeg label -> subset class index (0 outside the subset)."""
        out = np.zeros(NUM_CLASSES, dtype=np.uint8)
        for k, (_, ids) in enumerate(self.classes, start=1):
            out[list(ids)] = k
        return out

    def inverse_lut(self) -> np.ndarray:
        """(num_classes,) uint8: subset class index -> StructSeg label (a class's first id; 0 -> 0)."""
        return np.asarray([0, *(ids[0] for _, ids in self.classes)], dtype=np.uint8)

    def to_subset(self, labels: np.ndarray) -> np.ndarray:
        """StructSeg label map (any int dtype, values 0..22) -> subset class map (uint8, same shape)."""
        labels = np.asarray(labels)
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= NUM_CLASSES):
            raise ValueError(f"labels must lie in [0, {NUM_CLASSES}), got [{int(labels.min())}, {int(labels.max())}]")
        return self.lut()[labels]

    def from_subset(self, classes: np.ndarray) -> np.ndarray:
        """Subset class map (values 0..num_classes-1) -> StructSeg label map (uint8, same shape)."""
        classes = np.asarray(classes)
        if classes.size and (int(classes.min()) < 0 or int(classes.max()) >= self.num_classes):
            raise ValueError(f"subset classes must lie in [0, {self.num_classes}), got "
                             f"[{int(classes.min())}, {int(classes.max())}]")
        return self.inverse_lut()[classes]

    def annotated_classes(self, annotated_ids: Iterable[int] | None) -> np.ndarray:
        """(num_classes,) bool: which subset classes a case annotates, given its annotated StructSeg ids
        (None = all). Background is always annotated; a class needs all of its ids annotated."""
        out = np.ones(self.num_classes, dtype=bool)
        if annotated_ids is None:
            return out
        ann = {int(i) for i in annotated_ids}
        for k, (_, ids) in enumerate(self.classes, start=1):
            out[k] = all(i in ann for i in ids)
        return out


# All 22 StructSeg organs (23 classes), and the paper's mixed-dataset study (Sec. 4.2): the 7 organs
# annotated in StructSeg, PDDCA and its local set, with one whole mandible -> 8 classes.
STRUCTSEG22 = OrganSubset.of(ORGAN_IDS, name="structseg22")
COMMON7 = OrganSubset("common7", (
    ("Brain_Stem", (1,)),
    ("Opt_Nerve_L", (6,)),
    ("Opt_Nerve_R", (7,)),
    ("Opt_Chiasma", (8,)),
    ("Parotid_Gland_L", (12,)),
    ("Parotid_Gland_R", (13,)),
    ("Mandible", (21, 22)),
))
SUBSETS: dict[str, OrganSubset] = {s.name: s for s in (STRUCTSEG22, COMMON7)}
