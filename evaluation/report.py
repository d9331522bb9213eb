"""The study report: Markdown + CSV + PNG + JSON from collected results (a pure function of them).

``write_report(results, out_dir)`` knows nothing about jobs, MLflow or files other than the ones it
writes. The jobs layer fills a :class:`StudyResults` (models, per-case metrics of every model on its
fold's test cases, pooled uncertainty counts, VVC rows) and calls it.

The parts: :mod:`sepnet.evaluation.results` (the inputs, per-organ statistics and case averages),
:mod:`sepnet.evaluation.claims` (the paper's six claims decided by paired tests),
:mod:`sepnet.evaluation.tables` (Markdown sections and CSV rows), :mod:`sepnet.evaluation.figures` (PNGs).
Dice is stored as a fraction in [0, 1] (CSV/JSON) and shown in % in Markdown; HD95/ASSD in mm.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from sepnet.core.organs import ORGAN_NAMES
from sepnet.evaluation import figures
from sepnet.evaluation.claims import STATISTICS_NOTE, Claim, evaluate_claims, statistics_settings
from sepnet.evaluation.results import (
    CaseIndex,
    CaseMetricRow,
    ModelInfo,
    Stat,
    StudyResults,
    VVCRow,
    ordered_models,
)
from sepnet.evaluation.tables import (
    METRIC_TABLE_HEADER,
    MODELS_HEADER,
    claims_section,
    csv_text,
    json_safe,
    metric_notes,
    metric_table,
    models_section,
    summary,
    uncertainty_section,
    vvc_section,
)
from sepnet.evaluation.uncertainty import UncertaintyCounts, error_rate_trend, vvc_dice_fit, vvc_dice_table
from sepnet.hpc.atomic import atomic_write_bytes, atomic_write_text

__all__ = ["CaseMetricRow", "Claim", "ModelInfo", "Stat", "StudyResults", "VVCRow", "evaluate_claims",
           "write_report"]


def write_report(results: StudyResults, out_dir: str | os.PathLike, *, mlflow_runs: str | None = None) -> Path:
    """Write report.md, report.json, CSV tables and PNG figures into ``out_dir``; return report.md's path.

    ``mlflow_runs``: a line saying where the study's runs are browsed (a URL, or the command that
    serves them), shown under the title and kept in report.json.

    Files: report.md, report.json, per_case.csv, dice_table.csv, hd95_table.csv, models.csv,
    uncertainty_levels.csv / error_rates.png (with uncertainty counts), vvc_dice.csv / vvc_dice.png
    (with VVC rows), dice_by_organ.png, hd95_by_organ.png. Every file is written atomically.
    Raises ValueError when per_case rows name a model that is not in ``results.models``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    idx = CaseIndex(results.per_case)
    names = [n for n in ordered_models(results) if n in idx.by]
    unknown = sorted(set(idx.by) - set(results.models))
    if unknown:
        raise ValueError(f"write_report: per_case rows name models not in StudyResults.models: {unknown}")
    claims = evaluate_claims(results)
    md = [*_header(results, names, mlflow_runs=mlflow_runs), *claims_section(claims), "", STATISTICS_NOTE]
    tables = {}
    for metric, title in (("dice", "Dice similarity coefficient"), ("hd95", "95% Hausdorff distance")):
        text, rows = metric_table(results, idx, names, metric) if names else ("(no per-case metrics)", [])
        tables[metric] = rows
        md += ["", f"## {title}", "", text]
    md += ["", *metric_notes(results, names)]
    models_md, model_rows = models_section(results)
    md += ["", *models_md]
    pngs = _organ_figures(idx, names, out) if names else []
    if names:
        md += ["", "![DSC per organ](dice_by_organ.png)", "", "![HD95 per organ](hd95_by_organ.png)"]
    unc_json = vvc_json = None
    if results.uncertainty is not None:
        unc_md, png, unc_json = _write_uncertainty(results.uncertainty, out)
        md += ["", *unc_md]
        pngs.append(png)
    if results.vvc:
        vvc_md, png, vvc_json = _write_vvc(results.vvc, out)
        md += ["", *vvc_md]
        pngs.append(png)
    _write_tables(results, out, tables, model_rows)
    report = {
        "study": results.study,
        "folds": list(results.folds),
        "meta": results.meta,
        "mlflow_runs": mlflow_runs,
        "models": {n: asdict(results.models[n]) for n in ordered_models(results)},
        "summary": summary(idx, names),
        "per_organ": {metric: [dict(zip(METRIC_TABLE_HEADER, r)) for r in rows] for metric, rows in tables.items()},
        "claims": [asdict(c) for c in claims],
        "claims_statistics": statistics_settings(),
        "uncertainty": unc_json,
        "vvc": vvc_json,
        "figures": [p.name for p in pngs],
    }
    _atomic_write(out / "report.json", json.dumps(json_safe(report), indent=2, default=str) + "\n")
    return _atomic_write(out / "report.md", "\n".join(md) + "\n")


