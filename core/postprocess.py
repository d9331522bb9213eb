"""Per-organ connected-component postprocessing, decided on validation cases as nnU-Net does.

``keep_largest_component(labels, organs)`` keeps, for each organ, its largest 3-D connected component
and sets the other components to background (0). Connectivity is 26 (voxels sharing a face, edge or
corner; ``scipy.ndimage.generate_binary_structure(3, 3)``) by default, or 6 (faces only). Ties between
equally large components keep the first in ``scipy.ndimage.label`` order (deterministic).

``choose_postprocessing(predictions, references)`` applies it to organ k only if that does not lower the
mean Dice of organ k over the validation cases (nnU-Net's rule, per organ; ties apply it, since a change
that costs nothing on validation removes stray blobs elsewhere). Dice per (case, organ) is
``2|P & G| / (|P| + |G|)``, 1 when both are empty (as ``sepnet.evaluation.metrics.dice``); cases that do
not annotate organ k are left out of its mean. ``apply_postprocessing(labels, decision)`` applies a
decision to a label map.

Label maps are (Z, Y, X) integer arrays of organ ids (0 = background); outputs keep the input dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

CONNECTIVITIES = (6, 26)


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity}")
    return ndimage.generate_binary_structure(3, 1 if connectivity == 6 else 3)


def keep_largest_component(labels: np.ndarray, organs: Iterable[int], *, connectivity: int = 26) -> np.ndarray:
    """A copy of ``labels`` where each organ in ``organs`` keeps only its largest connected component.

    Args:
        labels: (Z, Y, X) integer label map.
        organs: organ ids to process; others are left as they are.
        connectivity: 26 (default) or 6.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (Z, Y, X), got shape {labels.shape}")
    structure = _structure(connectivity)
    out = labels.copy()
    organs = sorted({int(o) for o in organs if int(o) > 0})
    if not organs or not labels.size:
        return out
    boxes = ndimage.find_objects(labels.astype(np.int64, copy=False), max_label=max(organs))
    for organ in organs:
        box = boxes[organ - 1]
        if box is None:
            continue
        # components of the organ never leave its bounding box, so label inside it only
        mask = out[box] == organ
        comp, n = ndimage.label(mask, structure=structure)
        if n < 2:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        drop = mask & (comp != int(np.argmax(sizes)) + 1)
        out[box][drop] = 0
    return out


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    sp, sr = int(pred.sum()), int(ref.sum())
    if sp + sr == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / (sp + sr)


@dataclass
class PostprocessDecision:
    """Which organs get keep-largest-component, and the validation evidence.

    organs: organ ids to process; connectivity: 6 or 26; dice_before / dice_after: organ id -> mean
    validation Dice without / with the postprocessing; cases: organ id -> number of validation cases used.
    """

    organs: tuple[int, ...]
    connectivity: int = 26
    dice_before: dict[int, float] = field(default_factory=dict)
    dice_after: dict[int, float] = field(default_factory=dict)
    cases: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"organs": list(self.organs), "connectivity": self.connectivity,
                "dice_before": {str(k): v for k, v in self.dice_before.items()},
                "dice_after": {str(k): v for k, v in self.dice_after.items()},
                "cases": {str(k): v for k, v in self.cases.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> PostprocessDecision:
        return cls(tuple(int(o) for o in d["organs"]), int(d.get("connectivity", 26)),
                   {int(k): float(v) for k, v in d.get("dice_before", {}).items()},
                   {int(k): float(v) for k, v in d.get("dice_after", {}).items()},
                   {int(k): int(v) for k, v in d.get("cases", {}).items()})


def choose_postprocessing(
    predictions: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    *,
    organs: Iterable[int],
    annotated: Sequence[Iterable[int] | None] | None = None,
    connectivity: int = 26,
) -> PostprocessDecision:
    """Per organ, apply keep-largest-component iff it does not lower the organ's mean validation Dice.

    Args:
        predictions, references: validation label maps, one (Z, Y, X) pair per case.
        organs: organ ids to decide on (e.g. ``sepnet.core.organs.ORGAN_IDS``).
        annotated: per case, the organ ids it annotates (None entries or None = all).
        connectivity: 26 or 6.

    Returns:
        :class:`PostprocessDecision`; an organ no validation case annotates is not chosen.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if annotated is not None and len(annotated) != len(predictions):
        raise ValueError(f"annotated has {len(annotated)} entries for {len(predictions)} cases")
    organs = sorted({int(o) for o in organs if int(o) > 0})
    before: dict[int, list[float]] = {o: [] for o in organs}
    after: dict[int, list[float]] = {o: [] for o in organs}
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        pred, ref = np.asarray(pred), np.asarray(ref)
        if pred.shape != ref.shape:
            raise ValueError(f"case {i}: prediction {pred.shape} and reference {ref.shape} differ in shape")
        ann = None if annotated is None or annotated[i] is None else {int(a) for a in annotated[i]}
        used = [o for o in organs if ann is None or o in ann]
        post = keep_largest_component(pred, used, connectivity=connectivity)
        for o in used:
            g = ref == o
            before[o].append(_dice(pred == o, g))
            after[o].append(_dice(post == o, g))
    chosen = [o for o in organs if before[o] and np.mean(after[o]) >= np.mean(before[o])]
    return PostprocessDecision(
        tuple(chosen), connectivity,
        {o: float(np.mean(v)) for o, v in before.items() if v},
        {o: float(np.mean(v)) for o, v in after.items() if v},
        {o: len(v) for o, v in before.items() if v},
    )


def apply_postprocessing(labels: np.ndarray, decision: PostprocessDecision) -> np.ndarray:
    """``labels`` with keep-largest-component applied to the decision's organs (a copy)."""
    return keep_largest_component(labels, decision.organs, connectivity=decision.connectivity)
