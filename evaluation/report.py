"""The study report: Markdown + CSV + PNG + JSON from collected results (a pure function of them).

``write_report(results, out_dir)`` knows nothing about jobs, MLflow or files other than the ones it
writes. The jobs layer fills a :class:`StudyResults` (models, per-case metrics of every model on its
fold's test cases, pooled uncertainty counts, VVC rows) and calls it.

Conventions:
- Dice is stored as a fraction in [0, 1] (CSV/JSON) and shown in % in Markdown; HD95/ASSD in mm.
- Per-organ cells: mean +- std (population, ddof = 0) over all (fold, case) rows with a finite value.
- Averages: each case's score is computed first (StructSeg-weighted mean over organs with
  :func:`sepnet.core.organs.weighted_mean`, the unweighted mean, or the mean over
  :data:`sepnet.core.organs.SMALL_ORGANS`), then mean +- std over cases, like the paper's "Average" rows.
- Non-finite HD95 (an empty mask; see evaluation/metrics) is left out of means and counted; beside every
  HD mean the report gives the number of missed organs (flag ``pred_empty``: the reference has the
  organ, the prediction is empty), so a missed lens never hides behind a small mean.
- Claims compare models on the (fold, case) pairs they share, so folds one model lacks do not bias it, and
  are decided by paired tests (:mod:`sepnet.evaluation.significance`): held / not held / inconclusive.
- A model whose ModelInfo has ``postprocessed=True`` (e.g. "ensemble+pp": keep-largest-component applied,
  :mod:`sepnet.core.postprocess`) is shown as its own column and never enters a claim.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sepnet.core.organs import ORGAN_IDS, ORGAN_NAMES, SMALL_ORGANS, weighted_mean
from sepnet.evaluation import figures
from sepnet.evaluation.significance import (
    ALPHA,
    HELD,
    INCONCLUSIVE,
    NOT_HELD,
    PairedTest,
    combine,
    min_cases,
    paired_test,
)
from sepnet.evaluation.uncertainty import UncertaintyCounts, error_rate_trend, vvc_dice_fit, vvc_dice_table
from sepnet.hpc.atomic import atomic_write_bytes, atomic_write_text

KINDS = ("member", "baseline", "ensemble")
UNET_VARIANTS = ("unet3d", "unet3d_res", "unet3d_se")
NETWORK_LABELS = {"sepnet": "3D-SepNet", "unet3d": "3D-UNet", "unet3d_res": "3D-UNet-Res", "unet3d_se": "3D-UNet-SE"}
LOSS_LABELS = {"ath_exp_log": "ATH-L_Exp", "exp_log": "L_Exp", "dice": "Dice loss"}
MISSED = "pred_empty"  # the metrics module's flag for an organ present in the reference, predicted empty
# Smallest effects a claim needs (below them it is inconclusive): mean paired DSC difference (0.5 points),
# mean paired error-rate difference (1 point), and |Pearson r| of VVC against DSC.
MIN_DICE_EFFECT = 0.005
MIN_ERROR_RATE_EFFECT = 0.01
MIN_VVC_R = 0.3
MIN_UNCERTAIN_VOXELS = 100  # pooled-count fallback of claim 5


@dataclass
class ModelInfo:
    """One column of the report.

    kind: ``member`` (an ensemble member), ``baseline`` (a comparison/ablation model) or ``ensemble``.
    params: trainable parameter count; train_seconds: fold -> wall-clock training seconds.
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
    ``uncertainty_cases`` the same counts per (fold, case_id), which claim 5's paired test uses."""

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


# --------------------------------------------------------------------------- statistics

@dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    n: int
    missing: int = 0  # rows with a non-finite value

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat:
        a = np.asarray([float(v) for v in values], dtype=np.float64)
        ok = np.isfinite(a)
        if not ok.any():
            return cls(float("nan"), float("nan"), 0, int(a.size))
        return cls(float(a[ok].mean()), float(a[ok].std(ddof=0)), int(ok.sum()), int((~ok).sum()))