def _atomic_write(path: Path, data: str | bytes) -> Path:
    return atomic_write_bytes(path, data) if isinstance(data, bytes) else atomic_write_text(path, data)


def _header(results: StudyResults, names: list[str], *, mlflow_runs: str | None = None) -> list[str]:
    """Title, folds/cases/models line, meta lines (and where the MLflow runs are), and the claims
    section's heading."""
    md = [f"# Study report: {results.study}", "",
          f"Folds: {', '.join(map(str, results.folds)) or '–'}. "
          f"Test cases: {len({(r.fold, r.case_id) for r in results.per_case})}. Models: {len(names)}."]
    md += [f"- {k}: {v}" for k, v in results.meta.items()]
    if mlflow_runs:
        md.append(f"- {mlflow_runs}")
    return md + ["", "## Claims of the paper on this data", ""]


def _organ_figures(idx: CaseIndex, names: list[str], out: Path) -> list[Path]:
    """dice_by_organ.png and hd95_by_organ.png: per-organ means of every model."""
    pngs = []
    for metric, fname, ylabel, scale in (("dice", "dice_by_organ.png", "DSC (%)", 100.0),
                                         ("hd95", "hd95_by_organ.png", "95%HD (mm)", 1.0)):
        vals = {n: {o: idx.organ_stat(n, o, metric).mean for o in idx.organs()} for n in names}
        pngs.append(figures.metric_bars_figure(vals, out / fname, ylabel=ylabel, scale=scale,
                                               title=f"{ylabel} per organ (mean over test cases)"))
    return pngs


def _write_uncertainty(u: UncertaintyCounts, out: Path) -> tuple[list[str], Path, dict]:
    """uncertainty_levels.csv and error_rates.png; returns the Markdown section, the PNG and the JSON."""
    table = u.table()
    cols = ["region", "level", "entropy", "voxels", "errors", "error_rate", "error_share"]
    _atomic_write(out / "uncertainty_levels.csv", csv_text(cols, [[r[k] for k in cols] for r in table]))
    png = figures.error_rate_figure(table, out / "error_rates.png",
                                    title=f"Error rate and error share per uncertainty level "
                                          f"({u.n_members} members, all folds)")
    md = [*uncertainty_section(table), "", "![error rates](error_rates.png)"]
    trend = [error_rate_trend(u, region=r) for r in ("whole", "background", "organs")]
    return md, png, {**u.to_dict(), "trend": trend}


def _write_vvc(rows: list[VVCRow], out: Path) -> tuple[list[str], Path, dict]:
    """vvc_dice.csv and vvc_dice.png; returns the Markdown section, the PNG and the JSON."""
    vt = vvc_dice_table(rows)
    fit = vvc_dice_fit(vt)
    _atomic_write(out / "vvc_dice.csv", csv_text(["organ_id", "organ", "mean_vvc", "mean_dice", "cases"],
                                                 [[r["organ_id"], r["organ"], r["vvc"], r["dice"], r["n"]]
                                                  for r in vt]))
    png = figures.vvc_dice_figure(vt, out / "vvc_dice.png", fit=fit)
    md = [*vvc_section(vt, fit), "", "![VVC vs DSC](vvc_dice.png)"]
    return md, png, {"organs": vt, "fit": asdict(fit)}


def _write_tables(results: StudyResults, out: Path, tables: dict[str, list[list]], model_rows: list[list]) -> None:
    """per_case.csv, dice_table.csv, hd95_table.csv and models.csv."""
    _atomic_write(out / "per_case.csv", csv_text(
        ["fold", "model", "case_id", "organ_id", "organ", "dice", "hd95", "assd", "flag"],
        [[r.fold, r.model, r.case_id, r.organ_id, ORGAN_NAMES.get(r.organ_id, ""), r.dice, r.hd95, r.assd, r.flag]
         for r in results.per_case]))
    _atomic_write(out / "dice_table.csv", csv_text(METRIC_TABLE_HEADER, tables["dice"]))
    _atomic_write(out / "hd95_table.csv", csv_text(METRIC_TABLE_HEADER, tables["hd95"]))
    _atomic_write(out / "models.csv", csv_text(MODELS_HEADER, model_rows))
