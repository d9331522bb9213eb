"""Trained models on disk and the one way to run them as an ensemble.

``<root>/models/fold<F>/<model>/`` holds ``spec.json`` (:class:`sepnet.jobs.spec.ModelSpec`, how to
rebuild the network), ``best.pt`` (checkpoint with the ``model`` state dict) and ``done.json``
(validation Dice per class, training time). :func:`load_trained` reads exactly these three.
:func:`run_ensemble` is the inference path shared by evaluation and ``sepnet predict``: every model's
sliding-window probabilities, the members fused one at a time (``core.ensemble.FusionAccumulator``),
their vote entropy; :func:`fuse_outputs` is that fusion for any :class:`ModelOutputs` (computed now, or
saved by a fan-out evaluation's infer jobs). Its labels are class indices; :func:`to_organ_ids`,
:func:`subset_reference` and :func:`subset_annotated` bring labels, references and annotations of an
organ subset to StructSeg ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from sepnet.core.ensemble import FusionAccumulator, fusion_weights, hard_labels, vote_entropy
from sepnet.core.errors import DataError
from sepnet.core.inference import autocast, autocast_dtype, sliding_window
from sepnet.core.networks import build
from sepnet.core.organs import NUM_CLASSES, OrganSubset
from sepnet.hpc import checkpoint as checkpoint_io
from sepnet.jobs.config import EnsembleConfig, InferenceConfig
from sepnet.jobs.spec import ModelSpec, read_model_json

CHECKPOINT = "best.pt"
DONE = "done.json"


@dataclass
class TrainedModel:
    spec: ModelSpec
    network: torch.nn.Module
    done: dict[str, Any]  # done.json content

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def channels(self) -> tuple[str, ...]:
        return self.spec.channels

    @property
    def kind(self) -> str:
        return self.spec.kind

    def val_dice(self) -> np.ndarray:
        """(num_classes,) validation Dice per class (index 0 = background); NaN where unknown."""
        out = np.full(self.spec.num_classes, np.nan)
        for i, v in enumerate((self.done.get("val_dice") or [])[: self.spec.num_classes]):
            out[i] = np.nan if v is None else float(v)
        return out

    def predictor(self, device: torch.device, *, cpu_bf16: bool = False):
        """``batch (B, C, z, y, x) -> float32 logits``, in eval mode, autocast as
        ``autocast_dtype(device, cpu_bf16=cpu_bf16)``."""
        device = torch.device(device)
        net = self.network.to(device).eval()
        amp = autocast_dtype(device, cpu_bf16=cpu_bf16)

        @torch.no_grad()
        def predict(batch: torch.Tensor) -> torch.Tensor:
            with autocast(device, amp):
                return net(batch.to(device)).float()

        return predict

    def probabilities(self, image, *, inference: InferenceConfig, device: torch.device) -> torch.Tensor:
        """float32 CPU (K, Z, Y, X) sliding-window probabilities of ``image`` (C, Z, Y, X) = ``self.channels``.

        Window: ``inference.patch``, else the model's training patch; overlap, TTA, batch size from ``inference``.
        """
        patch = tuple(inference.patch) if inference.patch else self.spec.patch
        predictor = self.predictor(device, cpu_bf16=inference.cpu_bf16)
        return sliding_window(image, predictor, num_classes=self.spec.num_classes, patch=patch,
                              overlap=float(inference.overlap), batch_size=int(inference.batch_size),
                              tta=inference.tta_axes or False, lr_pairs=self.spec.subset.lr_pairs, device=device)


def _state_dict(ckpt: Any) -> dict[str, torch.Tensor]:
    sd = ckpt.get("model", ckpt)
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_trained(model_dir: str | Path, *, checkpoint: str = CHECKPOINT) -> TrainedModel:
    """Rebuild a trained network from ``spec.json``, ``done.json`` and the checkpoint's weights.

    A missing or unreadable piece raises DataError naming the file.
    """
    model_dir = Path(model_dir)
    spec = ModelSpec.read(model_dir)
    ckpt_file, done_file = model_dir / checkpoint, model_dir / DONE
    done = read_model_json(done_file)
    if not ckpt_file.is_file():
        raise DataError(f"{ckpt_file}: missing (is the model trained?)")
    ckpt = checkpoint_io.load(ckpt_file)  # weights only: a checkpoint cannot run code
    net = build(spec.network, in_channels=spec.in_channels, num_classes=spec.num_classes, base=spec.base,
                separable_axis=spec.separable_axis)
    try:
        net.load_state_dict(_state_dict(ckpt))
    except (RuntimeError, KeyError, AttributeError) as e:
        raise DataError(f"{ckpt_file}: checkpoint does not fit the network ({str(e).splitlines()[0]})") from None
    return TrainedModel(spec=spec, network=net, done=done)


def find_models(root: str | Path) -> dict[int, list[Path]]:
    """fold -> trained model folders (those with best.pt and done.json) under a study or models dir."""
    root = Path(root)
    base = root / "models" if (root / "models").is_dir() else root
    out: dict[int, list[Path]] = {}
    for fold_dir in sorted(base.glob("fold*")):
        if not fold_dir.name[4:].isdigit():
            continue
        dirs = [d for d in sorted(fold_dir.iterdir()) if (d / CHECKPOINT).is_file() and (d / DONE).is_file()]
        if dirs:
            out[int(fold_dir.name[4:])] = dirs
    return out


def ensemble_weights(members: Sequence[TrainedModel], ensemble: EnsembleConfig) -> np.ndarray:
    """(N, K) fusion weights of the members under the study's ensemble config (rank or equal)."""
    if not members:
        raise DataError("ensemble: no member models")
    dice = np.stack([m.val_dice() for m in members])
    return fusion_weights(dice, weighting=ensemble.weighting, by_rank=ensemble.rank_weights)