def _ordered_models(results: StudyResults) -> list[str]:
    return [n for k in KINDS for n, m in results.models.items() if m.kind == k]


class _Index:
    """per_case rows indexed by model -> (fold, case_id) -> organ -> row."""

    def __init__(self, rows: list[CaseMetricRow]) -> None:
        self.by: dict[str, dict[tuple[int, str], dict[int, CaseMetricRow]]] = {}
        for r in rows:
            self.by.setdefault(r.model, {}).setdefault((int(r.fold), str(r.case_id)), {})[int(r.organ_id)] = r

    def organs(self) -> list[int]:
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


def _average(vals: dict[int, float], how: str) -> float:
    if how == "weighted":
        return weighted_mean({o: v for o, v in vals.items() if o in ORGAN_NAMES})
    if how == "small":
        vals = {o: v for o, v in vals.items() if o in SMALL_ORGANS}
    finite = [v for v in vals.values() if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


AVERAGES = (("weighted", "Weighted average (StructSeg)"), ("mean", "Average"), ("small", "Small organs"))
_AVERAGE_ORGANS = {"weighted": tuple(ORGAN_NAMES), "mean": None, "small": SMALL_ORGANS}


def _paired(idx: _Index, a: str, b: str, how: str, metric: str = "dice") -> tuple[np.ndarray, np.ndarray]:
    """Case scores of ``a`` and ``b`` on the (fold, case) pairs where both are finite, in the same order."""
    sa, sb = idx.case_scores(a, metric, how), idx.case_scores(b, metric, how)
    keys = sorted(k for k in sa if k in sb and math.isfinite(sa[k]) and math.isfinite(sb[k]))
    return np.asarray([sa[k] for k in keys], float), np.asarray([sb[k] for k in keys], float)


# --------------------------------------------------------------------------- claims

@dataclass
class Claim:
    id: int
    title: str
    status: str  # "held" | "not held" | "inconclusive" | "not measured"
    detail: str
    numbers: list[dict] = field(default_factory=list)


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.1f}%"


def _model_label(m: ModelInfo) -> str:
    parts = [NETWORK_LABELS.get(m.network or "", m.network or "?"), m.transform or "?", LOSS_LABELS.get(m.loss or "",
             m.loss or "?")]
    if m.loss == "ath_exp_log" and m.alpha is not None:
        parts[-1] += f"(α={m.alpha:g})"
    return " / ".join(parts)


def _dice_comparison(idx: _Index, a: str, b: str, how: str, group: str = "") -> dict:
    """Paired test of "a has a higher case DSC than b" (``how`` average) as a numbers entry."""
    sa, sb = _paired(idx, a, b, how)
    t = paired_test(sa, sb, min_effect=MIN_DICE_EFFECT)
    return {"group": group, "model": a, "other": b, "dice": float(sa.mean()) if sa.size else float("nan"),
            "other_dice": float(sb.mean()) if sb.size else float("nan"), "cases": t.n, "status": t.status,
            "holds": t.status == HELD, **asdict(t)}


def _describe(x: dict, metric: str) -> str:
    t = {k: x[k] for k in ("status", "n", "effect", "ci_low", "ci_high", "p", "min_effect", "min_n", "reason")}
    return (f"{x['model']} {_pct(x['dice'])} vs {x['other']} {_pct(x['other_dice'])} ({metric}; "
            f"{PairedTest(**t).describe()}): {x['status']}")


def _compare_claim(
    cid: int,
    title: str,
    idx: _Index,
    pairs: list[tuple[str, str, str]],
    *,
    how: str,
    needs: str,
) -> Claim:
    """pairs: (winner-candidate, other, group description); each decided by a paired test on the case
    scores, the claim by :func:`sepnet.evaluation.significance.combine`."""
    numbers = [x for x in (_dice_comparison(idx, a, b, how, group) for a, b, group in pairs) if x["cases"]]
    if not numbers:
        return Claim(cid, title, "not measured", f"not measured (needs {needs} in the config)")
    metric = {"mean": "mean DSC", "weighted": "weighted DSC", "small": "small-organ DSC"}[how]
    detail = "; ".join(_describe(x, metric) for x in numbers)
    return Claim(cid, title, combine([x["status"] for x in numbers]), detail, numbers)


