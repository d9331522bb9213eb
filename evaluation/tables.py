"""The report's tables as text: Markdown sections and CSV rows (pure functions, no files).

Dice is shown in % in Markdown and kept as a fraction in CSV rows; HD95 in mm. Per-organ cells are
mean ± std over all (fold, case) rows; non-finite HD95 is left out of the means, and beside every HD mean
the cell gives the number of organs the model missed, so a missed lens never hides behind a small mean.
Best per row is bold, compared at display precision.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import asdict

import numpy as np

from sepnet.core.organs import ORGAN_NAMES, SMALL_ORGANS
from sepnet.evaluation.claims import Claim
from sepnet.evaluation.results import (
    AVERAGE_ORGANS,
    AVERAGES,
    CaseIndex,
    ModelInfo,
    Stat,
    StudyResults,
    ordered_models,
    pct,
)
from sepnet.evaluation.significance import HELD, INCONCLUSIVE, NOT_HELD
from sepnet.evaluation.uncertainty import LineFit

NETWORK_LABELS = {"sepnet": "3D-SepNet", "unet3d": "3D-UNet", "unet3d_res": "3D-UNet-Res", "unet3d_se": "3D-UNet-SE"}
LOSS_LABELS = {"ath_exp_log": "ATH-L_Exp", "exp_log": "L_Exp", "dice": "Dice loss"}
# columns of dice_table.csv / hd95_table.csv, the rows metric_table returns
METRIC_TABLE_HEADER = ["model", "organ_id", "organ", "mean", "std", "n", "missing", "missed"]
MODELS_HEADER = ["model", "kind", "network", "transform", "loss", "alpha", "params", "train_seconds_per_fold",
                 "train_seconds_total"]
_STATUS_ICONS = {HELD: "✅ held", NOT_HELD: "❌ not held", INCONCLUSIVE: "❔ inconclusive",
                 "not measured": "➖ not measured"}


def csv_text(header: list[str], rows: Iterable[Iterable]) -> str:
    """CSV with "\\n" line ends; NaN floats become empty cells."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in r])
    return buf.getvalue()


