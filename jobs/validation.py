"""Validation during training: per-class Dice of whole validation volumes.

Used by the training job (rank 0) every ``training.val_every`` iterations and at the end; the best
checkpoint is the one with the highest mean foreground Dice (:func:`mean_foreground`).

Partial labels: the Dice of a class is pooled over the validation cases whose dataset annotates it
(``meta.annotated``) and is NaN when none does, so an organ a dataset does not draw neither counts as
missed nor as a false positive there (:func:`pooled_dice`). Labels are compared in the study's class
space (``OrganSubset.to_subset``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from sepnet.core.inference import autocast, sliding_window
from sepnet.core.organs import STRUCTSEG22, OrganSubset


def confusion(pred: np.ndarray, ref: np.ndarray, *, num_classes: int) -> np.ndarray:
    """Confusion counts int64 (K, K) of two label maps: ``[ref class, predicted class]``."""
    k = num_classes
    flat = ref.astype(np.int64).ravel() * k + pred.astype(np.int64).ravel()
    return np.bincount(flat, minlength=k * k).reshape(k, k)


def dice_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Dice float64 (K,) of every class from confusion counts (K, K); NaN where both lack the class."""
    inter = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * inter / np.maximum(denom, 1), np.nan)


def pooled_dice(confs: list[np.ndarray], annotated: list[np.ndarray]) -> np.ndarray:
    """Dice float64 (K,) per class pooled over cases, each class over the cases that annotate it.

    confs: per-case confusion counts (K, K) (:func:`confusion`); annotated: per-case (K,) bool masks.
    Class c sums its intersections and sizes over the cases with ``annotated[c]``; NaN where no such
    case has the class in its reference or its prediction (none annotates it, or absent everywhere).
    """
    if len(confs) != len(annotated):
        raise ValueError(f"{len(confs)} confusion matrices for {len(annotated)} annotated masks")
    if not confs:
        raise ValueError("pooled_dice: no case")
    k = confs[0].shape[0]
    inter, denom = np.zeros(k), np.zeros(k)
    for conf, ann in zip(confs, annotated):
        ann = np.asarray(ann, dtype=bool)
        if ann.shape != (k,):
            raise ValueError(f"annotated mask of shape {ann.shape}, expected ({k},)")
        inter += np.where(ann, np.diag(conf), 0)
        denom += np.where(ann, conf.sum(0) + conf.sum(1), 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * inter / np.maximum(denom, 1), np.nan)


def per_class_dice(pred: np.ndarray, ref: np.ndarray, *, num_classes: int) -> np.ndarray:
    """Dice of every class 0..K-1 of two label maps, float64 (K,); NaN where both lack the class."""
    return dice_from_confusion(confusion(pred, ref, num_classes=num_classes))


def mean_foreground(dice: np.ndarray) -> float:
    """Mean Dice over foreground classes present (ignoring NaN); 0 when none is present."""
    fg = np.asarray(dice[1:], dtype=np.float64)
    fg = fg[~np.isnan(fg)]
    return float(fg.mean()) if fg.size else 0.0


def jsonable_dice(dice: np.ndarray) -> list[float | None]:
    """Dice (K,) as a JSON list, NaN -> None."""
    return [None if math.isnan(float(v)) else float(v) for v in dice]


def predict_volume(model: torch.nn.Module, volume: torch.Tensor, *, num_classes: int, patch: list[int],
                   overlap: float, device: str, amp_dtype: torch.dtype | None) -> np.ndarray:
    """Label map uint8 (Z, Y, X) of a whole volume (C, Z, Y, X) float32, by sliding windows of ``patch``."""
    def predictor(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp_dtype):
            return model(x.to(device)).float()

    with torch.no_grad():
        probs = sliding_window(volume, predictor, num_classes=num_classes, patch=tuple(patch), overlap=overlap,
                               batch_size=2, device=device)
    return probs.argmax(0).cpu().numpy().astype(np.uint8)


def slab_starts(depth: int, *, slabs: int, thickness: int) -> list[int]:
    """First slices of ``slabs`` evenly spaced z-slabs of ``thickness`` slices in a volume of ``depth``
    (sorted, distinct, each slab inside the volume); all of it (``[0]``) when the slabs would cover it."""
    if slabs < 1 or thickness < 1:
        raise ValueError(f"slabs and thickness must be >= 1, got {slabs}, {thickness}")
    if slabs * thickness >= depth:
        return [0]
    return sorted({int(round(v)) for v in np.linspace(0, depth - thickness, slabs + 2)[1:-1]})


def validate(model: torch.nn.Module, store: Any, case_ids: list[str], *, channels: list[str], num_classes: int,
             patch: list[int], overlap: float = 0.5, device: str = "cpu",
             amp_dtype: torch.dtype | None = None, subset: OrganSubset = STRUCTSEG22,
             slabs: int | None = None) -> np.ndarray:
    """Per-class Dice (K,) of the validation volumes, pooled (voxel counts summed) per class over the
    cases that annotate it (:func:`pooled_dice`; NaN where none does).

    store: a ``sepnet.data.store.Store``; channels: the input channels read for each case; subset: the
    study's classes (K = ``subset.num_classes`` = ``num_classes``). slabs: None = whole volumes; N = only
    N evenly spaced z-slabs of ``patch[0]`` slices per case (:func:`slab_starts`), each predicted on its own,
    which costs about N * patch[0] / depth of a whole volume. The model is put in eval mode and restored
    to its previous mode afterwards.
    """
    if subset.num_classes != num_classes:
        raise ValueError(f"subset {subset.name} has {subset.num_classes} classes, the model {num_classes}")
    was_training = model.training
    model.eval()
    confs, annotated = [], []
    try:
        for cid in case_ids:
            image = torch.from_numpy(store.read_image(cid, channels))
            ref = subset.to_subset(store.read_label(cid))
            depth = int(image.shape[1])
            starts = [0] if slabs is None else slab_starts(depth, slabs=int(slabs), thickness=int(patch[0]))
            thick = depth if starts == [0] else int(patch[0])
            conf = np.zeros((num_classes, num_classes), dtype=np.int64)
            for z0 in starts:
                pred = predict_volume(model, image[:, z0:z0 + thick], num_classes=num_classes, patch=patch,
                                      overlap=overlap, device=device, amp_dtype=amp_dtype)
                conf += confusion(pred, ref[z0:z0 + thick], num_classes=num_classes)
            confs.append(conf)
            annotated.append(subset.annotated_classes(store.meta(cid).annotated))
    finally:
        model.train(was_training)
    return pooled_dice(confs, annotated)