def _first(names: list[str], models: dict[str, ModelInfo], pred: Callable[[ModelInfo], bool]) -> str | None:
    return next((n for n in names if pred(models[n])), None)


def _claim_transform(idx: _Index, models: dict[str, ModelInfo], single: list[str]) -> Claim:
    """(1) SLF vs NLF: same network + loss (+ alpha); the SLF1 model (paper's choice) else the first SLF."""
    pairs = []
    groups: dict[tuple, list[str]] = {}
    for n in single:
        m = models[n]
        groups.setdefault((m.network, m.loss, m.alpha if m.loss == "ath_exp_log" else None), []).append(n)
    for (net, loss, alpha), names in groups.items():
        slf = [n for n in names if (models[n].transform or "").startswith("SLF")]
        ref = _first(slf, models, lambda m: m.transform == "SLF1") or (slf[0] if slf else None)
        for other in names:
            if ref and (models[other].transform or "").startswith("NLF"):
                pairs.append((ref, other, f"{net}/{loss}" + (f"(α={alpha:g})" if alpha is not None else "")))
    return _compare_claim(1, "SLF intensity transform beats NLF windows (same network and loss)", idx,
                          pairs, how="mean", needs="an SLF and an NLF model with the same network and loss")


def _claim_loss(idx: _Index, models: dict[str, ModelInfo], single: list[str]) -> Claim:
    """(2) ATH-L_Exp vs L_Exp: same network + transform; the alpha=0.5 ATH model (Table 1) else the first."""
    pairs = []
    groups: dict[tuple, list[str]] = {}
    for n in single:
        groups.setdefault((models[n].network, models[n].transform), []).append(n)
    for (net, tr), names in groups.items():
        ath = [n for n in names if models[n].loss == "ath_exp_log"]
        ref = _first(ath, models, lambda m: m.alpha == 0.5) or (ath[0] if ath else None)
        for other in names:
            if ref and models[other].loss == "exp_log":
                pairs.append((ref, other, f"{net}/{tr}"))
    return _compare_claim(2, "ATH-L_Exp beats L_Exp (same network and transform)", idx, pairs, how="mean",
                          needs="an ath_exp_log and an exp_log model with the same network and transform")


def _claim_network(idx: _Index, models: dict[str, ModelInfo], single: list[str]) -> Claim:
    """(3) SepNet vs each 3D-UNet variant on the small organs: same transform + loss (+ alpha)."""
    pairs = []
    groups: dict[tuple, list[str]] = {}
    for n in single:
        m = models[n]
        groups.setdefault((m.transform, m.loss, m.alpha if m.loss == "ath_exp_log" else None), []).append(n)
    for (tr, loss, _alpha), names in groups.items():
        sep = next((n for n in names if models[n].network == "sepnet"), None)
        for other in names:
            if sep and models[other].network in UNET_VARIANTS:
                pairs.append((sep, other, f"{tr}/{loss}"))
    return _compare_claim(3, "3D-SepNet beats 3D-UNet variants on small organs", idx, pairs, how="small",
                          needs="a sepnet and a unet3d (or _res/_se) model with the same transform and loss")


def _claim_ensemble(idx: _Index, results: StudyResults, single: list[str]) -> Claim:
    """(4) The (not postprocessed) ensemble beats every member (weighted DSC): each by a paired test."""
    title = "The ensemble beats the best single member (weighted DSC)"
    models = results.models
    ens = [n for n in _ordered_models(results) if models[n].kind == "ensemble" and n in idx.by
           and not models[n].postprocessed]
    members = [n for n in single if models[n].kind == "member"]
    comps = [_dice_comparison(idx, ens[0], m, "weighted") for m in members] if ens else []
    comps = [c for c in comps if c["cases"]]
    if not comps:
        return Claim(4, title, "not measured",
                     "not measured (needs an ensemble of at least one member in the config, evaluated)")
    best = max(comps, key=lambda c: c["other_dice"])
    others = [c for c in comps if c is not best]
    detail = "best member: " + _describe(best, "weighted DSC")
    if others:
        detail += f"; vs the other {len(others)} member(s): " + ", ".join(f"{c['other']} {c['status']}" for c in others)
    return Claim(4, title, combine([c["status"] for c in comps]), detail, comps)


