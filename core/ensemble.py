"""Class-wise rank-weighted ensemble fusion and ensemble uncertainty (paper Sec. 3.4, docs/conventions.md).

- :func:`rank_weights` turns the members' validation Dice per class into fusion weights (paper: the
  i-th best member on class c gets 5, 4, 3, 1, 1, 1 for N = 6).
- :func:`fusion_weights` gives the (N, K) weights from the ensemble config (rank or equal weighting);
  :func:`pool_weights` stacks several ensembles' weights (e.g. one per fold) into one.
- :class:`FusionAccumulator` is Eq. (9), ``P_c = sum_i w_c^i P_c^i / sum_i w_c^i``, one member at a time;
  :func:`fuse` applies it to all members at once. Evaluation and ``sepnet predict`` both use it.
- :func:`vote_entropy` is Eq. (11): the entropy (nats) of the members' hard-label votes per voxel.
  With N voters it takes only a few distinct values (:func:`entropy_levels`), one per partition of N;
  :func:`quantise_levels` maps a map onto those levels with a tolerance, never with float equality.
- :func:`vvc` is the structure-wise volume variation coefficient sigma / mu (Eq. 12 has it upside down).

Pure numpy / torch; no files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from sepnet.core.errors import ConfigError
from sepnet.core.organs import ORGAN_IDS

PAPER_RANK_WEIGHTS: tuple[float, ...] = (5.0, 4.0, 3.0, 1.0, 1.0, 1.0)


def default_rank_weights(n: int) -> tuple[float, ...]:
    """Weights by rank (best first) for ``n`` members; the paper's 5, 4, 3, 1, 1, 1 for n = 6.

    Generalisation: the top ``k = ceil(n / 2)`` members get descending weights ``n - 1, n - 2, ...,
    n - k`` and the rest get 1, the weight of a member that is not among the best half. With n = 6
    this gives exactly the paper's 5, 4, 3, 1, 1, 1; n = 4 -> 3, 2, 1, 1; n = 3 -> 2, 1, 1;
    n = 2 -> 1, 1 (equal); n = 1 -> 1. Weights are never below 1, so every member contributes.
    """
    if n < 1:
        raise ValueError(f"rank weights: need at least one member, got {n}")
    k = math.ceil(n / 2)
    return tuple(float(max(n - i, 1)) if i <= k else 1.0 for i in range(1, n + 1))


def rank_weights(dice, *, weights: Sequence[float] | None = None) -> np.ndarray:
    """Per-class fusion weights from the members' validation Dice.

    Args:
        dice: (N members, K classes) validation Dice per member and class (any scale). NaN (class not
            annotated in the validation cases / undefined) ranks below every finite value.
        weights: N weights by rank, best first; None = :func:`default_rank_weights` (paper's 5,4,3,1,1,1).

    Returns:
        float64 (N, K): ``out[i, c]`` is the weight of member i for class c.

    For each class the members are sorted by Dice, highest first; ties (and NaNs among themselves) are
    broken by member index, the lower index ranking higher, so the result is deterministic.
    """
    d = np.asarray(dice.detach().cpu().numpy() if isinstance(dice, torch.Tensor) else dice, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"rank_weights: dice must be (N members, K classes), got shape {d.shape}")
    n, k = d.shape
    w = np.asarray(default_rank_weights(n) if weights is None else weights, dtype=np.float64).ravel()
    if w.size != n:
        raise ConfigError(f"ensemble.rank_weights: {w.size} weights given for {n} members")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ConfigError(f"ensemble.rank_weights: weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    # sort key: -dice (NaN -> +inf so it comes last); a stable sort keeps member order among ties
    key = np.where(np.isnan(d), np.inf, -d)
    order = np.argsort(key, axis=0, kind="stable")  # (N, K): order[r, c] = member with rank r on class c
    out = np.empty((n, k), dtype=np.float64)
    np.put_along_axis(out, order, np.broadcast_to(w[:, None], (n, k)), axis=0)
    return out


def fusion_weights(dice, *, weighting: str = "rank", by_rank: Sequence[float] | None = None) -> np.ndarray:
    """(N, K) fusion weights of one ensemble from its config (``ensemble.weighting``, ``ensemble.rank_weights``).

    Args:
        dice: (N members, K classes) validation Dice; NaN where unknown.
        weighting: "rank" (:func:`rank_weights`) or "equal" (all ones).
        by_rank: ``ensemble.rank_weights``, N weights by rank, best first; None = :func:`default_rank_weights`.

    Returns:
        float64 (N, K). With "rank", a class for which no member has a finite Dice gets equal weights:
        there is nothing to rank by, and ranking by member index would favour the first member.
    """
    d = np.asarray(dice.detach().cpu().numpy() if isinstance(dice, torch.Tensor) else dice, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"fusion_weights: dice must be (N members, K classes), got shape {d.shape}")
    if weighting == "equal":
        return np.ones(d.shape, dtype=np.float64)
    if weighting != "rank":
        raise ConfigError(f"ensemble.weighting: {weighting!r} is not one of 'rank', 'equal'")
    w = rank_weights(d, weights=by_rank)
    unknown = ~np.isfinite(d).any(axis=0)
    w[:, unknown] = 1.0
    return w


def pool_weights(per_ensemble: Sequence) -> np.ndarray:
    """Weights that fuse several ensembles (e.g. one per fold) in one pass as the mean of their fusions.

    Args:
        per_ensemble: E arrays (N_e, K) of fusion weights.

    Returns:
        float64 (sum N_e, K), members in the given order. One ensemble: its weights as they are. Several:
        each ensemble's weights divided by their class-wise sum and by E, so Eq. (9) over the stacked
        members equals the mean of the E fused maps.
    """
    ws = [np.asarray(w, dtype=np.float64) for w in per_ensemble]
    if not ws:
        raise ValueError("pool_weights: no ensemble given")
    if len(ws) == 1:
        return ws[0].copy()
    return np.concatenate([w / w.sum(axis=0, keepdims=True) / len(ws) for w in ws])


def _as_weights(weights, k: int) -> np.ndarray:
    w = np.asarray(weights.detach().cpu().numpy() if isinstance(weights, torch.Tensor) else weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != k:
        raise ValueError(f"fuse: weights must be (N, K={k}), got shape {w.shape}")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("fuse: weights must be finite and >= 0")
    if np.any(w.sum(axis=0) <= 0):
        raise ValueError(f"fuse: class(es) {np.flatnonzero(w.sum(axis=0) <= 0).tolist()} have all-zero weights")
    return w


def hard_labels(probs) -> np.ndarray:
    """uint8 numpy argmax over the class axis 0 of (K, ...) probabilities (numpy or torch; ties -> lower class)."""
    if isinstance(probs, torch.Tensor):
        return probs.argmax(0).to(torch.uint8).cpu().numpy()
    return np.asarray(probs).argmax(0).astype(np.uint8)


class FusionAccumulator:
    """Eq. (9) in streaming form: members' probabilities are added one at a time and not kept.

    ``weights`` (N, K) non-negative, or None for equal weights over however many members are added.
    ``add(i, probs)`` adds member i's (K, ...) probabilities (numpy, or torch: the sum stays on its device)
    and, when ``keep_labels``, returns its hard labels (uint8 numpy) and keeps them (``member_labels``)
    for vote entropy and VVC (else returns None). Memory: the float64 (K, ...) sum, plus N uint8 label maps
    (temporaries are one class channel).
    ``probs()`` is the fused float32 (K, ...) like the members; ``labels()`` its uint8 argmax.
    Each class is normalised by its own weight sum, so fused classes need not sum to exactly 1.
    """

    def __init__(self, weights=None, *, keep_labels: bool = True):
        self._weights_in = weights
        self._w: np.ndarray | None = None
        self._acc = None
        self._seen: list[int] = []
        self._labels: list[np.ndarray] = []
        self._keep = keep_labels

    def _start(self, p) -> None:
        k = int(p.shape[0])
        self._w = np.ones((0, k)) if self._weights_in is None else _as_weights(self._weights_in, k)
        if isinstance(p, torch.Tensor):
            self._acc = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
        else:
            self._acc = np.zeros(p.shape, dtype=np.float64)

    def add(self, i: int, probs) -> np.ndarray | None:
        if probs.ndim < 1:
            raise ValueError(f"fuse: member probabilities must be (K, ...), got shape {tuple(probs.shape)}")
        if self._acc is None:
            self._start(probs)
        acc = self._acc
        if tuple(probs.shape) != tuple(acc.shape):
            raise ValueError(f"fuse: member {i} has shape {tuple(probs.shape)}, expected {tuple(acc.shape)}")
        if i in self._seen:
            raise ValueError(f"fuse: member {i} added twice")
        if self._weights_in is not None and not 0 <= i < self._w.shape[0]:
            raise ValueError(f"fuse: member {i} has no weight row ({self._w.shape[0]} rows)")
        wi = np.ones(acc.shape[0]) if self._weights_in is None else self._w[i]
        is_torch = isinstance(acc, torch.Tensor)
        for c in range(acc.shape[0]):  # class by class: temporaries of one channel, not K
            if is_torch:
                acc[c] += probs[c].to(acc.device, torch.float64) * float(wi[c])
            else:
                acc[c] += np.asarray(probs[c], dtype=np.float64) * float(wi[c])
        self._seen.append(i)
        if not self._keep:
            return None
        labels = hard_labels(probs)
        self._labels.append(labels)
        return labels

    @property
    def n_added(self) -> int:
        return len(self._seen)

    @property
    def member_labels(self) -> np.ndarray:
        """(N, ...) uint8 hard labels of the members, in member index order."""
        if not self._labels:
            raise ValueError("fuse: no member labels kept")
        order = np.argsort(self._seen, kind="stable")
        return np.stack([self._labels[j] for j in order])

    def probs(self):
        if self._acc is None:
            raise ValueError("fuse: no members given")
        acc = self._acc
        if self._weights_in is None:
            total = np.full(acc.shape[0], float(self.n_added))
        else:
            if self.n_added != self._w.shape[0]:
                raise ValueError(f"fuse: {self.n_added} members but {self._w.shape[0]} weight rows")
            total = self._w.sum(axis=0)
        if isinstance(acc, torch.Tensor):
            out = torch.empty(acc.shape, dtype=torch.float32, device=acc.device)
        else:
            out = np.empty(acc.shape, dtype=np.float32)
        for c in range(acc.shape[0]):
            out[c] = acc[c] / float(total[c])
        return out

    def labels(self) -> np.ndarray:
        """uint8 (...) argmax of the fused probabilities (ties -> the lower class)."""
        return hard_labels(self.probs())


def fuse(probs, weights=None):
    """Class-wise weighted average of member probabilities, Eq. (9), through :class:`FusionAccumulator`.

    Args:
        probs: (N, K, ...) member probabilities as one numpy array / torch tensor, or an iterable of N
            (K, ...) arrays (a list or a generator). Iterables are accumulated one member at a time, so
            N full-size maps are never held together.
        weights: (N, K) non-negative weights (e.g. from :func:`fusion_weights`); None = equal weights.

    Returns:
        float32 (K, ...) fused probabilities, numpy or torch like the input members (torch stays on its
        device). Each class is normalised by its own weight sum, so the fused classes of a voxel need
        not sum to exactly 1 even when every member's do; take the argmax over classes for labels.
    """
    if isinstance(probs, (np.ndarray, torch.Tensor)):
        if probs.ndim < 2:
            raise ValueError(f"fuse: probs must be (N, K, ...), got shape {tuple(probs.shape)}")
        members: Iterable = (probs[i] for i in range(probs.shape[0]))
    else:
        members = probs
    acc = FusionAccumulator(weights, keep_labels=False)
    for i, p in enumerate(members):
        acc.add(i, p)
    return acc.probs()


def vote_entropy(labels, *, chunk: int = 1 << 22):
    """Voxel-wise entropy of the members' hard labels, Eq. (11): ``H = -sum_m f_m ln f_m`` in nats.

    Args:
        labels: (N, ...) integer label maps of the N members (numpy or torch).
        chunk: voxels processed at a time (bounds the temporary memory).

    Returns:
        float32 map of shape ``labels.shape[1:]`` (numpy or torch like the input), values in
        [0, ln N]; 0 where all members agree.

    Rather than one-hot counting over all K classes, each member's vote count ``c_i`` (how many
    members share member i's label) is counted from the N(N-1)/2 pairwise equalities, which is
    cheaper for N = 6 and 23 classes and independent of K. Since a class with count c has c members,
    ``sum_m f_m ln f_m = (1/N) sum_i ln(c_i / N)``, so ``H = ln N - mean_i ln c_i``.
    """
    is_torch = isinstance(labels, torch.Tensor)
    lab = labels.detach().cpu().numpy() if is_torch else np.asarray(labels)
    if lab.ndim < 1 or lab.shape[0] < 1:
        raise ValueError(f"vote_entropy: labels must be (N, ...) with N >= 1, got shape {lab.shape}")
    n = lab.shape[0]
    spatial = lab.shape[1:]
    flat = lab.reshape(n, -1)
    lut = np.log(np.arange(1, n + 1, dtype=np.float64))  # lut[c-1] = ln c
    out = np.empty(flat.shape[1], dtype=np.float32)
    ctype = np.uint8 if n < 256 else np.int32
    for s in range(0, flat.shape[1], chunk):
        block = flat[:, s : s + chunk]
        counts = np.ones(block.shape, dtype=ctype)
        for i in range(n):
            for j in range(i + 1, n):
                eq = block[i] == block[j]
                counts[i] += eq
                counts[j] += eq
        out[s : s + chunk] = math.log(n) - lut[counts - 1].mean(axis=0)
    out = np.maximum(out, 0.0).reshape(spatial)  # clip -1e-8 rounding at full agreement
    if is_torch:
        return torch.from_numpy(out).to(labels.device)
    return out


def _partitions(n: int, largest: int | None = None):
    largest = n if largest is None else largest
    if n == 0:
        yield ()
        return
    for first in range(min(n, largest), 0, -1):
        for rest in _partitions(n - first, first):
            yield (first, *rest)


def entropy_levels(n: int, *, max_classes: int | None = None) -> np.ndarray:
    """All distinct vote-entropy values (nats) that n voters can produce, sorted ascending.

    One value per partition of n into vote counts (c_1, ..., c_m), ``H = -sum (c/n) ln (c/n)``;
    ``max_classes`` limits m (the number of distinct labels available). For n = 6: 0, 0.4506 (5:1),
    0.6365 (4:2), 0.6931 (3:3), 0.8676 (4:1:1), 1.0114 (3:2:1), 1.0986 (2:2:2), 1.2425 (3:1:1:1),
    1.3297 (2:2:1:1), 1.5607 (2:1:1:1:1), 1.7918 (1:1:1:1:1:1). Values closer than 1e-9 are merged.
    """
    if n < 1:
        raise ValueError(f"entropy_levels: need n >= 1 voters, got {n}")
    vals = []
    for part in _partitions(n):
        if max_classes is not None and len(part) > max_classes:
            continue
        vals.append(max(0.0, -sum((c / n) * math.log(c / n) for c in part)))
    vals.sort()
    levels = [vals[0]]
    for v in vals[1:]:
        if v - levels[-1] > 1e-9:
            levels.append(v)
    return np.asarray(levels, dtype=np.float64)


def quantise_levels(entropy, n: int, *, tol: float = 1e-4) -> np.ndarray:
    """Map a vote-entropy map onto level indices 0..L-1 of :func:`entropy_levels` (n).

    Returns int16 array of the map's shape. A value farther than ``tol`` from every level raises
    ValueError (the map was not made by n voters).
    """
    h = np.asarray(entropy.detach().cpu().numpy() if isinstance(entropy, torch.Tensor) else entropy, np.float64)
    levels = entropy_levels(n)
    idx = np.clip(np.searchsorted(levels, h), 1, len(levels) - 1) if len(levels) > 1 else np.zeros(h.shape, int)
    if len(levels) > 1:
        # nearest of the two neighbours
        lo = levels[idx - 1]
        hi = levels[idx]
        idx = np.where(np.abs(h - lo) <= np.abs(h - hi), idx - 1, idx)
    dist = np.abs(h - levels[idx])
    if np.any(~(dist <= tol)):
        bad = h[~(dist <= tol)].ravel()[0]
        raise ValueError(f"quantise_levels: entropy {bad:.6f} is not a level of {n} voters (tol {tol})")
    return idx.astype(np.int16)


def vvc(volumes) -> np.ndarray:
    """Volume variation coefficient per structure: ``sigma / mu`` of the members' volumes.

    Args:
        volumes: (N members, K structures) volumes (any unit; the ratio is unitless).

    Returns:
        float64 (K,): population standard deviation (ddof = 0, the N members are the whole ensemble,
        not a sample) over the mean; NaN where the mean volume is 0 (no member segmented it).

    The paper's Eq. (12) writes ``mu / sigma``; that is an erratum: its own reading ("a high VVC
    indicates inaccurate segmentation", Fig. 13) and the name "variation coefficient" need
    ``sigma / mu`` (docs/conventions.md).
    """
    v = np.asarray(volumes.detach().cpu().numpy() if isinstance(volumes, torch.Tensor) else volumes, np.float64)
    if v.ndim != 2:
        raise ValueError(f"vvc: volumes must be (N members, K structures), got shape {v.shape}")
    mu = v.mean(axis=0)
    sigma = v.std(axis=0, ddof=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mu != 0, sigma / np.where(mu != 0, mu, 1.0), np.nan)


def member_volumes(labels, *, spacing_zyx: Sequence[float], organs: Sequence[int] = ORGAN_IDS) -> np.ndarray:
    """Organ volumes of each member's label map.

    Args:
        labels: (N, Z, Y, X) integer label maps (numpy or torch).
        spacing_zyx: voxel spacing (z, y, x) in mm.
        organs: label ids to measure, in output column order.

    Returns:
        float64 (N, len(organs)) volumes in cm3 (= voxels * voxel volume mm3 / 1000).
    """
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    organs = [int(o) for o in organs]
    voxel_cm3 = float(np.prod(np.asarray(spacing_zyx, dtype=np.float64))) / 1000.0
    top = max(organs, default=0) + 1
    out = np.zeros((lab.shape[0], len(organs)), dtype=np.float64)
    for i in range(lab.shape[0]):
        flat = lab[i].ravel()
        if flat.size and flat.min() < 0:
            raise ValueError("member_volumes: labels must be non-negative")
        counts = np.bincount(flat.astype(np.int64, copy=False), minlength=top)
        out[i] = counts[organs] * voxel_cm3
    return out
