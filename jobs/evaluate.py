"""Evaluation jobs: every trained model of a fold and their ensemble on the fold's test cases.

``EvalTask(spec)()`` (submitted by ``sepnet cv`` after the fold's trainings) first predicts the fold's
validation cases with the ensemble (one pass, the test cases' inference settings) and decides the
keep-largest-component postprocessing per organ (``sepnet.core.postprocess.choose_postprocessing``),
then writes into ``<root>/eval/fold<F>/``: ``postprocess.json`` (the decision, ``PostprocessDecision.to_dict``
plus ``val_cases``), ``metrics.csv`` (fold, model, case, organ: Dice, HD95, ASSD, volumes, flag; model
``ensemble+pp`` = the ensemble after that postprocessing), ``vvc.csv`` (structure uncertainty vs ensemble
Dice), ``uncertainty.json`` (Fig. 12 counts, pooled and per case: ``counts_to_json``), ``figures/``
(overlays and uncertainty maps of the first test case), ``ensemble/`` (the final, postprocessed labels,
i.e. what ``sepnet predict`` gives, and vote-entropy maps in the original geometry, NIfTI) and
``done.json`` last. Metrics also go to MLflow. It prints one line per case (seconds, ensemble mean Dice)
and one summary line per model (weighted Dice, weighted HD95 with the missed organs beside it).

Cases are read with ``Store.read_checked`` (a damaged case is a DataError naming it). Each case goes
through ``sepnet.jobs.models.fuse_outputs``, the fusion of ``run_ensemble`` (the inference path ``sepnet
predict`` uses), on the models' outputs computed now (``ComputedOutputs``) or saved by a fan-out's infer
jobs (:class:`SavedOutputs`); its class indices become StructSeg ids (``to_organ_ids``) and a model on
an organ subset is evaluated on that subset's organs only, against the reference as the subset sees it
(``subset_reference``).

Fan-out (``evaluation.fan_out: true``): the fold's evaluation is split into one :class:`InferTask` per
model (``infer/fold<F>/<model>``, side by side, e.g. a SLURM array) and one fusion job
(``fuse/fold<F>``: ``EvalTask`` reading :class:`SavedOutputs` instead of running the networks). An infer
job saves per case ``<root>/eval/fold<F>/outputs/<model>/<case>.zarr``: a member's probabilities
(K, Z, Y, X) float16 on the stored grid (the val cases too: the postprocessing decision needs them), a
baseline's labels (Z, Y, X) uint8 (test cases only); each written under a temporary name and renamed,
so a rerun skips the cases already there; ``done.json`` of the model last. The fuse job loads one
member's probabilities at a time into the accumulator; ``outputs/`` is removed after the fold's
done.json unless ``evaluation.keep_outputs``.

``sepnet evaluate --pred DIR --ref DIR`` compares label files (NIfTI/NRRD) case by case.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sepnet.core.errors import DataError
from sepnet.hpc.atomic import atomic_write_json, atomic_write_text, replace_dir, temp_path
from sepnet.hpc.resources import peak_rss_gib
from sepnet.jobs.config import EnsembleConfig, EvaluationConfig, InferenceConfig, StudyConfig, stage_executor
from sepnet.jobs.study import Layout

log = logging.getLogger("sepnet.evaluate")

PP_MODEL = "ensemble+pp"  # the ensemble after the fold's postprocessing (a report column, never in a claim)
POSTPROCESS_FILE = "postprocess.json"
OUTPUTS = "outputs"  # eval/fold<F>/outputs/<model>/<case>.zarr: what a fan-out's infer jobs saved
OUTPUT_DTYPE = "float16"  # saved member probabilities (docs: float16 vs float32 measured on the phantom)
OUTPUT_CHUNKS = (16, 128, 128)  # (z, y, x) of a saved output's chunks; probabilities: (K, 16, 128, 128)

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
    """One fold's evaluation job; small and picklable. ``inference.patch`` is resolved (never None)."""

    study: str
    study_root: str
    store: str
    fold: int
    test_cases: list[str]
    models: list[str]  # every trained model of the fold (members and baselines)
    members: list[str]  # the ensemble's members, in config order
    inference: InferenceConfig
    ensemble: EnsembleConfig
    evaluation: EvaluationConfig
    mlflow_uri: str | None = None
    experiment: str | None = None
    fold_run_key: str | None = None
    save_maps: bool = True
    threads: int | None = None  # torch intra-op threads (executor.cpus_per_task)
    val_cases: list[str] = field(default_factory=list)  # the fold's validation cases: decide postprocessing


