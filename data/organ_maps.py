"""Organ-name maps from other datasets and clinical RTSTRUCT ROI names to StructSeg 2019 ids.

StructSeg ids are those of :mod:`sepnet.core.organs` (1..22). ``_L`` is the patient's left = +x in LPS.

PDDCA (MICCAI 2015) structure file -> StructSeg id
    ============== ================================
    BrainStem      1  Brain_Stem
    Chiasm         8  Opt_Chiasma
    OpticNerve_L   6  Opt_Nerve_L
    OpticNerve_R   7  Opt_Nerve_R
    Parotid_L      12 Parotid_Gland_L
    Parotid_R      13 Parotid_Gland_R
    Mandible       21 + 22, split at the midline (see :func:`split_mandible`)
    Submandibular_L/R  not a StructSeg organ: ignored
    ============== ================================

HaN-Seg 2023 OAR file (``<case>_OAR_<Name>.seg.nrrd``) -> StructSeg id
    ============== ================================
    Brainstem      1  Brain_Stem
    Eye_AL, Eye_PL 2  Eye_L (union of the anterior and posterior segments)
    Eye_AR, Eye_PR 3  Eye_R
    OpticNrv_L     6  Opt_Nerve_L
    OpticNrv_R     7  Opt_Nerve_R
    OpticChiasm    8  Opt_Chiasma
    Pituitary      11 Pituitary
    Parotid_L      12 Parotid_Gland_L
    Parotid_R      13 Parotid_Gland_R
    SpinalCord     20 Spinal_Cord
    Bone_Mandible  21 + 22, split at the midline
    ============== ================================
    Not mapped (no StructSeg counterpart, so those organs are *not annotated* in a HaN-Seg case):
    A_Carotid_L/R, Arytenoid, BuccalMucosa, Cavity_Oral, Cricopharyngeus, Esophagus_S, Glnd_Lacrimal_L/R,
    Glnd_Submand_L/R, Glnd_Thyroid, Glottis, Larynx_SG, Lips, and **Cochlea_L/R**: the cochlea is only a
    part of StructSeg's Inner_Ear (cochlea + vestibule + semicircular canals); scoring an inner-ear
    prediction against a cochlea reference would be wrong, so it is left out on purpose.
    HaN-Seg has no lens, middle ear, temporal lobe or TM joint.

RTSTRUCT ROI names are matched by :func:`match_roi_name`: case-insensitive, CamelCase and separators
(space, ``_``, ``-``, ``.``) ignored, the side given by a token ``L``/``Lt``/``Left`` or ``R``/``Rt``/``Right``
anywhere in the name ("Parotid L", "Lt Parotid", "Parotid_Gland_L", "ParotidL" all -> 12). The rest of the
name must equal one of the aliases below exactly, so planning volumes such as "Brainstem_PRV" or
"SpinalCord+5mm" are *not* mistaken for the organ.
"""

from __future__ import annotations

import re

import numpy as np

from sepnet.core.organs import ORGAN_NAMES

MANDIBLE = -1  # pseudo id: a whole mandible, split into 21 (L) and 22 (R) by split_mandible

PDDCA_TO_STRUCTSEG: dict[str, int] = {
    "BrainStem": 1,
    "Chiasm": 8,
    "OpticNerve_L": 6,
    "OpticNerve_R": 7,
    "Parotid_L": 12,
    "Parotid_R": 13,
    "Mandible": MANDIBLE,
}

# StructSeg id -> PDDCA file name, for the writer (21 and 22 are merged into "Mandible").
STRUCTSEG_TO_PDDCA: dict[int, str] = {v: k for k, v in PDDCA_TO_STRUCTSEG.items() if v != MANDIBLE}

HANSEG_TO_STRUCTSEG: dict[str, int] = {
    "Brainstem": 1,
    "Eye_AL": 2,
    "Eye_PL": 2,
    "Eye_AR": 3,
    "Eye_PR": 3,
    "OpticNrv_L": 6,
    "OpticNrv_R": 7,
    "OpticChiasm": 8,
    "Pituitary": 11,
    "Parotid_L": 12,
    "Parotid_R": 13,
    "SpinalCord": 20,
    "Bone_Mandible": MANDIBLE,
}

