"""What a study report is made of: :class:`StudyResults` and the case index the tables and claims read.

The jobs layer fills a :class:`StudyResults` (models, per-case metrics of every model on its fold's test
cases, pooled uncertainty counts, VVC rows); :class:`CaseIndex` looks rows up by model, case and organ.

Conventions:
- Dice is a fraction in [0, 1]; HD95/ASSD in mm, NaN/inf where undefined (an empty mask).
- Per-organ statistics: mean +- std (population, ddof = 0) over all (fold, case) rows with a finite value.
- Averages: each case's score is computed first (StructSeg-weighted mean over organs with
  :func:`sepnet.core.organs.weighted_mean`, the unweighted mean, or the mean over
  :data:`sepnet.core.organs.SMALL_ORGANS`), then mean +- std over cases, like the paper's "Average" rows.
- An organ is *missed* (flag ``pred_empty``) when the reference has it and the prediction is empty.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sepnet.core.organs import ORGAN_IDS, ORGAN_NAMES, SMALL_ORGANS, weighted_mean
from sepnet.evaluation.uncertainty import UncertaintyCounts

KINDS = ("member", "baseline", "ensemble")
MISSED = "pred_empty"  # the metrics module's flag for an organ present in the reference, predicted empty
# (how, label) of the case averages; AVERAGE_ORGANS: the organs each one covers (None = all)
AVERAGES = (("weighted", "Weighted average (StructSeg)"), ("mean", "Average"), ("small", "Small organs"))
AVERAGE_ORGANS = {"weighted": tuple(ORGAN_NAMES), "mean": None, "small": SMALL_ORGANS}


@dataclass
class ModelInfo:
    """One column of the report.

    kind: ``member`` (an ensemble member), ``baseline`` (a comparison/ablation model) or ``ensemble``.
    params: trainable parameter count; train_seconds: fold -> wall-clock training seconds.
    postprocessed: keep-largest-component applied (e.g. "ensemble+pp"); shown, never in a claim.
    """

    name: str
    kind: str = "member"
    network: str | None = None
    transform: str | None = None
    loss: str | None = None
    alpha: float | None = None
    params: int | None = None
    train_seconds: dict[int, float] = field(default_factory=dict)
    postprocessed: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ModelInfo {self.name}: kind {self.kind!r} is not one of {KINDS}")


@dataclass
class CaseMetricRow:
    """Metrics of one model on one organ of one test case. dice in [0, 1]; hd95, assd in mm (NaN/inf
    where undefined); flag: the metrics module's note (e.g. empty prediction), '' if none."""

    fold: int
    model: str
    case_id: str
    organ_id: int
    dice: float
    hd95: float = float("nan")
    assd: float = float("nan")
    flag: str = ""


@dataclass
class VVCRow:
    """Structure uncertainty of one organ in one test case: VVC across the members and the ensemble Dice."""

    fold: int
    case_id: str
    organ_id: int
    vvc: float
    dice: float


@dataclass
class StudyResults:
    """Everything the report shows. ``models`` keeps column order (members, baselines, ensemble are
    re-grouped in that order). ``uncertainty`` is the fold-pooled Fig. 12 counts of the ensemble;
    ``uncertainty_cases`` the same counts per (fold, case_id), which claim 5's paired test uses.
    ``per_case``/``vvc`` also accept dicts such as the CSV rows of jobs/evaluate."""

    study: str
    folds: list[int]
    models: dict[str, ModelInfo]
    per_case: list[CaseMetricRow]
    uncertainty: UncertaintyCounts | None = None
    vvc: list[VVCRow] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # shown as "key: value" lines in the header
    uncertainty_cases: dict[tuple[int, str], UncertaintyCounts] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.per_case = [r if isinstance(r, CaseMetricRow) else _row_from_dict(CaseMetricRow, r) for r in self.per_case]
        self.vvc = [r if isinstance(r, VVCRow) else _row_from_dict(VVCRow, r) for r in self.vvc]
        for name, m in self.models.items():
            if m.name != name:
                raise ValueError(f"StudyResults.models: key {name!r} differs from ModelInfo.name {m.name!r}")


_ALIASES = {"case": "case_id", "organ": "organ_id"}
_TYPES = {"fold": int, "organ_id": int, "case_id": str, "model": str, "flag": str,
          "dice": float, "hd95": float, "assd": float, "vvc": float}