def make_eval_spec(cfg: StudyConfig, folds: list[dict], fold: int) -> EvalSpec:
    """The EvalSpec of ``fold`` of a loaded study config (``folds``: the study's split)."""
    from sepnet.jobs import tracking
    from sepnet.jobs.orchestrate import study_run_keys

    layout = Layout(Path(cfg.root))
    return EvalSpec(
        study=cfg.name, study_root=str(layout.root), store=str(layout.store), fold=fold,
        test_cases=list(folds[fold]["test"]), val_cases=list(folds[fold].get("val") or []),
        models=[m.name for m in cfg.models()],
        members=[m.name for m in cfg.members], inference=study_inference(cfg),
        ensemble=dataclasses.replace(cfg.ensemble), evaluation=dataclasses.replace(cfg.evaluation),
        mlflow_uri=tracking.resolve_uri(cfg), experiment=cfg.mlflow.experiment or cfg.name,
        fold_run_key=study_run_keys(cfg, fold), threads=stage_executor(cfg.executor, "evaluate").cpus_per_task,
    )


def study_inference(cfg: StudyConfig) -> InferenceConfig:
    """The study's inference settings with the patch resolved (``cfg.inference_patch``)."""
    return dataclasses.replace(cfg.inference, patch=list(cfg.inference_patch))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class _Results:
    """What the fold's test cases add up to: metrics per model and case, VVC rows, uncertainty counts
    per case."""

    by_model: dict[str, dict[str, list]]
    vvc_rows: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # case -> UncertaintyCounts


@dataclass
class _Case:
    """One stored case checked against its checksums: meta, ``image_of(channels)`` and the reference."""

    meta: object
    image_of: object
    ref: np.ndarray


def _read_case(store, case: str, models) -> _Case:
    """The channels the models need and the label of ``case``, read once with ``Store.read_checked``:
    a damaged case raises DataError naming it."""
    needed = list(dict.fromkeys(c for m in models for c in m.channels))
    image, ref = store.read_checked(case, needed)
    index = {c: i for i, c in enumerate(needed)}

    def image_of(channels: tuple[str, ...]) -> np.ndarray:
        return image[[index[c] for c in channels]].astype(np.float32)

    return _Case(meta=store.meta(case), image_of=image_of, ref=ref)


def outputs_dir(eval_dir: Path, model: str) -> Path:
    """Where a fan-out's infer job of ``model`` saves its outputs (one ``<case>.zarr`` each, done.json last)."""
    return Path(eval_dir) / OUTPUTS / model


def _model_digest(model_dir: Path) -> str:
    """sha256 of the model's done.json: a retrained model (a new done.json) does not match outputs saved
    from the old one."""
    import hashlib

    return hashlib.sha256((Path(model_dir) / "done.json").read_bytes()).hexdigest()


def save_output(path: Path, values, *, attrs: dict) -> int:
    """Write ``values`` (K, Z, Y, X) probabilities (saved as ``OUTPUT_DTYPE``) or (Z, Y, X) uint8 labels, torch
    or numpy, as one Zarr array (Blosc zstd, chunks ``OUTPUT_CHUNKS`` over all K) at ``path``: written
    under the temporary name of ``sepnet.hpc.atomic`` and renamed, so ``path`` exists only complete.
    Slabs of one chunk depth are converted at a time (no float16 copy of the whole volume). Returns bytes."""
    import zarr

    from sepnet.data.preprocess import zarr_compressors

    values = values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    probs = values.ndim == 4
    dtype = OUTPUT_DTYPE if probs else "uint8"
    zyx = tuple(min(c, n) for c, n in zip(OUTPUT_CHUNKS, values.shape[-3:]))
    tmp = temp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        arr = zarr.create_array(tmp, shape=values.shape, dtype=dtype, chunks=(values.shape[0], *zyx) if probs else zyx,
                                compressors=zarr_compressors("zstd", 3), fill_value=0, attributes=attrs)
        for z0 in range(0, values.shape[-3], zyx[0]):
            arr[..., z0:z0 + zyx[0], :, :] = values[..., z0:z0 + zyx[0], :, :].astype(dtype)
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return size