# The 30 HaN-Seg OARs (for documentation and for telling "known but unmapped" from "unknown" names).
HANSEG_ORGANS: tuple[str, ...] = (
    "A_Carotid_L", "A_Carotid_R", "Arytenoid", "Bone_Mandible", "Brainstem", "BuccalMucosa", "Cavity_Oral",
    "Cochlea_L", "Cochlea_R", "Cricopharyngeus", "Esophagus_S", "Eye_AL", "Eye_AR", "Eye_PL", "Eye_PR",
    "Glnd_Lacrimal_L", "Glnd_Lacrimal_R", "Glnd_Submand_L", "Glnd_Submand_R", "Glnd_Thyroid", "Glottis",
    "Larynx_SG", "Lips", "OpticChiasm", "OpticNrv_L", "OpticNrv_R", "Parotid_L", "Parotid_R", "Pituitary",
    "SpinalCord",
)  # fmt: skip

# Normalised alias (lower case, separators removed, side token removed) -> (left id, right id) for
# paired organs, or (id, None) for midline organs. MANDIBLE without a side means "split me".
_ALIASES: dict[str, tuple[int, int | None]] = {}


def _add(aliases: tuple[str, ...], left: int, right: int | None = None) -> None:
    for a in aliases:
        _ALIASES[a] = (left, right)


_add(("brainstem",), 1)
_add(("eye", "eyes", "eyeball", "globe", "bulbus"), 2, 3)
_add(("lens", "lense"), 4, 5)
_add(("opticnerve", "optnerve", "opticnrv", "optnrv", "nerveoptic"), 6, 7)
_add(("chiasm", "chiasma", "opticchiasm", "opticchiasma", "optchiasm", "optchiasma"), 8)
_add(("temporallobe", "temporallobes", "templobe", "templobes"), 9, 10)
_add(("pituitary", "pituitarygland", "hypophysis"), 11)
_add(("parotid", "parotidgland", "parotids", "glndparotid"), 12, 13)
_add(("innerear", "internalear"), 14, 15)
_add(("midear", "middleear"), 16, 17)
_add(("tmjoint", "tmj", "temporomandibularjoint", "temporomandibular"), 18, 19)
_add(("spinalcord", "cord", "myelon"), 20)
_add(("mandible", "bonemandible", "mandibula"), 21, 22)

_LEFT = {"l", "lt", "left", "lft"}
_RIGHT = {"r", "rt", "right", "rgt"}


def _tokens(name: str) -> list[str]:
    # CamelCase boundaries count as separators: "OpticNerve_L" -> optic, nerve, l; "ParotidL" -> parotid, l.
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name.strip())
    return [t for t in re.split(r"[^a-z0-9]+", spaced.lower()) if t]


def match_roi_name(name: str) -> int | None:
    """StructSeg id for a free-text ROI name, ``MANDIBLE`` for an unsided mandible, or None if unknown.

    The StructSeg names themselves (``Brain_Stem``, ``Opt_Nerve_L``, ``T_M_Joint_R`` ...) always match.
    """
    tokens = _tokens(name)
    sides = [t for t in tokens if t in _LEFT or t in _RIGHT]
    rest = "".join(t for t in tokens if t not in _LEFT and t not in _RIGHT)
    if rest not in _ALIASES or len(sides) > 1:
        return None
    left, right = _ALIASES[rest]
    if right is None:  # midline organ: a side token makes the name something else
        return None if sides else left
    if not sides:
        return MANDIBLE if left == 21 else None  # a paired organ needs its side, except the mandible
    return left if sides[0] in _LEFT else right


def split_mandible(mask: np.ndarray, x_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a whole-mandible mask into (left, right) at the midline.

    mask: bool (z, y, x); x_mm: the LPS physical x (mm) of every voxel, same shape (or broadcastable).
    The midline is the plane x = x_c through the mask's centre of mass (the mandible is nearly
    symmetric, while the patient need not be centred in the field of view). Patient left is +x in LPS,
    so voxels with x > x_c are Mandible_L (21) and the rest Mandible_R (22).
    """
    mask = np.asarray(mask, dtype=bool)
    x_mm = np.broadcast_to(x_mm, mask.shape)
    if not mask.any():
        return mask.copy(), mask.copy()
    x_c = float(x_mm[mask].mean())
    left = mask & (x_mm > x_c)
    return left, mask & ~left


def structseg_name(organ: int) -> str:
    """The StructSeg name of an id (used as ROI name when writing RTSTRUCT)."""
    return ORGAN_NAMES[organ]