def _row_from_dict(cls, d: dict):
    """A row dataclass from a dict such as a CSV row of jobs/evaluate (``case``/``organ`` accepted for
    ``case_id``/``organ_id``; values converted from strings; unknown keys like ``name`` ignored)."""
    names = {f for f in cls.__dataclass_fields__}
    kw = {}
    for k, v in d.items():
        k = _ALIASES.get(k, k)
        if k in names:
            if k in ("dice", "hd95", "assd", "vvc") and (v is None or v == ""):
                v = float("nan")
            kw[k] = _TYPES.get(k, lambda x: x)(v)
    return cls(**kw)


@dataclass(frozen=True)
class Stat:
    """mean, std (ddof = 0) and count n of the finite values; missing: the non-finite ones."""

    mean: float
    std: float
    n: int
    missing: int = 0

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        a = np.asarray([float(v) for v in values], dtype=np.float64)
        ok = np.isfinite(a)
        if not ok.any():
            return cls(float("nan"), float("nan"), 0, int(a.size))
        return cls(float(a[ok].mean()), float(a[ok].std(ddof=0)), int(ok.sum()), int((~ok).sum()))


def ordered_models(results: StudyResults) -> list[str]:
    """Model names grouped by kind (members, baselines, ensemble), config order within a kind."""
    return [n for k in KINDS for n, m in results.models.items() if m.kind == k]


def pct(x: float) -> str:
    """A fraction as text in % with one decimal; "n/a" when not finite."""
    return "n/a" if not math.isfinite(x) else f"{100 * x:.1f}%"


class CaseIndex:
    """per_case rows indexed by model -> (fold, case_id) -> organ -> row (``.by``)."""

    def __init__(self, rows: list[CaseMetricRow]) -> None:
        self.by: dict[str, dict[tuple[int, str], dict[int, CaseMetricRow]]] = {}
        for r in rows:
            self.by.setdefault(r.model, {}).setdefault((int(r.fold), str(r.case_id)), {})[int(r.organ_id)] = r

    def organs(self) -> list[int]:
        """The organs any row has, in ORGAN_IDS order, unknown ids last."""
        found = {o for cases in self.by.values() for organs in cases.values() for o in organs}
        return [o for o in ORGAN_IDS if o in found] + sorted(found - set(ORGAN_IDS))

    def missed(self, model: str, organs: Iterable[int] | None = None) -> int:
        """Number of (case, organ) rows of ``model`` flagged missed, over ``organs`` (None = all)."""
        keep = None if organs is None else set(organs)
        return sum(1 for c in self.by.get(model, {}).values() for o, r in c.items()
                   if r.flag == MISSED and (keep is None or o in keep))

    def organ_stat(self, model: str, organ: int, metric: str) -> Stat:
        vals = [getattr(c[organ], metric) for c in self.by.get(model, {}).values() if organ in c]
        return Stat.of(vals)

    def case_scores(self, model: str, metric: str, how: str) -> dict[tuple[int, str], float]:
        """(fold, case) -> the case's average of ``metric`` over organs: how = weighted | mean | small."""
        out = {}
        for key, organs in self.by.get(model, {}).items():
            vals = {o: float(getattr(r, metric)) for o, r in organs.items()}
            out[key] = _average(vals, how)
        return out

    def paired(self, a: str, b: str, how: str, metric: str = "dice") -> tuple[np.ndarray, np.ndarray]:
        """Case scores of ``a`` and ``b`` on the (fold, case) pairs where both are finite, in the same order."""
        sa, sb = self.case_scores(a, metric, how), self.case_scores(b, metric, how)
        keys = sorted(k for k in sa if k in sb and math.isfinite(sa[k]) and math.isfinite(sb[k]))
        return np.asarray([sa[k] for k in keys], float), np.asarray([sb[k] for k in keys], float)


def _average(vals: dict[int, float], how: str) -> float:
    if how == "weighted":
        return weighted_mean({o: v for o, v in vals.items() if o in ORGAN_NAMES})
    if how == "small":
        vals = {o: v for o, v in vals.items() if o in SMALL_ORGANS}
    finite = [v for v in vals.values() if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")