@dataclass
class SavedOutputs:
    """``jobs.models.ModelOutputs`` read back from a fan-out's infer jobs for one case: ``folder`` the
    fold's ``outputs/``, ``shape`` the case's stored (Z, Y, X). A missing, unreadable or misshapen output
    is a DataError naming its file."""

    folder: Path
    case: str
    shape: tuple[int, ...]

    def _read(self, model, *, kind: str) -> np.ndarray:
        import zarr

        path = Path(self.folder) / model.name / f"{self.case}.zarr"
        if not path.is_dir():
            raise DataError(f"{path}: missing (rerun `sepnet cv`: the infer job of {model.name} writes it)")
        want = (model.spec.num_classes, *self.shape) if kind == "probabilities" else tuple(self.shape)
        try:
            arr = zarr.open_array(path, mode="r")
            if arr.attrs.get("kind") != kind or tuple(arr.shape) != want:
                raise DataError(f"{path}: holds {arr.attrs.get('kind')} {tuple(arr.shape)}, expected {kind} {want}")
            return arr[...]
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or altered chunk: name the file
            raise DataError(f"{path}: cannot be read ({type(e).__name__}: {e}); rerun `sepnet cv`") from None

    def probabilities(self, model) -> np.ndarray:
        """(K, Z, Y, X) float16 as saved: the accumulator widens one class at a time (no float32 copy)."""
        return self._read(model, kind="probabilities")

    def labels(self, model) -> np.ndarray:
        return np.asarray(self._read(model, kind="labels"), dtype=np.uint8)


def _mean_dice(metrics: list) -> float:
    vals = [m.dice for m in metrics if m.flag.value != "not_annotated" and math.isfinite(m.dice)]
    return float(np.mean(vals)) if vals else float("nan")


def summary_line(name: str, summary: dict) -> str:
    """One printed line of a model's ``metrics_table`` summary; HD95 with the missed organs beside it
    (a missed organ has no HD95 and is left out of its mean)."""
    return (f"{name}: weighted Dice {summary['dice_weighted']:.4f}, weighted HD95 {summary['hd95_weighted']:.2f} mm "
            f"({summary.get('missed', 0)} missed organ(s)) over {summary['cases']} case(s)")