def _claim_error_rate(results: StudyResults) -> Claim:
    """(5) Error rate at vote entropy > 0 above the rate at 0: paired over cases (per-case counts) or,
    with pooled counts only, a chi-square test on the 2x2 table (voxels treated as independent)."""
    title = "Voxel error rate increases with the vote-entropy level"
    u = results.uncertainty
    trends = [error_rate_trend(u, region=r) for r in ("whole", "background", "organs")] if u is not None else []
    trend_txt = "; ".join(
        f"{x['region']}: {_pct(x['rate_certain'])} at entropy 0 vs {_pct(x['rate_uncertain'])} above, "
        f"Spearman {x['spearman']:.2f} over {x['levels_used']} levels"
        for x in trends if x["increases"] is not None)
    if results.uncertainty_cases:
        certain, uncertain = [], []
        for c in results.uncertainty_cases.values():
            v, e = c.voxels["whole"], c.errors["whole"]
            if v[0] > 0 and v[1:].sum() > 0:
                certain.append(e[0] / v[0])
                uncertain.append(e[1:].sum() / v[1:].sum())
        t = paired_test(uncertain, certain, min_effect=MIN_ERROR_RATE_EFFECT)
        detail = f"per-case error rate above entropy 0 minus at 0: {t.describe()}"
        return Claim(5, title, t.status, detail + (f"; pooled {trend_txt}" if trend_txt else ""),
                     [{"test": "wilcoxon_per_case", **asdict(t)}, *trends])
    if u is None:
        return Claim(5, title, "not measured",
                     "not measured (needs ensemble uncertainty counts: an ensemble of >= 2 members evaluated)")
    v, e = u.voxels["whole"], u.errors["whole"]
    vu, eu, v0, e0 = int(v[1:].sum()), int(e[1:].sum()), int(v[0]), int(e[0])
    effect = (eu / vu if vu else float("nan")) - (e0 / v0 if v0 else float("nan"))
    num = {"test": "chi2_pooled", "uncertain_voxels": vu, "effect": effect, "p": float("nan")}
    if vu < MIN_UNCERTAIN_VOXELS or not v0:
        status, why = INCONCLUSIVE, f"{vu} voxels above entropy 0 < {MIN_UNCERTAIN_VOXELS} needed"
    else:
        from scipy.stats import chi2_contingency

        table = [[e0, v0 - e0], [eu, vu - eu]]
        num["p"] = p = float(chi2_contingency(table)[1]) if min(e0 + eu, v0 + vu - e0 - eu) > 0 else 1.0
        if abs(effect) < MIN_ERROR_RATE_EFFECT:
            status, why = INCONCLUSIVE, f"|effect| below the minimum {MIN_ERROR_RATE_EFFECT:g}"
        elif not p < ALPHA:
            status, why = INCONCLUSIVE, f"p >= {ALPHA:g}"
        else:
            status, why = (HELD if effect > 0 else NOT_HELD), ""
    detail = (f"pooled voxels (no per-case counts; voxels are not independent, so p is optimistic): "
              f"{100 * effect:+.2f} pts" + (f", p={num['p']:.2g}" if math.isfinite(num["p"]) else "")
              + (f" ({why})" if why else "") + (f"; {trend_txt}" if trend_txt else ""))
    return Claim(5, title, status, detail, [num, *trends])


