"""The report job: collects every evaluated fold of a study and writes the cross-fold report.

Reads ``<root>/eval/fold<F>/{done.json, metrics.csv, vvc.csv, uncertainty.json}``, builds a
:class:`sepnet.evaluation.report.StudyResults`, writes ``<root>/report/`` and logs it as artifacts
of the study's parent MLflow run.

``metrics.csv`` rows of a model named ``<model>+pp`` (e.g. ``ensemble+pp``: keep-largest-component
postprocessing applied) become their own report column. ``uncertainty.json`` is
:func:`sepnet.evaluation.uncertainty.counts_to_json` output; when it has per-case counts, claim 5 is
decided by a paired test over cases.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from sepnet.core.errors import DataError
from sepnet.jobs.config import StudyConfig
from sepnet.jobs.study import Layout

log = logging.getLogger("sepnet.report")


def collect_results(cfg: StudyConfig, fold_ids: list[int]):
    from sepnet.evaluation.report import ModelInfo, StudyResults
    from sepnet.evaluation.uncertainty import counts_from_json, pool

    layout = Layout(Path(cfg.root))
    models: dict[str, ModelInfo] = {}
    for m in cfg.models():
        models[m.name] = ModelInfo(name=m.name, kind="member" if m in cfg.members else "baseline",
                                   network=m.network, transform=m.transform, loss=m.loss,
                                   alpha=m.alpha if m.loss == "ath_exp_log" else None)
    models["ensemble"] = ModelInfo(name="ensemble", kind="ensemble", network="sepnet")
    per_case: list[dict] = []
    per_case_counts: dict = {}  # (fold, case_id) -> UncertaintyCounts
    vvc_rows: list[dict] = []
    counts = []
    folds_done = []
    for f in fold_ids:
        d = layout.eval_dir(f)
        if not (d / "done.json").is_file():
            raise DataError(f"{d}: fold {f} is not evaluated (no done.json)")
        done = json.loads((d / "done.json").read_text())
        folds_done.append(f)
        for name, info in done.get("models", {}).items():
            if name in models:
                if info.get("params"):
                    models[name].params = int(info["params"])
                if info.get("train_seconds") is not None:
                    models[name].train_seconds[f] = float(info["train_seconds"])
        with open(d / "metrics.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        for name in sorted({r["model"] for r in rows}):
            base = name.removesuffix("+pp")
            if name != base and base in models and name not in models:
                models[name] = replace(models[base], name=name, postprocessed=True, train_seconds={})
        per_case += [r for r in rows if r["model"] in models]
        if (d / "vvc.csv").is_file():
            with open(d / "vvc.csv", newline="") as fh:
                vvc_rows += list(csv.DictReader(fh))
        unc = json.loads((d / "uncertainty.json").read_text()) if (d / "uncertainty.json").is_file() else {}
        pooled, cases = counts_from_json(unc)
        if pooled is not None:
            counts.append(pooled)
        per_case_counts.update({(f, case): c for case, c in cases.items()})
    members = [m for m in cfg.members]
    if members:
        models["ensemble"].params = sum(models[m.name].params or 0 for m in members) or None
    meta: dict[str, Any] = {
        "config": cfg.source_path or "(in memory)",
        "ensemble": f"{len(members)} members, {cfg.ensemble.weighting} weights",
        "HD95 convention": cfg.evaluation.hd_convention,
        "training": f"{cfg.training.epochs} epochs x {cfg.training.iterations_per_epoch} iterations, "
                    f"batch {cfg.training.batch_size}, patch {cfg.training.patch}, base {cfg.training.base}",
    }
    return StudyResults(study=cfg.name, folds=folds_done, models=models, per_case=per_case,
                        uncertainty=pool(counts), vvc=vvc_rows, meta=meta, uncertainty_cases=per_case_counts)


class ReportTask:
    """Callable for submitit: write the report (always rewritten: it is cheap and reflects all folds)."""

    def __init__(self, *, cfg: StudyConfig, fold_ids: list[int], parent_run_id: str | None = None):
        self.cfg = cfg
        self.fold_ids = list(fold_ids)
        self.parent_run_id = parent_run_id

    def __call__(self) -> str:
        from sepnet.evaluation.report import write_report

        layout = Layout(Path(self.cfg.root))
        results = collect_results(self.cfg, self.fold_ids)
        path = write_report(results, layout.report, mlflow_runs=self._runs_url())
        self._log(layout.report)
        self._log_ensemble()
        from sepnet.hpc.resources import peak_rss_gib

        print(f"report: {path}, peak RSS {peak_rss_gib():.2f} GiB", flush=True)
        return str(path)

    def _log_ensemble(self) -> None:
        """The evaluated ensemble as an MLflow model of the study run, registered when ``mlflow.register``
        is set (:func:`sepnet.jobs.registry.log_ensemble`); a failure is a warning, the report stays."""
        try:
            from sepnet.jobs import registry, tracking

            done = registry.log_ensemble(self.cfg, client=tracking.client(tracking.resolve_uri(self.cfg)),
                                         run_id=self.parent_run_id)
            if done is not None:
                print(done.line(), flush=True)
        except Exception as e:  # noqa: BLE001 - the report on disk is what matters
            log.warning("MLflow logging of the ensemble model failed: %s", e)

    def _runs_url(self) -> str | None:
        """Where to browse the study's MLflow runs (None when MLflow cannot be read)."""
        from sepnet.jobs import tracking

        try:
            return tracking.ui_hint(tracking.resolve_uri(self.cfg), self.cfg.mlflow.experiment or self.cfg.name)
        except Exception as e:  # noqa: BLE001 - the report on disk is what matters
            log.warning("MLflow runs address unknown: %s", e)
            return None

    def _log(self, report_dir: Path) -> None:
        from sepnet.jobs import tracking

        try:
            client = tracking.client(tracking.resolve_uri(self.cfg))
            run_id = self.parent_run_id
            if run_id is None:
                exp = tracking.ensure_experiment(client, self.cfg.mlflow.experiment or self.cfg.name)
                run_id = tracking.find_run(client, exp, self.cfg.name)
            if run_id is None:
                return
            client.log_artifacts(run_id, str(report_dir), "report")
            summary = json.loads((report_dir / "report.json").read_text())
            import math
            import time

            from mlflow.entities import Metric

            # only the ensemble's headline figures on the parent (the chart view stays readable); every
            # model's figures are on its own run and in the report's tables
            metrics = []
            for model, prefix in (("ensemble", "ensemble"), ("ensemble+pp", "ensemble_pp")):
                s = (summary.get("summary") or {}).get(model) or {}
                for metric in ("dice", "hd95"):
                    v = (s.get(metric) or {}).get("weighted", {}).get("mean")
                    if v is not None and math.isfinite(v):
                        metrics.append(Metric(f"{prefix}_{metric}_weighted", float(v), int(time.time() * 1000), 0))
            if metrics:
                client.log_batch(run_id, metrics=metrics)
            for f in self.fold_ids:
                fold_run = tracking.find_run(client, client.get_run(run_id).info.experiment_id,
                                             f"{self.cfg.name}/fold{f}")
                if fold_run:
                    client.set_terminated(fold_run)
            client.set_terminated(run_id)
        except Exception as e:  # noqa: BLE001 - the report on disk is what matters
            log.warning("MLflow logging of the report failed: %s", e)