class EvalTask:
    """Callable for submitit: evaluates one fold. Idempotent: returns at once when done.json exists."""

    def __init__(self, spec: EvalSpec):
        self.spec = spec

    def __call__(self) -> dict:
        s = self.spec
        layout = Layout(Path(s.study_root))
        if not layout.evaluated(s.fold):
            if s.threads:
                torch.set_num_threads(s.threads)
            with torch.no_grad():  # a context, not set_grad_enabled: debug jobs share this process
                self._evaluate(layout)
        if s.evaluation.fan_out and not s.evaluation.keep_outputs:  # also after a kill between the two
            shutil.rmtree(layout.eval_dir(s.fold) / OUTPUTS, ignore_errors=True)
        return json.loads((layout.eval_dir(s.fold) / "done.json").read_text())

    def _evaluate(self, layout: Layout) -> dict:
        from sepnet.data.store import Store
        from sepnet.jobs.models import ensemble_weights, load_trained

        s, t0 = self.spec, time.time()
        out = layout.eval_dir(s.fold)
        store = Store(s.store)
        models = {name: load_trained(layout.model_dir(s.fold, name)) for name in s.models}
        members = [models[n] for n in s.members]
        others = [m for n, m in models.items() if n not in s.members]
        weights = ensemble_weights(members, s.ensemble)
        if s.evaluation.fan_out:
            self._check_outputs(layout, out)
        decision = self._decide_postprocessing(store, members, weights, out=out)
        res = _Results(by_model={name: {} for name in [*models, "ensemble", PP_MODEL]})
        for ci, case in enumerate(s.test_cases):
            self._evaluate_case(case, store, members, others, weights, res, decision=decision, out=out,
                                first=ci == 0)
        done = self._write(out, models, members, weights, res, seconds=time.time() - t0)
        for name, summary in done["summary"].items():
            print(f"fold {s.fold} {summary_line(name, summary)}", flush=True)
        print(f"evaluate fold{s.fold}: {len(s.test_cases)} test case(s) in {done['seconds']:.0f} s, "
              f"peak RSS {peak_rss_gib():.2f} GiB", flush=True)
        return done

    def _check_outputs(self, layout: Layout, out: Path) -> None:
        """Every model's infer job finished (its done.json), on the model as it is now (DataError otherwise)."""
        for name in self.spec.models:
            done = outputs_dir(out, name) / "done.json"
            if not done.is_file():
                raise DataError(f"{done}: missing: the infer job of {name} has not finished; rerun `sepnet cv`")
            digest = _model_digest(layout.model_dir(self.spec.fold, name))
            if json.loads(done.read_text()).get("model_digest") != digest:
                raise DataError(f"{done.parent}: saved from another training of {name}; remove it and rerun "
                                "`sepnet cv`")

    def _outputs(self, case: str, c: _Case, *, out: Path):
        """The models' outputs on ``case``: saved by the infer jobs (fan-out), else computed now."""
        from sepnet.jobs.models import ComputedOutputs

        if self.spec.evaluation.fan_out:
            return SavedOutputs(out / OUTPUTS, case=case, shape=tuple(c.meta.stored_shape))
        return ComputedOutputs(c.image_of, inference=self.spec.inference, device=_device())

    def _decide_postprocessing(self, store, members, weights, *, out: Path):
        """Predict the fold's validation cases with the ensemble (one pass, the test cases' settings),
        choose keep-largest-component per organ (``choose_postprocessing``), write postprocess.json."""
        from sepnet.core.postprocess import choose_postprocessing
        from sepnet.jobs.models import fuse_outputs, subset_annotated, subset_reference, to_organ_ids

        s, subset = self.spec, members[0].spec.subset
        preds, refs, annotated = [], [], []
        for case in s.val_cases:
            t0 = time.time()
            c = _read_case(store, case, members)
            ens = fuse_outputs(self._outputs(case, c, out=out), members, weights)
            preds.append(to_organ_ids(ens.labels, subset))
            refs.append(subset_reference(c.ref, subset))
            annotated.append(subset_annotated(c.meta.annotated, subset))
            print(f"evaluate fold{s.fold} validation case {case}: {time.time() - t0:.1f} s (for postprocessing)",
                  flush=True)
        organs = [int(i) for i in subset.inverse_lut()[1:]]
        decision = choose_postprocessing(preds, refs, organs=organs, annotated=annotated)
        atomic_write_json(out / POSTPROCESS_FILE, {**decision.to_dict(), "val_cases": list(s.val_cases)})
        return decision

    def _evaluate_case(self, case: str, store, members, others, weights, res: _Results, *, decision, out: Path,
                       first: bool) -> None:
        from sepnet.core.ensemble import member_volumes, vvc
        from sepnet.core.postprocess import apply_postprocessing
        from sepnet.evaluation.metrics import evaluate_case
        from sepnet.evaluation.uncertainty import error_counts
        from sepnet.jobs.models import fuse_outputs, subset_annotated, subset_reference, to_organ_ids

        s, t0 = self.spec, time.time()
        c = _read_case(store, case, [*members, *others])
        ens = fuse_outputs(self._outputs(case, c, out=out), members, weights, others=others)

        def metrics(organ_labels: np.ndarray, subset) -> list:
            # only the organs of the model's subset, against the reference as that subset sees it
            return evaluate_case(organ_labels, subset_reference(c.ref, subset), spacing_zyx=c.meta.spacing_zyx,
                                 organs=[int(i) for i in subset.inverse_lut()[1:]],
                                 annotated=subset_annotated(c.meta.annotated, subset),
                                 convention=s.evaluation.hd_convention, percentile=s.evaluation.percentile)

        for model, labels in [*zip(members, ens.member_labels), *zip(others, ens.other_labels)]:
            res.by_model[model.name][case] = metrics(to_organ_ids(labels, model.spec.subset), model.spec.subset)
        subset = members[0].spec.subset
        fused = to_organ_ids(ens.labels, subset)
        ens_metrics = res.by_model["ensemble"][case] = metrics(fused, subset)
        final = apply_postprocessing(fused, decision)  # the labels `sepnet predict` gives
        res.by_model[PP_MODEL][case] = metrics(final, subset)
        ref, annotated = subset_reference(c.ref, subset), subset_annotated(c.meta.annotated, subset)
        res.counts[case] = error_counts(fused, ref, ens.entropy, n_members=len(members),
                                        annotated=annotated)
        organs = [int(i) for i in subset.inverse_lut()[1:]]
        v = vvc(member_volumes(to_organ_ids(ens.member_labels, subset), spacing_zyx=c.meta.spacing_zyx, organs=organs))
        for m, organ_vvc in zip(ens_metrics, v):
            if m.flag.value != "not_annotated":
                res.vvc_rows.append({"fold": s.fold, "case": case, "organ": m.organ, "name": m.name,
                                     "vvc": float(organ_vvc), "dice": m.dice})
        if s.save_maps:
            self._save_maps(out, case, store, c.meta, final, ens.entropy, ref, first=first)
        print(f"evaluate fold{s.fold} case {case}: {time.time() - t0:.1f} s, "
              f"ensemble mean Dice {_mean_dice(ens_metrics):.4f}", flush=True)

    def _write(self, out: Path, models: dict, members: list, weights: np.ndarray, res: _Results, *,
               seconds: float) -> dict:
        from sepnet.evaluation.metrics import metrics_table, to_rows
        from sepnet.evaluation.uncertainty import counts_to_json

        s = self.spec
        rows = [{"fold": s.fold, "model": name, **r} for name, by_case in res.by_model.items()
                for r in to_rows(by_case)]
        atomic_write_text(out / "metrics.csv", rows_to_csv(rows, METRIC_FIELDS))
        atomic_write_text(out / "vvc.csv", rows_to_csv(res.vvc_rows, ["fold", "case", "organ", "name", "vvc", "dice"]))
        atomic_write_json(out / "uncertainty.json", counts_to_json(res.counts))
        summaries = {name: metrics_table(by_case)["summary"] for name, by_case in res.by_model.items() if by_case}
        done = {
            "fold": s.fold,
            "cases": s.test_cases,
            "val_cases": s.val_cases,
            "members": [m.name for m in members],
            "weights": weights.tolist(),
            "models": {name: {"kind": m.kind, "network": m.spec.network, "transform": m.channels[0],
                              "loss": m.spec.loss, "alpha": m.spec.alpha, "params": m.done.get("params"),
                              "train_seconds": m.done.get("train_seconds"), "organs": m.spec.organs}
                       for name, m in models.items()},
            "postprocess": POSTPROCESS_FILE,
            "summary": summaries,
            "seconds": seconds,
        }
        self._log_mlflow(summaries, res.by_model, out, members=members, weights=weights)
        atomic_write_json(out / "done.json", done)
        return done

    # ------------------------------------------------------------------ outputs

    def _save_maps(self, out: Path, case: str, store, meta, ens, entropy, ref, *, first: bool) -> None:
        from sepnet.data.grid import to_original
        from sepnet.data.readers import write_labels, write_volume

        ens_dir = out / "ensemble"
        write_labels(to_original(ens, meta, order=0), meta.geometry, ens_dir / f"{case}_labels.nii.gz")
        write_volume(to_original(entropy, meta, order=1), meta.geometry, ens_dir / f"{case}_entropy.nii.gz")
        if first:
            from sepnet.evaluation import figures

            img = store.read_image(case, [store.channels(case)[0]])[0]
            fig_dir = out / "figures"
            fig_dir.mkdir(parents=True, exist_ok=True)
            figures.overlay_figure(img, ref, ens, fig_dir / f"overlay_{case}.png", spacing_zyx=meta.spacing_zyx,
                                   title=f"fold {self.spec.fold} {case}: reference (solid) vs ensemble (dashed)")
            figures.uncertainty_figure(img, entropy, fig_dir / f"uncertainty_{case}.png",
                                       spacing_zyx=meta.spacing_zyx, title=f"vote entropy, {case}")

    def _log_mlflow(self, summaries: dict, results: dict, out: Path, *, members: list | None = None,
                    weights: np.ndarray | None = None) -> None:
        """Test metrics (``test_<summary>``, ``test_dice_<organ>``, ``test_hd95_<organ>``) on each model's
        run, logged to the finished training run without reopening it (status and end time kept); the
        ensemble's run (created here, then ended) also gets ``test_pp_*``, the fold's files, and its
        members and fusion weights (``members`` TrainedModels, ``weights`` (N, K)) as params."""
        s = self.spec
        if not s.mlflow_uri or not s.experiment:
            return
        from mlflow.entities import Metric

        from sepnet.evaluation.metrics import metrics_table
        from sepnet.jobs import tracking

        try:
            client = tracking.client(s.mlflow_uri)
            exp = tracking.ensure_experiment(client, s.experiment)
            parent = tracking.find_run(client, exp, s.fold_run_key) if s.fold_run_key else None
            pp = summaries.get(PP_MODEL, {})
            for name, summary in summaries.items():
                if name == PP_MODEL:  # no run of its own: its summary goes to the ensemble's run (test_pp_*)
                    continue
                key = model_run_key(s.study, s.fold, name)
                created = tracking.find_run(client, exp, key) is None
                run_id = tracking.get_or_create_run(
                    client, exp, key=key, name=f"fold{s.fold}/{name}", parent_run_id=parent,
                    tags={"sepnet.fold": str(s.fold), "sepnet.model": name}, reopen=False,
                )
                metrics = {f"test_{k}": v for k, v in summary.items() if isinstance(v, float) and math.isfinite(v)}
                for row in metrics_table(results[name])["organs"]:
                    for k in ("dice_mean", "hd95_mean"):
                        if math.isfinite(row[k]):
                            metrics[f"test_{k.split('_')[0]}_{row['name']}"] = row[k]
                if name == "ensemble":
                    metrics.update({f"test_pp_{k}": v for k, v in pp.items()
                                    if isinstance(v, float) and math.isfinite(v)})
                ts = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])
                if name == "ensemble":
                    self._log_ensemble_run(client, run_id, out, members=members, weights=weights)
                if created or name == "ensemble":  # evaluation's own run: end it; a training run keeps its times
                    client.set_terminated(run_id)
        except Exception as e:  # noqa: BLE001 - tracking must not lose an evaluation
            log.warning("MLflow logging failed for fold %d: %s", s.fold, e)

    def _log_ensemble_run(self, client, run_id: str, out: Path, *, members: list | None,
                          weights: np.ndarray | None) -> None:
        """The fold's files, and ``ensemble.members``, ``ensemble.weighting``, ``ensemble.weights.<member>``
        (rank weights per class, background first, as JSON) params plus ``ensemble.json``."""
        from sepnet.jobs import tracking

        for f in ("metrics.csv", "vvc.csv", "uncertainty.json", POSTPROCESS_FILE):
            if (out / f).is_file():
                client.log_artifact(run_id, str(out / f))
        if (out / "figures").is_dir():
            client.log_artifacts(run_id, str(out / "figures"), "figures")
        if not members or weights is None:
            return
        names = [m.name for m in members]
        w = [[round(float(x), 6) for x in row] for row in np.asarray(weights)]
        classes = list(members[0].spec.subset.class_names)
        client.log_dict(run_id, {"members": names, "weighting": self.spec.ensemble.weighting, "classes": classes,
                                 "weights": dict(zip(names, w))}, "ensemble.json")
        params = {"ensemble": {"members": ",".join(names), "weighting": self.spec.ensemble.weighting,
                               "weights": {n: json.dumps(row) for n, row in zip(names, w)}}}
        try:
            tracking.log_params_flat(client, run_id, params)
        except Exception as e:  # noqa: BLE001 - MLflow keeps a param's first value; ensemble.json has these
            log.warning("fold %d: MLflow ensemble params not logged (%s)", self.spec.fold, e)