def _claim_vvc(results: StudyResults) -> Claim:
    """(6) VVC negatively correlated with DSC across organs (Fig. 13): Pearson r with its p."""
    title = "Structure uncertainty (VVC) is negatively correlated with DSC"
    table = vvc_dice_table(results.vvc) if results.vvc else []
    fit = vvc_dice_fit(table) if table else None
    if fit is None or fit.n < 3 or not math.isfinite(fit.r):
        return Claim(6, title, "not measured",
                     "not measured (needs ensemble VVC rows for at least 3 organs with varying values)")
    if abs(fit.r) < MIN_VVC_R:
        status, why = INCONCLUSIVE, f"|r| below the minimum {MIN_VVC_R:g}"
    elif not fit.p < ALPHA:
        status, why = INCONCLUSIVE, f"p >= {ALPHA:g}"
    else:
        status, why = (HELD if fit.r < 0 else NOT_HELD), ""
    return Claim(6, title, status, f"Pearson r = {fit.r:.2f} (p = {fit.p:.3g}), slope {100 * fit.slope:.1f} "
                 f"DSC-% per unit VVC, over {fit.n} organs" + (f" ({why})" if why else ""), [asdict(fit)])


def evaluate_claims(results: StudyResults) -> list[Claim]:
    """The paper's six claims, each held / not held / inconclusive / not measured on this study's data."""
    idx = _Index(results.per_case)
    models = results.models
    single = [n for n in _ordered_models(results)
              if models[n].kind != "ensemble" and not models[n].postprocessed and n in idx.by]
    return [
        _claim_transform(idx, models, single),
        _claim_loss(idx, models, single),
        _claim_network(idx, models, single),
        _claim_ensemble(idx, results, single),
        _claim_error_rate(results),
        _claim_vvc(results),
    ]


STATISTICS_NOTE = (
    f"Claims 1-4: paired Wilcoxon signed-rank test (two-sided) of the case scores the two models share, with "
    f"a seeded bootstrap 95% CI of the mean difference; held/not held needs p < {ALPHA:g}, at least "
    f"{min_cases(ALPHA)} cases and a mean difference of at least {100 * MIN_DICE_EFFECT:g} DSC points, "
    f"otherwise inconclusive; a claim over several comparisons holds only if each holds. Claim 5: the same "
    f"test on each case's error rate above vs at entropy 0 (minimum {100 * MIN_ERROR_RATE_EFFECT:g} percentage "
    f"point). "
    f"Claim 6: Pearson r across organs, p < {ALPHA:g} and |r| >= {MIN_VVC_R:g}."
)


# --------------------------------------------------------------------------- writing

def _atomic_write(path: Path, data: str | bytes) -> Path:
    return atomic_write_bytes(path, data) if isinstance(data, bytes) else atomic_write_text(path, data)


def _csv_text(header: list[str], rows: Iterable[Iterable]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in r])
    return buf.getvalue()


def _clean(obj):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj


def _fmt(s: Stat, metric: str, *, missed: int = 0, bold: bool = False) -> str:
    """A table cell; distance cells carry the number of missed organs behind their mean."""
    tail = f" ({missed} missed)" if missed and metric != "dice" else ""
    if s.n == 0:
        return "–" + tail
    text = f"{100 * s.mean:.1f} ± {100 * s.std:.1f}" if metric == "dice" else f"{s.mean:.2f} ± {s.std:.2f}"
    return (f"**{text}**" if bold else text) + tail


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _metric_table(results: StudyResults, idx: _Index, names: list[str], metric: str) -> tuple[str, list[list]]:
    """Markdown table (organs x models, best per row bold) and long-format CSV rows."""
    higher_better = metric == "dice"
    unit = "DSC (mean ± std %) ↑" if metric == "dice" else "95%HD (mean ± std mm; missed organs) ↓"
    lines = [_md_row([unit, *names]), _md_row(["---"] + [":---:"] * len(names))]
    for label, attr in (("*Network*", "network"), ("*Transform*", "transform"), ("*Loss*", "loss")):
        cells = []
        for n in names:
            m = results.models[n]
            if m.kind == "ensemble":
                cells.append("ensemble" if attr == "network" else "")
                continue
            v = getattr(m, attr)
            if attr == "network":
                v = NETWORK_LABELS.get(v, v)
            if attr == "loss":
                v = LOSS_LABELS.get(v, v or "") + (f" (α={m.alpha:g})" if v and m.loss == "ath_exp_log" and m.alpha
                                                   else "")
            cells.append(f"*{v}*" if v else "")
        lines.append(_md_row([label, *cells]))
    csv_rows = []

    def emit(label: str, stats: list[Stat], key: str, organs: Iterable[int] | None) -> None:
        # compare at display precision so models that look tied are all bold
        digits = 1 if metric == "dice" else 2
        means = [round((100 if metric == "dice" else 1) * s.mean, digits) if s.n else np.nan for s in stats]
        finite = [v for v in means if math.isfinite(v)]
        best = (max(finite) if higher_better else min(finite)) if len(finite) >= 2 else None
        missed = [idx.missed(n, organs) for n in names]
        cells = [_fmt(s, metric, missed=k, bold=best is not None and v == best)
                 for s, v, k in zip(stats, means, missed)]
        lines.append(_md_row([label, *cells]))
        for n, s, k in zip(names, stats, missed):
            csv_rows.append([n, key, label.strip("*"), s.mean, s.std, s.n, s.missing, k])

    for organ in idx.organs():
        emit(ORGAN_NAMES.get(organ, str(organ)).replace("_", " "),
             [idx.organ_stat(n, organ, metric) for n in names], str(organ), [organ])
    for how, label in AVERAGES:
        emit(f"**{label}**", [Stat.of(idx.case_scores(n, metric, how).values()) for n in names], how,
             _AVERAGE_ORGANS[how])
    return "\n".join(lines), csv_rows


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def write_report(results: StudyResults, out_dir: str | os.PathLike) -> Path:
    """Write report.md, report.json, CSV tables and PNG figures into ``out_dir``; return report.md's path.

    Files: report.md, report.json, per_case.csv, dice_table.csv, hd95_table.csv, models.csv,
    uncertainty_levels.csv / error_rates.png (with uncertainty counts), vvc_dice.csv / vvc_dice.png
    (with VVC rows), dice_by_organ.png, hd95_by_organ.png. Every file is written atomically.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    idx = _Index(results.per_case)
    names = [n for n in _ordered_models(results) if n in idx.by]
    unknown = sorted(set(idx.by) - set(results.models))
    if unknown:
        raise ValueError(f"write_report: per_case rows name models not in StudyResults.models: {unknown}")
    claims = evaluate_claims(results)
    summary: dict[str, Any] = {}
    for n in names:
        summary[n] = {
            metric: {how: asdict(Stat.of(idx.case_scores(n, metric, how).values())) for how, _ in AVERAGES}
            for metric in ("dice", "hd95", "assd")
        }
        for metric in ("hd95", "assd"):  # organs whose distance is undefined because they were missed
            for how, _ in AVERAGES:
                summary[n][metric][how]["missed"] = idx.missed(n, _AVERAGE_ORGANS[how])
    md: list[str] = [f"# Study report: {results.study}", ""]
    md.append(f"Folds: {', '.join(map(str, results.folds)) or '–'}. "
              f"Test cases: {len({(r.fold, r.case_id) for r in results.per_case})}. Models: {len(names)}.")
    for k, v in results.meta.items():
        md.append(f"- {k}: {v}")
    md += ["", "## Claims of the paper on this data", "", _md_row(["#", "claim", "status", "numbers"]),
           _md_row(["---", "---", "---", "---"])]
    icon = {HELD: "✅ held", NOT_HELD: "❌ not held", INCONCLUSIVE: "❔ inconclusive",
            "not measured": "➖ not measured"}
    for c in claims:
        md.append(_md_row([str(c.id), c.title, icon[c.status], c.detail.replace("|", "/")]))
    md += ["", STATISTICS_NOTE]

    # per-organ tables
    tables = {}
    for metric, title in (("dice", "Dice similarity coefficient"), ("hd95", "95% Hausdorff distance")):
        text, rows = _metric_table(results, idx, names, metric) if names else ("(no per-case metrics)", [])
        tables[metric] = rows
        md += ["", f"## {title}", "", text]
    md += ["", "Per-organ cells: mean ± std over all test cases of all folds. Averages: each case's mean over its "
           "organs (StructSeg importance weights for the weighted one; small organs = "
           + ", ".join(ORGAN_NAMES[o].replace("_", " ") for o in SMALL_ORGANS)
           + "), then mean ± std over cases. Best per row in bold."]
    missing = sum(1 for r in results.per_case if not math.isfinite(float(r.hd95)))
    if missing:
        md.append(f"{missing} (model, case, organ) rows have no finite HD95 (an empty or not annotated mask) "
                  "and are left out of the HD95 means; \"k missed\" beside an HD mean counts the organs "
                  "(case, organ pairs) that model missed entirely (empty prediction, organ in the reference).")
    pp = [n for n in names if results.models[n].postprocessed]
    if pp:
        md.append(", ".join(pp) + ": keep-largest-connected-component postprocessing applied to the organs "
                  "chosen on the validation cases (not part of any claim).")
    flags: dict[str, int] = {}
    for r in results.per_case:
        if r.flag and r.flag != "ok":
            flags[r.flag] = flags.get(r.flag, 0) + 1
    if flags:
        md.append("Flags over all rows: " + ", ".join(f"{k} {v}" for k, v in sorted(flags.items())) + ".")

    # models
    md += ["", "## Models", "", _md_row(["model", "kind", "network", "transform", "loss", "α", "parameters",
                                         "train time / fold", "train time total"]),
           _md_row(["---", "---", "---", "---", "---", "---:", "---:", "---:", "---:"])]
    model_rows = []
    for n in _ordered_models(results):
        m = results.models[n]
        secs = list(m.train_seconds.values())
        per_fold = float(np.mean(secs)) if secs else float("nan")
        total = float(np.sum(secs)) if secs else float("nan")
        md.append(_md_row([n, m.kind, NETWORK_LABELS.get(m.network or "", m.network or ""), m.transform or "",
                           LOSS_LABELS.get(m.loss or "", m.loss or ""),
                           f"{m.alpha:g}" if m.alpha is not None and m.loss == "ath_exp_log" else "",
                           f"{m.params:,}" if m.params is not None else "",
                           _hms(per_fold) if secs else "", _hms(total) if secs else ""]))
        model_rows.append([n, m.kind, m.network or "", m.transform or "", m.loss or "",
                           "" if m.alpha is None else m.alpha, "" if m.params is None else m.params, per_fold, total])

    # figures
    pngs = []
    if names:
        for metric, fname, ylabel, scale in (("dice", "dice_by_organ.png", "DSC (%)", 100.0),
                                             ("hd95", "hd95_by_organ.png", "95%HD (mm)", 1.0)):
            vals = {n: {o: idx.organ_stat(n, o, metric).mean for o in idx.organs()} for n in names}
            pngs.append(figures.metric_bars_figure(vals, out / fname, ylabel=ylabel, scale=scale,
                                                   title=f"{ylabel} per organ (mean over test cases)"))
        md += ["", "![DSC per organ](dice_by_organ.png)", "", "![HD95 per organ](hd95_by_organ.png)"]

    unc_json = None
    if results.uncertainty is not None:
        u = results.uncertainty
        table = u.table()
        _atomic_write(out / "uncertainty_levels.csv", _csv_text(
            ["region", "level", "entropy", "voxels", "errors", "error_rate", "error_share"],
            [[r[k] for k in ("region", "level", "entropy", "voxels", "errors", "error_rate", "error_share")]
             for r in table]))
        pngs.append(figures.error_rate_figure(table, out / "error_rates.png",
                                              title=f"Error rate and error share per uncertainty level "
                                                    f"({u.n_members} members, all folds)"))
        md += ["", "## Voxel uncertainty (Fig. 12)", "",
               _md_row(["level", "entropy (nats)", "voxels", "error rate: whole", "error rate: pred. background",
                        "error rate: pred. organs", "share of errors: whole", "share: pred. background",
                        "share: pred. organs"]),
               _md_row(["---"] + ["---:"] * 8)]
        by = {(r["region"], r["level"]): r for r in table}
        for lv in sorted({r["level"] for r in table}):
            w = by[("whole", lv)]
            md.append(_md_row([f"L{lv}", f"{w['entropy']:.4f}", f"{w['voxels']:,}"]
                              + [_pct(by[(reg, lv)]["error_rate"]) for reg in ("whole", "background", "organs")]
                              + [_pct(by[(reg, lv)]["error_share"]) for reg in ("whole", "background", "organs")]))
        md += ["", "![error rates](error_rates.png)"]
        unc_json = {**u.to_dict(), "trend": [error_rate_trend(u, region=r) for r in ("whole", "background", "organs")]}

    vvc_json = None
    if results.vvc:
        vt = vvc_dice_table(results.vvc)
        fit = vvc_dice_fit(vt)
        _atomic_write(out / "vvc_dice.csv", _csv_text(["organ_id", "organ", "mean_vvc", "mean_dice", "cases"],
                                                      [[r["organ_id"], r["organ"], r["vvc"], r["dice"], r["n"]]
                                                       for r in vt]))
        pngs.append(figures.vvc_dice_figure(vt, out / "vvc_dice.png", fit=fit))
        md += ["", "## Structure uncertainty (Fig. 13)", "",
               _md_row(["organ", "mean VVC", "mean ensemble DSC (%)", "cases"]),
               _md_row(["---", "---:", "---:", "---:"])]
        for r in vt:
            md.append(_md_row([r["organ"].replace("_", " "), f"{r['vvc']:.3f}", f"{100 * r['dice']:.1f}", str(r["n"])]))
        md += ["", f"Least-squares fit DSC = {fit.slope:.3f} · VVC + {fit.intercept:.3f}, Pearson r = {fit.r:.2f} "
               f"(p = {fit.p:.3g}, {fit.n} organs).", "", "![VVC vs DSC](vvc_dice.png)"]
        vvc_json = {"organs": vt, "fit": asdict(fit)}

    # CSVs and JSON
    _atomic_write(out / "per_case.csv", _csv_text(
        ["fold", "model", "case_id", "organ_id", "organ", "dice", "hd95", "assd", "flag"],
        [[r.fold, r.model, r.case_id, r.organ_id, ORGAN_NAMES.get(r.organ_id, ""), r.dice, r.hd95, r.assd, r.flag]
         for r in results.per_case]))
    header = ["model", "organ_id", "organ", "mean", "std", "n", "missing", "missed"]
    _atomic_write(out / "dice_table.csv", _csv_text(header, tables["dice"]))
    _atomic_write(out / "hd95_table.csv", _csv_text(header, tables["hd95"]))
    _atomic_write(out / "models.csv", _csv_text(
        ["model", "kind", "network", "transform", "loss", "alpha", "params", "train_seconds_per_fold",
         "train_seconds_total"], model_rows))
    report = {
        "study": results.study,
        "folds": list(results.folds),
        "meta": results.meta,
        "models": {n: asdict(results.models[n]) for n in _ordered_models(results)},
        "summary": summary,
        "per_organ": {metric: [dict(zip(header, r)) for r in rows] for metric, rows in tables.items()},
        "claims": [asdict(c) for c in claims],
        "claims_statistics": {"alpha": ALPHA, "min_cases": min_cases(ALPHA), "min_dice_effect": MIN_DICE_EFFECT,
                              "min_error_rate_effect": MIN_ERROR_RATE_EFFECT, "min_vvc_r": MIN_VVC_R,
                              "min_uncertain_voxels_pooled": MIN_UNCERTAIN_VOXELS},
        "uncertainty": unc_json,
        "vvc": vvc_json,
        "figures": [p.name for p in pngs],
    }
    _atomic_write(out / "report.json", json.dumps(_clean(report), indent=2, default=str) + "\n")
    return _atomic_write(out / "report.md", "\n".join(md) + "\n")
