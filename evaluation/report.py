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
- Non-finite HD95 (an empty mask; see evaluation/metrics) is left out of means and counted.
- Claims compare models on the (fold, case) pairs they share, so folds one model lacks do not bias it.
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
from sepnet.evaluation.uncertainty import UncertaintyCounts, error_rate_trend, vvc_dice_fit, vvc_dice_table

KINDS = ("member", "baseline", "ensemble")
UNET_VARIANTS = ("unet3d", "unet3d_res", "unet3d_se")
NETWORK_LABELS = {"sepnet": "3D-SepNet", "unet3d": "3D-UNet", "unet3d_res": "3D-UNet-Res", "unet3d_se": "3D-UNet-SE"}
LOSS_LABELS = {"ath_exp_log": "ATH-L_Exp", "exp_log": "L_Exp", "dice": "Dice loss"}


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
    re-grouped in that order). ``uncertainty`` is the fold-pooled Fig. 12 counts of the ensemble."""

    study: str
    folds: list[int]
    models: dict[str, ModelInfo]
    per_case: list[CaseMetricRow]
    uncertainty: UncertaintyCounts | None = None
    vvc: list[VVCRow] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # shown as "key: value" lines in the header

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


def _paired(idx: _Index, a: str, b: str, how: str, metric: str = "dice") -> tuple[float, float, int]:
    sa, sb = idx.case_scores(a, metric, how), idx.case_scores(b, metric, how)
    keys = [k for k in sa if k in sb and math.isfinite(sa[k]) and math.isfinite(sb[k])]
    if not keys:
        return float("nan"), float("nan"), 0
    return float(np.mean([sa[k] for k in keys])), float(np.mean([sb[k] for k in keys])), len(keys)


# --------------------------------------------------------------------------- claims

@dataclass
class Claim:
    id: int
    title: str
    status: str  # "held" | "not held" | "not measured"
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


def _compare_claim(
    cid: int,
    title: str,
    idx: _Index,
    pairs: list[tuple[str, str, str]],
    *,
    how: str,
    needs: str,
) -> Claim:
    """pairs: (winner-candidate, other, group description). Held iff the candidate's paired mean Dice is
    higher in every comparison with data."""
    numbers = []
    for a, b, group in pairs:
        ma, mb, n = _paired(idx, a, b, how)
        if n:
            numbers.append({"group": group, "model": a, "other": b, "dice": ma, "other_dice": mb, "cases": n,
                            "holds": bool(ma > mb)})
    if not numbers:
        return Claim(cid, title, "not measured", f"not measured (needs {needs} in the config)")
    held = all(x["holds"] for x in numbers)
    metric = {"mean": "mean DSC", "weighted": "weighted DSC", "small": "small-organ DSC"}[how]
    detail = "; ".join(
        f"{x['model']} {_pct(x['dice'])} vs {x['other']} {_pct(x['other_dice'])} ({metric}, {x['cases']} cases)"
        for x in numbers
    )
    return Claim(cid, title, "held" if held else "not held", detail, numbers)


def _first(names: list[str], models: dict[str, ModelInfo], pred: Callable[[ModelInfo], bool]) -> str | None:
    return next((n for n in names if pred(models[n])), None)


def evaluate_claims(results: StudyResults) -> list[Claim]:
    """The paper's six claims, each held / not held / not measured on this study's data."""
    idx = _Index(results.per_case)
    models = results.models
    single = [n for n in _ordered_models(results) if models[n].kind != "ensemble" and n in idx.by]
    claims = []

    # (1) SLF vs NLF: same network + loss (+ alpha); the SLF1 model (paper's choice) else the first SLF.
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
    claims.append(_compare_claim(1, "SLF intensity transform beats NLF windows (same network and loss)", idx,
                                 pairs, how="mean", needs="an SLF and an NLF model with the same network and loss"))

    # (2) ATH-L_Exp vs L_Exp: same network + transform; the alpha=0.5 ATH model (paper's Table 1) else the first.
    pairs = []
    groups = {}
    for n in single:
        groups.setdefault((models[n].network, models[n].transform), []).append(n)
    for (net, tr), names in groups.items():
        ath = [n for n in names if models[n].loss == "ath_exp_log"]
        ref = _first(ath, models, lambda m: m.alpha == 0.5) or (ath[0] if ath else None)
        for other in names:
            if ref and models[other].loss == "exp_log":
                pairs.append((ref, other, f"{net}/{tr}"))
    claims.append(_compare_claim(2, "ATH-L_Exp beats L_Exp (same network and transform)", idx, pairs, how="mean",
                                 needs="an ath_exp_log and an exp_log model with the same network and transform"))

    # (3) SepNet vs 3D-UNet variants on small organs: same transform + loss (+ alpha).
    pairs = []
    groups = {}
    for n in single:
        m = models[n]
        groups.setdefault((m.transform, m.loss, m.alpha if m.loss == "ath_exp_log" else None), []).append(n)
    for (tr, loss, _alpha), names in groups.items():
        sep = next((n for n in names if models[n].network == "sepnet"), None)
        for other in names:
            if sep and models[other].network in UNET_VARIANTS:
                pairs.append((sep, other, f"{tr}/{loss}"))
    claims.append(_compare_claim(3, "3D-SepNet beats 3D-UNet variants on small organs", idx, pairs, how="small",
                                 needs="a sepnet and a unet3d (or _res/_se) model with the same transform and loss"))

    # (4) ensemble vs the best single member (weighted DSC), best chosen on the shared test cases.
    ens = [n for n in _ordered_models(results) if models[n].kind == "ensemble" and n in idx.by]
    members = [n for n in single if models[n].kind == "member"]
    if ens and members:
        e = ens[0]
        comps = [(m, *_paired(idx, e, m, "weighted")) for m in members]
        comps = [c for c in comps if c[3]]
        if comps:
            best = max(comps, key=lambda c: c[2])
            held = all(c[1] > c[2] for c in comps)
            claims.append(Claim(4, "The ensemble beats the best single member (weighted DSC)",
                                "held" if held else "not held",
                                f"{e} {_pct(best[1])} vs best member {best[0]} {_pct(best[2])} "
                                f"(weighted DSC, {best[3]} cases)",
                                [{"model": e, "other": m, "dice": a, "other_dice": b, "cases": n, "holds": bool(a > b)}
                                 for m, a, b, n in comps]))
    if len(claims) < 4:
        claims.append(Claim(4, "The ensemble beats the best single member (weighted DSC)", "not measured",
                            "not measured (needs an ensemble of at least one member in the config, evaluated)"))

    # (5) error rate grows with the uncertainty level.
    title5 = "Voxel error rate increases with the vote-entropy level"
    u = results.uncertainty
    trends = [error_rate_trend(u, region=r) for r in ("whole", "background", "organs")] if u is not None else []
    if trends and trends[0]["increases"] is not None:
        t = trends[0]
        detail = "; ".join(
            f"{x['region']}: {_pct(x['rate_certain'])} at entropy 0 vs {_pct(x['rate_uncertain'])} above, "
            f"Spearman {x['spearman']:.2f} over {x['levels_used']} levels"
            for x in trends if x["increases"] is not None
        )
        claims.append(Claim(5, title5, "held" if t["increases"] else "not held", detail, trends))
    else:
        claims.append(Claim(5, title5, "not measured",
                            "not measured (needs ensemble uncertainty counts: an ensemble of >= 2 members evaluated)"))

    # (6) VVC negatively correlated with Dice across organs.
    title6 = "Structure uncertainty (VVC) is negatively correlated with DSC"
    table = vvc_dice_table(results.vvc) if results.vvc else []
    fit = vvc_dice_fit(table) if table else None
    if fit is not None and fit.n >= 3 and math.isfinite(fit.r):
        # "held" needs a negative correlation that is also significant (p < 0.05), not just a sign
        claims.append(Claim(6, title6, "held" if fit.r < 0 and fit.p < 0.05 else "not held",
                            f"Pearson r = {fit.r:.2f} (p = {fit.p:.3g}), slope {100 * fit.slope:.1f} "
                            f"DSC-% per unit VVC, over {fit.n} organs", [asdict(fit)]))
    else:
        claims.append(Claim(6, title6, "not measured",
                            "not measured (needs ensemble VVC rows for at least 3 organs with varying values)"))
    return claims


# --------------------------------------------------------------------------- writing

def _atomic_write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8", "newline": ""})) as f:
        f.write(data)
    os.replace(tmp, path)
    return path


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


def _fmt(s: Stat, metric: str) -> str:
    if s.n == 0:
        return "–"
    if metric == "dice":
        return f"{100 * s.mean:.1f} ± {100 * s.std:.1f}"
    return f"{s.mean:.2f} ± {s.std:.2f}"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _metric_table(results: StudyResults, idx: _Index, names: list[str], metric: str) -> tuple[str, list[list]]:
    """Markdown table (organs x models, best per row bold) and long-format CSV rows."""
    higher_better = metric == "dice"
    unit = "DSC (mean ± std %) ↑" if metric == "dice" else "95%HD (mean ± std mm) ↓"
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
                v = LOSS_LABELS.get(v, v) + (f" (α={m.alpha:g})" if v and m.loss == "ath_exp_log" and m.alpha else "")
            cells.append(f"*{v}*" if v else "")
        lines.append(_md_row([label, *cells]))
    csv_rows = []

    def emit(label: str, stats: list[Stat], key: str) -> None:
        # compare at display precision so models that look tied are all bold
        digits = 1 if metric == "dice" else 2
        means = [round((100 if metric == "dice" else 1) * s.mean, digits) if s.n else np.nan for s in stats]
        finite = [v for v in means if math.isfinite(v)]
        best = (max(finite) if higher_better else min(finite)) if len(finite) >= 2 else None
        cells = [f"**{_fmt(s, metric)}**" if best is not None and v == best else _fmt(s, metric)
                 for s, v in zip(stats, means)]
        lines.append(_md_row([label, *cells]))
        for n, s in zip(names, stats):
            csv_rows.append([n, key, label.strip("*"), s.mean, s.std, s.n, s.missing])

    for organ in idx.organs():
        emit(ORGAN_NAMES.get(organ, str(organ)).replace("_", " "),
             [idx.organ_stat(n, organ, metric) for n in names], str(organ))
    for how, label in AVERAGES:
        emit(f"**{label}**", [Stat.of(idx.case_scores(n, metric, how).values()) for n in names], how)
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
    md: list[str] = [f"# Study report: {results.study}", ""]
    md.append(f"Folds: {', '.join(map(str, results.folds)) or '–'}. "
              f"Test cases: {len({(r.fold, r.case_id) for r in results.per_case})}. Models: {len(names)}.")
    for k, v in results.meta.items():
        md.append(f"- {k}: {v}")
    md += ["", "## Claims of the paper on this data", "", _md_row(["#", "claim", "status", "numbers"]),
           _md_row(["---", "---", "---", "---"])]
    icon = {"held": "✅ held", "not held": "❌ not held", "not measured": "➖ not measured"}
    for c in claims:
        md.append(_md_row([str(c.id), c.title, icon[c.status], c.detail.replace("|", "/")]))

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
                  "and are left out of the HD95 means.")
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
    header = ["model", "organ_id", "organ", "mean", "std", "n", "missing"]
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
        "uncertainty": unc_json,
        "vvc": vvc_json,
        "figures": [p.name for p in pngs],
    }
    _atomic_write(out / "report.json", json.dumps(_clean(report), indent=2, default=str) + "\n")
    return _atomic_write(out / "report.md", "\n".join(md) + "\n")
