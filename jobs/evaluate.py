"""Evaluation jobs: every trained model of a fold and their ensemble on the fold's test cases.

``EvalTask(spec)()`` (submitted by ``sepnet cv`` after the fold's trainings) writes into
``<root>/eval/fold<F>/``: ``metrics.csv`` (fold, model, case, organ: Dice, HD95, ASSD, volumes, flag),
``vvc.csv`` (structure uncertainty vs ensemble Dice), ``uncertainty.json`` (Fig. 12 counts),
``figures/`` (overlays and uncertainty maps of the first test case), ``ensemble/`` (fused labels and
vote-entropy maps in the original geometry, NIfTI) and ``done.json`` last. Metrics also go to MLflow.

``sepnet evaluate --pred DIR --ref DIR`` compares label files (NIfTI/NRRD) case by case.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sepnet.core.errors import DataError
from sepnet.core.organs import NUM_CLASSES, ORGAN_IDS
from sepnet.jobs.study import Layout, atomic_write_json, atomic_write_text

log = logging.getLogger("sepnet.evaluate")

METRIC_FIELDS = ["fold", "model", "case", "organ", "name", "dice", "hd95", "assd", "vol_pred_cm3",
                 "vol_ref_cm3", "flag"]


def rows_to_csv(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


@dataclass
class EvalSpec:
    study: str
    study_root: str
    store: str
    fold: int
    test_cases: list[str]
    models: list[str]  # every trained model of the fold (members and baselines)
    members: list[str]  # the ensemble's members, in config order
    inference: dict[str, Any]  # InferenceConfig as dict
    ensemble: dict[str, Any]  # EnsembleConfig as dict
    evaluation: dict[str, Any]  # EvaluationConfig as dict
    patch: list[int] = field(default_factory=lambda: [16, 128, 128])
    mlflow_uri: str | None = None
    experiment: str | None = None
    fold_run_key: str | None = None
    save_maps: bool = True
    threads: int | None = None  # torch intra-op threads (executor.cpus_per_task)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ensemble_weights(members: list, *, weighting: str, rank_weights: list[float] | None) -> np.ndarray:
    """(N, K) fusion weights of the members: rank weights from validation Dice, or equal."""
    from sepnet.core.ensemble import rank_weights as _rank

    n = len(members)
    if weighting == "equal" or n == 0:
        return np.ones((n, NUM_CLASSES))
    dice = np.stack([m.val_dice(NUM_CLASSES) for m in members])
    return _rank(dice, weights=rank_weights)


class EvalTask:
    """Callable for submitit: evaluates one fold. Idempotent: returns at once when done.json exists."""

    def __init__(self, spec: EvalSpec):
        self.spec = spec

    def __call__(self) -> dict:
        s = self.spec
        layout = Layout(Path(s.study_root))
        out = layout.eval_dir(s.fold)
        if layout.evaluated(s.fold):
            return json.loads((out / "done.json").read_text())
        t0 = time.time()
        device = _device()
        if s.threads:
            torch.set_num_threads(s.threads)
        with torch.no_grad():  # a context, not set_grad_enabled: debug jobs share this process
            return self._evaluate(s, layout, out, t0, device)

    def _evaluate(self, s, layout, out, t0, device) -> dict:
        from sepnet.core.ensemble import member_volumes, vote_entropy, vvc
        from sepnet.core.inference import sliding_window
        from sepnet.data.store import Store
        from sepnet.evaluation.metrics import evaluate_case, metrics_table, to_rows
        from sepnet.evaluation.uncertainty import error_counts, pool
        from sepnet.jobs.models import load_trained

        store = Store(s.store)
        models = {name: load_trained(layout.model_dir(s.fold, name)) for name in s.models}
        members = [models[n] for n in s.members if n in models]
        weights = ensemble_weights(members, weighting=s.ensemble.get("weighting", "rank"),
                                   rank_weights=s.ensemble.get("rank_weights"))
        patch = list(s.inference.get("patch") or s.patch)
        results: dict[str, dict[str, list]] = {name: {} for name in [*models, "ensemble"]}
        vvc_rows: list[dict] = []
        counts = []
        conv = s.evaluation.get("hd_convention", "max")
        pct = float(s.evaluation.get("percentile", 95.0))
        for ci, case in enumerate(s.test_cases):
            meta = store.meta(case)
            ref = store.read_label(case)
            spacing = meta.spacing_zyx
            images: dict[tuple, np.ndarray] = {}
            fused = None
            member_labels = []
            for name, model in models.items():
                key = tuple(model.channels)
                if key not in images:
                    images[key] = store.read_image(case, list(key))
                probs = sliding_window(
                    images[key], model.predictor(device), num_classes=NUM_CLASSES, patch=patch,
                    overlap=float(s.inference.get("overlap", 0.5)), batch_size=int(s.inference.get("batch_size", 2)),
                    tta=bool(s.inference.get("tta", False)), device=device,
                )
                labels = probs.argmax(0).to(torch.uint8).cpu().numpy()
                results[name][case] = evaluate_case(labels, ref, spacing_zyx=spacing, annotated=meta.annotated,
                                                    convention=conv, percentile=pct)
                if model in members:
                    i = members.index(model)
                    w = torch.as_tensor(weights[i], dtype=torch.float32).view(-1, 1, 1, 1)
                    fused = probs * w if fused is None else fused.add_(probs * w)
                    member_labels.append(labels)
                del probs
            if not members:
                continue
            fused /= torch.as_tensor(weights.sum(0), dtype=torch.float32).clamp_min(1e-12).view(-1, 1, 1, 1)
            ens = fused.argmax(0).to(torch.uint8).cpu().numpy()
            del fused
            ens_metrics = evaluate_case(ens, ref, spacing_zyx=spacing, annotated=meta.annotated,
                                        convention=conv, percentile=pct)
            results["ensemble"][case] = ens_metrics
            stack = np.stack(member_labels)
            entropy = vote_entropy(stack)
            counts.append(error_counts(ens, ref, entropy, n_members=len(members), annotated=meta.annotated))
            v = vvc(member_volumes(stack, spacing_zyx=spacing, organs=ORGAN_IDS))
            for m, organ_vvc in zip(ens_metrics, v):
                if m.flag.value != "not_annotated":
                    vvc_rows.append({"fold": s.fold, "case": case, "organ": m.organ, "name": m.name,
                                     "vvc": float(organ_vvc), "dice": m.dice})
            if s.save_maps:
                self._save_maps(out, case, store, meta, ens, entropy, ref, first=ci == 0)
        rows = []
        for name, by_case in results.items():
            for r in to_rows(by_case):
                rows.append({"fold": s.fold, "model": name, **r})
        atomic_write_text(out / "metrics.csv", rows_to_csv(rows, METRIC_FIELDS))
        atomic_write_text(out / "vvc.csv", rows_to_csv(vvc_rows, ["fold", "case", "organ", "name", "vvc", "dice"]))
        pooled = pool(counts)
        atomic_write_json(out / "uncertainty.json", pooled.to_dict() if pooled else {})
        summaries = {name: metrics_table(by_case)["summary"] for name, by_case in results.items() if by_case}
        done = {
            "fold": s.fold,
            "cases": s.test_cases,
            "members": [m.name for m in members],
            "weights": weights.tolist(),
            "models": {name: {"kind": m.kind, "network": m.spec["member"]["network"],
                              "transform": m.spec["member"]["transform"], "loss": m.spec["member"]["loss"],
                              "alpha": m.spec["member"]["alpha"], "params": m.done.get("params"),
                              "train_seconds": m.done.get("train_seconds")} for name, m in models.items()},
            "summary": summaries,
            "seconds": time.time() - t0,
        }
        self._log_mlflow(summaries, results, out)
        atomic_write_json(out / "done.json", done)
        return done

    # ------------------------------------------------------------------ outputs

    def _save_maps(self, out: Path, case: str, store, meta, ens, entropy, ref, *, first: bool) -> None:
        from sepnet.data.readers import write_labels, write_volume
        from sepnet.data.store import to_original

        ens_dir = out / "ensemble"
        write_labels(to_original(ens, meta, order=0), meta.geometry, ens_dir / f"{case}_labels.nii.gz")
        write_volume(to_original(entropy.astype(np.float32), meta, order=1), meta.geometry,
                     ens_dir / f"{case}_entropy.nii.gz")
        if first:
            from sepnet.evaluation import figures

            img = store.read_image(case, [store.channels(case)[0]])[0]
            fig_dir = out / "figures"
            fig_dir.mkdir(parents=True, exist_ok=True)
            figures.overlay_figure(img, ref, ens, fig_dir / f"overlay_{case}.png", spacing_zyx=meta.spacing_zyx,
                                   title=f"fold {self.spec.fold} {case}: reference (solid) vs ensemble (dashed)")
            figures.uncertainty_figure(img, entropy, fig_dir / f"uncertainty_{case}.png",
                                       spacing_zyx=meta.spacing_zyx, title=f"vote entropy, {case}")

    def _log_mlflow(self, summaries: dict, results: dict, out: Path) -> None:
        s = self.spec
        if not s.mlflow_uri or not s.experiment:
            return
        from sepnet.jobs import tracking

        try:
            client = tracking.client(s.mlflow_uri)
            exp = tracking.ensure_experiment(client, s.experiment)
            parent = tracking.find_run(client, exp, s.fold_run_key) if s.fold_run_key else None
            for name, summary in summaries.items():
                run_id = tracking.get_or_create_run(
                    client, exp, key=model_run_key(s.study, s.fold, name), name=f"fold{s.fold}/{name}",
                    parent_run_id=parent, tags={"sepnet.fold": str(s.fold), "sepnet.model": name},
                )
                metrics = {f"test_{k}": v for k, v in summary.items() if isinstance(v, float) and math.isfinite(v)}
                from sepnet.evaluation.metrics import metrics_table

                for row in metrics_table(results[name])["organs"]:
                    for k in ("dice_mean", "hd95_mean"):
                        if math.isfinite(row[k]):
                            metrics[f"test_{k.split('_')[0]}_{row['name']}"] = row[k]
                from mlflow.entities import Metric

                ts = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])
                if name == "ensemble":
                    for f in ("metrics.csv", "vvc.csv", "uncertainty.json"):
                        if (out / f).is_file():
                            client.log_artifact(run_id, str(out / f))
                    if (out / "figures").is_dir():
                        client.log_artifacts(run_id, str(out / "figures"), "figures")
                client.set_terminated(run_id)
        except Exception as e:  # noqa: BLE001 - tracking must not lose an evaluation
            log.warning("MLflow logging failed for fold %d: %s", s.fold, e)


def model_run_key(study: str, fold: int, model: str) -> str:
    return f"{study}/fold{fold}/{model}"


# --------------------------------------------------------------------------- CLI: compare label files

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, help="folder of predicted label files (<case>.nii.gz or .nrrd)")
    p.add_argument("--ref", required=True, help="folder of reference label files with the same names")
    p.add_argument("-o", "--out", help="write per-organ metrics CSV here (default: print a summary only)")
    p.add_argument("--convention", choices=["max", "pooled"], default="max", help="HD95 convention (default max)")


def _read_labels(path: Path):
    import SimpleITK as sitk

    from sepnet.data.case import Geometry

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DataError(f"{path}: cannot read ({str(e).strip().splitlines()[-1]})") from None
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim != 3:
        raise DataError(f"{path}: expected a 3-D label map, got {arr.ndim}-D")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise DataError(f"{path}: label values must be integers")
        arr = arr.astype(np.int16)
    if arr.min() < 0 or arr.max() > 22:
        raise DataError(f"{path}: label values must be in 0..22, found {int(arr.min())}..{int(arr.max())}")
    geom = Geometry(spacing=img.GetSpacing(), origin=img.GetOrigin(), direction=img.GetDirection(), shape=arr.shape)
    return arr.astype(np.uint8), geom


def _stem(p: Path) -> str:
    name = p.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return p.stem


def run(args: argparse.Namespace) -> int:
    from sepnet.evaluation.metrics import evaluate_case, metrics_table, to_rows

    pred_dir, ref_dir = Path(args.pred), Path(args.ref)
    for d in (pred_dir, ref_dir):
        if not d.is_dir():
            raise DataError(f"{d}: not a folder")
    refs = {_stem(p): p for p in sorted(ref_dir.iterdir()) if p.is_file() and not p.name.startswith(".")}
    preds = {_stem(p): p for p in sorted(pred_dir.iterdir()) if p.is_file() and not p.name.startswith(".")}
    common = sorted(set(refs) & set(preds))
    if not common:
        raise DataError(f"{pred_dir} and {ref_dir}: no case names in common")
    results, failed = {}, 0
    for case in common:
        try:
            pred, pg = _read_labels(preds[case])
            ref, rg = _read_labels(refs[case])
            if not pg.same_grid(rg):
                raise DataError(f"{preds[case]}: grid differs from {refs[case]} (shape/spacing/origin/direction)")
            results[case] = evaluate_case(pred, ref, spacing_zyx=rg.spacing_zyx, convention=args.convention)
        except DataError as e:
            print(f"skipped: {e}")
            failed += 1
    if results:
        table = metrics_table(results)
        for row in table["organs"]:
            print(f"{row['name']:<18} Dice {row['dice_mean']:.3f}  HD95 {row['hd95_mean']:.2f} mm  (n={row['n']})")
        sm = table["summary"]
        print(f"mean Dice {sm['dice_mean']:.4f}, weighted Dice {sm['dice_weighted']:.4f}, "
              f"weighted HD95 {sm['hd95_weighted']:.3f} mm over {sm['cases']} case(s)")
        if args.out:
            rows = [{"model": "pred", "fold": "", **r} for r in to_rows(results)]
            atomic_write_text(Path(args.out), rows_to_csv(rows, METRIC_FIELDS))
            print(f"wrote {args.out}")
    return 1 if failed else 0


__all__ = ["EvalSpec", "EvalTask", "asdict", "model_run_key"]