class InferTask:
    """Callable for submitit: one model of a fan-out evaluation (``infer/fold<F>/<model>``). Runs the model
    on the fold's cases (a member: validation and test cases; a baseline: test cases) and saves each
    (:func:`save_output`: a member's float16 probabilities, a baseline's uint8 labels) into
    :func:`outputs_dir`, then ``done.json``. Resumable: the cases already saved are skipped; returns at
    once when the model's done.json or the fold's evaluation exists."""

    def __init__(self, spec: EvalSpec, *, model: str):
        self.spec = spec
        self.model = model

    def __call__(self) -> dict:
        s = self.spec
        layout = Layout(Path(s.study_root))
        folder = outputs_dir(layout.eval_dir(s.fold), self.model)
        if layout.evaluated(s.fold):  # fused already (its outputs may be gone)
            return {"fold": s.fold, "model": self.model, "fused": True}
        if (folder / "done.json").is_file():
            return json.loads((folder / "done.json").read_text())
        if s.threads:
            torch.set_num_threads(s.threads)
        with torch.no_grad():
            return self._infer(layout, folder)

    def _infer(self, layout: Layout, folder: Path) -> dict:
        from sepnet.data.store import Store
        from sepnet.jobs.models import ComputedOutputs, load_trained

        s, t0 = self.spec, time.time()
        model_dir = layout.model_dir(s.fold, self.model)
        model, store = load_trained(model_dir), Store(s.store)
        member = self.model in s.members
        # only this job writes this folder: temporaries left by a killed run of it are garbage
        for tmp in folder.glob(".*.tmp-*") if folder.is_dir() else ():
            shutil.rmtree(tmp, ignore_errors=True)
        cases = [*s.val_cases, *s.test_cases] if member else list(s.test_cases)
        written = 0
        for case in cases:
            path, tc = folder / f"{case}.zarr", time.time()
            if path.is_dir():
                print(f"infer fold{s.fold}/{self.model} case {case}: already saved", flush=True)
                continue
            c = _read_case(store, case, [model])
            outputs = ComputedOutputs(c.image_of, inference=s.inference, device=_device())
            kind = "probabilities" if member else "labels"
            values = outputs.probabilities(model) if member else outputs.labels(model)
            size = save_output(path, values, attrs={"kind": kind, "model": self.model, "case": case, "fold": s.fold})
            del values
            written += 1
            print(f"infer fold{s.fold}/{self.model} case {case}: {time.time() - tc:.1f} s, {kind} "
                  f"{size / 1e6:.2f} MB", flush=True)
        done = {"fold": s.fold, "model": self.model, "kind": "probabilities" if member else "labels",
                "dtype": OUTPUT_DTYPE if member else "uint8", "cases": cases, "written": written,
                "model_digest": _model_digest(model_dir), "seconds": time.time() - t0}
        atomic_write_json(folder / "done.json", done)
        print(f"infer fold{s.fold}/{self.model}: {len(cases)} case(s) in {done['seconds']:.0f} s, "
              f"peak RSS {peak_rss_gib():.2f} GiB", flush=True)
        return done


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
              f"weighted HD95 {sm['hd95_weighted']:.3f} mm ({sm['missed']} missed organ(s)) over "
              f"{sm['cases']} case(s)")
        if args.out:
            rows = [{"model": "pred", "fold": "", **r} for r in to_rows(results)]
            atomic_write_text(Path(args.out), rows_to_csv(rows, METRIC_FIELDS))
            print(f"wrote {args.out}")
    return 1 if failed else 0


__all__ = ["PP_MODEL", "POSTPROCESS_FILE", "OUTPUTS", "EvalSpec", "EvalTask", "InferTask", "SavedOutputs",
           "make_eval_spec", "model_run_key", "outputs_dir", "save_output", "study_inference", "summary_line"]