def json_safe(obj):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    return obj


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def hms(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt(s: Stat, metric: str, *, missed: int = 0, bold: bool = False) -> str:
    """A table cell; distance cells carry the number of missed organs behind their mean."""
    tail = f" ({missed} missed)" if missed and metric != "dice" else ""
    if s.n == 0:
        return "–" + tail
    text = f"{100 * s.mean:.1f} ± {100 * s.std:.1f}" if metric == "dice" else f"{s.mean:.2f} ± {s.std:.2f}"
    return (f"**{text}**" if bold else text) + tail


def claims_section(claims: list[Claim]) -> list[str]:
    """The claims table: number, title, status with its icon, numbers ('|' in them shown as '/')."""
    lines = [md_row(["#", "claim", "status", "numbers"]), md_row(["---", "---", "---", "---"])]
    return lines + [md_row([str(c.id), c.title, _STATUS_ICONS[c.status], c.detail.replace("|", "/")])
                    for c in claims]


def summary(idx: CaseIndex, names: list[str]) -> dict:
    """report.json's ``summary``: model -> metric -> average -> Stat fields (+ ``missed`` for distances)."""
    out: dict = {}
    for n in names:
        out[n] = {
            metric: {how: asdict(Stat.of(idx.case_scores(n, metric, how).values())) for how, _ in AVERAGES}
            for metric in ("dice", "hd95", "assd")
        }
        for metric in ("hd95", "assd"):  # organs whose distance is undefined because they were missed
            for how, _ in AVERAGES:
                out[n][metric][how]["missed"] = idx.missed(n, AVERAGE_ORGANS[how])
    return out


def _model_header_rows(results: StudyResults, names: list[str]) -> list[str]:
    """The italic network / transform / loss rows under a metric table's header."""
    lines = []
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
        lines.append(md_row([label, *cells]))
    return lines


def metric_table(results: StudyResults, idx: CaseIndex, names: list[str], metric: str) -> tuple[str, list[list]]:
    """Markdown table (organs x models, best per row bold) and long-format CSV rows
    (:data:`METRIC_TABLE_HEADER`) of ``metric`` (dice | hd95)."""
    higher_better = metric == "dice"
    unit = "DSC (mean ± std %) ↑" if metric == "dice" else "95%HD (mean ± std mm; missed organs) ↓"
    lines = [md_row([unit, *names]), md_row(["---"] + [":---:"] * len(names)), *_model_header_rows(results, names)]
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
        lines.append(md_row([label, *cells]))
        for n, s, k in zip(names, stats, missed):
            csv_rows.append([n, key, label.strip("*"), s.mean, s.std, s.n, s.missing, k])

    for organ in idx.organs():
        emit(ORGAN_NAMES.get(organ, str(organ)).replace("_", " "),
             [idx.organ_stat(n, organ, metric) for n in names], str(organ), [organ])
    for how, label in AVERAGES:
        emit(f"**{label}**", [Stat.of(idx.case_scores(n, metric, how).values()) for n in names], how,
             AVERAGE_ORGANS[how])
    return "\n".join(lines), csv_rows


def metric_notes(results: StudyResults, names: list[str]) -> list[str]:
    """The lines under the metric tables: how cells are computed, missing HD95, postprocessing, flags."""
    md = ["Per-organ cells: mean ± std over all test cases of all folds. Averages: each case's mean over its "
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
    return md


def _model_row(m: ModelInfo) -> tuple[str, list]:
    """One model's Markdown row and models.csv row (train seconds: mean per fold and total, NaN if none)."""
    secs = list(m.train_seconds.values())
    per_fold = float(np.mean(secs)) if secs else float("nan")
    total = float(np.sum(secs)) if secs else float("nan")
    md = md_row([m.name, m.kind, NETWORK_LABELS.get(m.network or "", m.network or ""), m.transform or "",
                 LOSS_LABELS.get(m.loss or "", m.loss or ""),
                 f"{m.alpha:g}" if m.alpha is not None and m.loss == "ath_exp_log" else "",
                 f"{m.params:,}" if m.params is not None else "",
                 hms(per_fold) if secs else "", hms(total) if secs else ""])
    row = [m.name, m.kind, m.network or "", m.transform or "", m.loss or "",
           "" if m.alpha is None else m.alpha, "" if m.params is None else m.params, per_fold, total]
    return md, row


def models_section(results: StudyResults) -> tuple[list[str], list[list]]:
    """The "Models" section (every model of the config, grouped by kind) and models.csv rows
    (:data:`MODELS_HEADER`)."""
    md = ["## Models", "", md_row(["model", "kind", "network", "transform", "loss", "α", "parameters",
                                   "train time / fold", "train time total"]),
          md_row(["---", "---", "---", "---", "---", "---:", "---:", "---:", "---:"])]
    rows = []
    for n in ordered_models(results):
        line, row = _model_row(results.models[n])
        md.append(line)
        rows.append(row)
    return md, rows


def uncertainty_section(table: list[dict]) -> list[str]:
    """The Fig. 12 table from :meth:`UncertaintyCounts.table` rows: per level, error rate and error share
    of the whole volume, the predicted background and the predicted organs."""
    md = ["## Voxel uncertainty (Fig. 12)", "",
          md_row(["level", "entropy (nats)", "voxels", "error rate: whole", "error rate: pred. background",
                  "error rate: pred. organs", "share of errors: whole", "share: pred. background",
                  "share: pred. organs"]),
          md_row(["---"] + ["---:"] * 8)]
    by = {(r["region"], r["level"]): r for r in table}
    for lv in sorted({r["level"] for r in table}):
        w = by[("whole", lv)]
        md.append(md_row([f"L{lv}", f"{w['entropy']:.4f}", f"{w['voxels']:,}"]
                         + [pct(by[(reg, lv)]["error_rate"]) for reg in ("whole", "background", "organs")]
                         + [pct(by[(reg, lv)]["error_share"]) for reg in ("whole", "background", "organs")]))
    return md


def vvc_section(vt: list[dict], fit: LineFit) -> list[str]:
    """The Fig. 13 table from :func:`sepnet.evaluation.uncertainty.vvc_dice_table` rows and its fit line."""
    md = ["## Structure uncertainty (Fig. 13)", "",
          md_row(["organ", "mean VVC", "mean ensemble DSC (%)", "cases"]),
          md_row(["---", "---:", "---:", "---:"])]
    for r in vt:
        md.append(md_row([r["organ"].replace("_", " "), f"{r['vvc']:.3f}", f"{100 * r['dice']:.1f}", str(r["n"])]))
    md += ["", f"Least-squares fit DSC = {fit.slope:.3f} · VVC + {fit.intercept:.3f}, Pearson r = {fit.r:.2f} "
           f"(p = {fit.p:.3g}, {fit.n} organs)."]
    return md