@dataclass
class EnsembleResult:
    """Outputs on the prepared (stored) grid: ``labels`` (Z, Y, X) uint8 fused; ``member_labels``
    (N, Z, Y, X) uint8; ``entropy`` (Z, Y, X) float32 vote entropy (nats); ``other_labels`` the hard
    labels of the non-member models, in the order given."""

    labels: np.ndarray
    member_labels: np.ndarray
    entropy: np.ndarray
    other_labels: list[np.ndarray]


class ModelOutputs(Protocol):
    """Where :func:`fuse_outputs` gets each model's output on one case: computed now
    (:class:`ComputedOutputs`) or read back from an earlier job (``jobs.evaluate.SavedOutputs``)."""

    def probabilities(self, model: TrainedModel):
        """(K, Z, Y, X) float32 probabilities of a member (torch or numpy), one model's worth of memory."""

    def labels(self, model: TrainedModel) -> np.ndarray:
        """(Z, Y, X) uint8 hard labels (class indices) of a non-member model."""


@dataclass
class ComputedOutputs:
    """The models run now: ``image_of(channels) -> (C, Z, Y, X) float32`` is the case's input,
    :meth:`TrainedModel.probabilities` with ``inference`` on ``device``."""

    image_of: Callable[[tuple[str, ...]], np.ndarray]
    inference: InferenceConfig
    device: torch.device

    def probabilities(self, model: TrainedModel) -> torch.Tensor:
        return model.probabilities(self.image_of(model.channels), inference=self.inference, device=self.device)

    def labels(self, model: TrainedModel) -> np.ndarray:
        return hard_labels(self.probabilities(model))


def run_ensemble(image_of: Callable[[tuple[str, ...]], np.ndarray], members: Sequence[TrainedModel],
                 weights: np.ndarray, *, inference: InferenceConfig, device: torch.device,
                 others: Sequence[TrainedModel] = ()) -> EnsembleResult:
    """Run the members (fused with ``weights`` (N, K)) and the ``others`` on one case.

    image_of: ``channels -> (C, Z, Y, X) float32`` input of a model (the stored or prepared channels).
    Labels are class indices of the models' organ subset (``ModelSpec.subset``; == StructSeg ids for all
    22 organs): callers map them with :func:`to_organ_ids`. The members must share one subset.
    Memory: one model's (K, Z, Y, X) probabilities at a time plus the float64 fused sum.
    """
    return fuse_outputs(ComputedOutputs(image_of, inference=inference, device=device), members, weights, others=others)


def fuse_outputs(outputs: ModelOutputs, members: Sequence[TrainedModel], weights: np.ndarray, *,
                 others: Sequence[TrainedModel] = ()) -> EnsembleResult:
    """The one fusion of an ensemble on one case, whatever ``outputs`` the probabilities come from:
    each member's (K, Z, Y, X) probabilities added to the ``FusionAccumulator`` (weights (N, K)) and
    dropped before the next one is asked for, then the vote entropy; the ``others``' uint8 labels.
    Memory: one member's probabilities plus the float64 fused sum and the N uint8 label maps."""
    classes = {(m.spec.num_classes, m.spec.organ_ids) for m in members}
    if len(classes) > 1:
        raise DataError(f"ensemble: members predict different classes ({', '.join(m.name for m in members)})")
    acc = FusionAccumulator(weights)
    for i, model in enumerate(members):
        probs = outputs.probabilities(model)
        acc.add(i, probs)
        del probs  # before the next member's are made or read: never two members' probabilities at once
    other_labels = [outputs.labels(model) for model in others]
    stack = acc.member_labels
    return EnsembleResult(labels=acc.labels(), member_labels=stack, entropy=vote_entropy(stack).astype(np.float32),
                          other_labels=other_labels)


def organ_names(subset: OrganSubset) -> dict[int, str]:
    """StructSeg id -> name of each class of ``subset`` (a merged class: its first id and its own name,
    e.g. 21 -> "Mandible" in COMMON7); all 22 StructSeg names for ``structseg22``."""
    return {int(ids[0]): name for name, ids in subset.classes}


def is_identity(subset: OrganSubset) -> bool:
    """True when class index == StructSeg id for every class (all 22 organs, in id order)."""
    inv = subset.inverse_lut()
    return inv.size == NUM_CLASSES and bool(np.array_equal(inv, np.arange(NUM_CLASSES)))


def to_organ_ids(labels: np.ndarray, subset: OrganSubset) -> np.ndarray:
    """Class-index labels (any shape) of a model trained on ``subset`` -> uint8 StructSeg ids."""
    return np.asarray(labels, dtype=np.uint8) if is_identity(subset) else subset.from_subset(labels)


def subset_reference(ref: np.ndarray, subset: OrganSubset) -> np.ndarray:
    """A StructSeg reference (Z, Y, X) as a model on ``subset`` can predict it: organs outside the subset
    become background, a merged class its first id (``from_subset(to_subset(ref))``)."""
    return np.asarray(ref, dtype=np.uint8) if is_identity(subset) else subset.from_subset(subset.to_subset(ref))


def subset_annotated(annotated, subset: OrganSubset) -> tuple[int, ...] | None:
    """The StructSeg ids (a class's first id) of the subset classes a case annotates; None stays None
    (all). A merged class counts as annotated only when all of its ids are."""
    if annotated is None:
        return None
    ann = subset.annotated_classes(annotated)
    return tuple(int(ids[0]) for k, (_, ids) in enumerate(subset.classes, start=1) if ann[k])
