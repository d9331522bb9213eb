"""``sepnet predict``: segment new CT scans with a trained study's ensemble, with uncertainty.

``sepnet predict -i INPUT -o OUTDIR --study STUDY`` where STUDY is a study folder trained by
``sepnet cv``; ``--bundle BUNDLE`` (a folder written by ``sepnet export``, checked against its manifest
first) or ``--model models:/NAME/VERSION`` (a registered bundle) instead give the same labels without
the study or its store. For each input (NIfTI, NRRD, MHA, a DICOM CT series folder, or a StructSeg case folder;
a folder of several such inputs is batch mode) it writes into ``OUTDIR/<case>/``:

- ``labels.nii.gz``: the ensemble's organ labels (uint8 StructSeg ids) in the input's original
  geometry (same shape, spacing, origin, direction);
- ``uncertainty.nii.gz``: the voxel-wise vote entropy of the members (nats), same geometry;
- ``summary.json``: per organ the ensemble volume (cm3), each member's volume, the structure
  uncertainty VVC = sigma/mu and a flag when VVC exceeds the threshold; the spacing the models ran
  at (and whether the scan was resampled to it); warnings for a scan unlike the training data;
- ``rtstruct.dcm`` and ``seg.dcm`` when the input is a DICOM series: the labels as an RTSTRUCT and as a
  DICOM-SEG on that series (the SEG only when some organ is predicted: a SEG needs one segment).

Postprocessing: each used fold's ``eval/fold<F>/postprocess.json`` (the evaluation's per-organ
keep-largest-component decision, made on that fold's validation cases) is loaded; with several folds an
organ is postprocessed when a strict majority of the used folds chose it (a fold without the file votes
no; :func:`combine_postprocessing`). It is applied to the fused labels on the models' grid, before they
are pasted back, exactly as the evaluation applies it; summary.json says what was applied.

Everything comes from the study, so a scan goes the way the evaluation's test cases went: the
resolved config (``Layout.resolved_config``: ensemble weighting, inference patch, overlap, TTA, batch
size; ``--overlap``/``--tta`` override), the store's plan (``sepnet.data.prepare.prepare_case``:
resampling, crop, transforms, float16 rounding), the models (``sepnet.jobs.models.run_ensemble``).
A scan whose spacing differs by more than 25 % on an axis from the spacing the models were trained at
(the plan's target spacing, else the fingerprint's median) is resampled to it for inference and the
results are pasted back into its own geometry.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sepnet.core.errors import DataError, SepnetError
from sepnet.core.organs import NUM_CLASSES
from sepnet.core.postprocess import PostprocessDecision
from sepnet.data.case import Geometry
from sepnet.data.prepare import Plan
from sepnet.hpc.atomic import atomic_write_json
from sepnet.jobs.config import InferenceConfig
from sepnet.jobs.evaluate import POSTPROCESS_FILE

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
SPACING_TOLERANCE = 0.25  # relative spacing difference on any axis above which a scan is resampled
EXTENT_RANGE = (0.5, 2.0)  # warn when an axis' extent is below/above these factors of the training min/max


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", required=True,
                   help="a CT image (NIfTI/NRRD/MHA), a DICOM series folder, or a folder of several inputs")
    p.add_argument("-o", "--output", required=True, help="output folder (one subfolder per case)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--study", help="a study folder trained by `sepnet cv` (holds study.yaml, store/, models/)")
    src.add_argument("--bundle", help="a bundle folder written by `sepnet export` (needs neither study nor store)")
    src.add_argument("--model", help="a registered bundle: models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI the --model registry lives on (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--fold", default="all",
                   help="'all' (default: every fold's ensemble of the study or bundle, averaged) or a fold index")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation on/off (default: the study's inference.tta)")
    p.add_argument("--overlap", type=float, default=None,
                   help="sliding-window overlap in (0, 1) (default: the study's inference.overlap)")
    p.add_argument("--vvc-threshold", type=float, default=0.2,
                   help="flag organs whose volume variation coefficient exceeds this (default 0.2)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


# --------------------------------------------------------------------------- inputs

def _is_dicom_dir(d: Path) -> bool:
    for f in sorted(d.iterdir())[:20]:
        if f.is_file():
            if f.suffix.lower() == ".dcm":
                return True
            try:
                with open(f, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def _case_name(p: Path) -> str:
    for s in IMAGE_SUFFIXES:
        if p.name.endswith(s):
            return p.name[: -len(s)]
    return p.name


def discover_inputs(path: Path) -> list[tuple[str, Path, str]]:
    """(case name, path, kind) for each input; kind is 'image', 'dicom' or 'structseg'."""
    if not path.exists():
        raise DataError(f"{path}: input does not exist")
    if path.is_file():
        return [(_case_name(path), path, "image")]
    if _is_dicom_dir(path):
        return [(path.name, path, "dicom")]
    if (path / "data.nii.gz").is_file():
        return [(path.name, path / "data.nii.gz", "structseg")]
    out = []
    for child in sorted(path.iterdir()):
        if child.name.startswith("."):
            continue
        # a broken link with an image name is an input that fails on read ("broken link"), not nothing
        if (child.is_file() or child.is_symlink()) and child.name.endswith(IMAGE_SUFFIXES):
            out.append((_case_name(child), child, "image"))
        elif child.is_dir():
            if _is_dicom_dir(child):
                out.append((child.name, child, "dicom"))
            elif (child / "data.nii.gz").is_file():
                out.append((child.name, child / "data.nii.gz", "structseg"))
    if not out:
        raise DataError(f"{path}: no CT image, DICOM series or case folder found")
    return out


# --------------------------------------------------------------------------- the study

@dataclass
class StudyEnsemble:
    """What predict takes from a study: members of the chosen folds (fold order, then config order),
    their pooled (N, K) fusion weights, the inference settings, the store's plan and fingerprint."""

    members: list
    weights: np.ndarray
    folds: list[int]
    inference: InferenceConfig  # patch resolved
    plan: Plan
    fingerprint: dict
    postprocess: PostprocessDecision = dataclasses.field(default_factory=lambda: PostprocessDecision(()))
    postprocess_folds: dict = dataclasses.field(default_factory=dict)  # fold -> its chosen organs, None = no file


def _chosen_folds(found: dict[int, list[str]], member_names: list[str], fold: str, where: Path) -> list[int]:
    complete = [f for f, names in sorted(found.items()) if set(member_names) <= set(names)]
    if fold == "all":
        if not complete:
            raise DataError(f"{where}: no fold has all ensemble members ({', '.join(member_names)}) trained")
        return complete
    if not fold.isdigit() or int(fold) not in complete:
        raise DataError(f"--fold {fold}: folds with a trained ensemble are {', '.join(map(str, complete)) or 'none'}")
    return [int(fold)]


def assemble_ensemble(cfg, *, where: Path, found: dict[int, list[str]], model_dir: Callable[[int, str], Path],
                      decision_of: Callable[[int], PostprocessDecision | None], plan: Plan, fingerprint: dict,
                      fold: str = "all", overlap: float | None = None, tta: bool | None = None) -> StudyEnsemble:
    """THE construction of a :class:`StudyEnsemble`, shared by a study folder and a bundle.

    cfg: the resolved ``StudyConfig`` (members, ensemble weighting, inference); where: the folder named in
    errors; found: fold -> names of its trained models; model_dir(fold, name): the folder
    ``load_trained`` reads; decision_of(fold): that fold's postprocessing decision (None = none).
    Folds: every fold with all members (``fold="all"``) or the one given; weights: each fold's
    ``ensemble_weights`` pooled by ``pool_weights``; postprocessing: ``combine_postprocessing``;
    inference: ``study_inference(cfg)`` with the ``overlap``/``tta`` overrides (ConfigError when bad).
    """
    from sepnet.core.ensemble import pool_weights
    from sepnet.core.errors import ConfigError
    from sepnet.jobs.evaluate import study_inference
    from sepnet.jobs.models import ensemble_weights, load_trained

    names = [m.name for m in cfg.members]
    folds = _chosen_folds(found, names, str(fold), where)
    inference = study_inference(cfg)
    if overlap is not None:
        if not 0 < overlap < 1:
            raise ConfigError(f"--overlap: must be in (0, 1), got {overlap}")
        inference = dataclasses.replace(inference, overlap=float(overlap))
    if tta is not None:
        inference = dataclasses.replace(inference, tta=bool(tta))
    per_fold = [[load_trained(model_dir(f, n)) for n in names] for f in folds]
    decisions = {f: decision_of(f) for f in folds}
    return StudyEnsemble(members=[m for ms in per_fold for m in ms],
                         weights=pool_weights([ensemble_weights(ms, cfg.ensemble) for ms in per_fold]),
                         folds=folds, inference=inference, plan=plan, fingerprint=fingerprint,
                         postprocess=combine_postprocessing(list(decisions.values())),
                         postprocess_folds={f: None if d is None else list(d.organs) for f, d in decisions.items()})


def load_study(root: str | Path, *, fold: str = "all", overlap: float | None = None,
               tta: bool | None = None) -> StudyEnsemble:
    """The ensemble of a trained study folder. DataError naming the file for a missing piece (models,
    resolved config, plan.json) or a plan this sepnet cannot reproduce; ConfigError for a bad override."""
    from sepnet.data.store import Store
    from sepnet.jobs.config import load_config
    from sepnet.jobs.models import find_models
    from sepnet.jobs.study import Layout

    root = Path(root)
    layout = Layout(root)
    found = find_models(root)
    if not found:
        raise DataError(f"{root}: no trained model (models/fold*/<model>/ with best.pt and done.json)")
    if not layout.resolved_config.is_file():
        raise DataError(f"{layout.resolved_config}: the study's resolved config is missing (written by `sepnet cv`)")
    cfg = load_config(layout.resolved_config)
    store = Store(layout.store)
    return assemble_ensemble(cfg, where=root, found={f: [d.name for d in dirs] for f, dirs in found.items()},
                             model_dir=layout.model_dir,
                             decision_of=lambda f: read_postprocessing(layout.eval_dir(f) / POSTPROCESS_FILE),
                             plan=store.plan(), fingerprint=store.fingerprint(), fold=fold, overlap=overlap, tta=tta)


def read_postprocessing(path: Path) -> PostprocessDecision | None:
    """A fold's ``postprocess.json`` (written by its evaluation); None when absent (not evaluated yet, or
    evaluated by an older sepnet). DataError naming the file when it is unreadable."""
    if not path.is_file():
        return None
    try:
        return PostprocessDecision.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable postprocessing decision ({e})") from None


def combine_postprocessing(decisions: list[PostprocessDecision | None]) -> PostprocessDecision:
    """The decision for an ensemble pooled over folds: an organ gets keep-largest-component when more
    than half of ``decisions`` chose it (None = a fold without a decision, which votes no). DataError
    when the folds' decisions use different connectivities."""
    given = [d for d in decisions if d is not None]
    conn = {d.connectivity for d in given}
    if len(conn) > 1:
        raise DataError(f"postprocess.json: the folds' decisions use different connectivities {sorted(conn)}")
    votes: dict[int, int] = {}
    for d in given:
        for o in d.organs:
            votes[int(o)] = votes.get(int(o), 0) + 1
    chosen = tuple(sorted(o for o, n in votes.items() if 2 * n > len(decisions)))
    return PostprocessDecision(chosen, conn.pop() if conn else 26)


# --------------------------------------------------------------------------- checks against the training data

def plan_for_scan(plan: Plan, geometry: Geometry, fingerprint: dict) -> tuple[Plan, dict]:
    """The plan to prepare a scan with, and what was decided about its spacing (for summary.json).

    The models were trained at ``plan.spacing_zyx`` when the plan resamples, else at the training
    data's median spacing (fingerprint). A plan that resamples already brings every scan there; else a
    scan differing by more than SPACING_TOLERANCE on any axis gets ``plan.with_spacing(median)``.
    """
    spacing_in = [float(v) for v in geometry.spacing_zyx]
    note = {"input_zyx": spacing_in, "model_zyx": None, "plan_resamples": plan.spacing_zyx is not None,
            "resampled": False, "reason": None}
    if plan.spacing_zyx is not None:
        return plan, {**note, "model_zyx": [float(v) for v in plan.spacing_zyx],
                      "resampled": not np.allclose(spacing_in, plan.spacing_zyx), "reason": "the plan's spacing"}
    median = (fingerprint.get("spacing_zyx") or {}).get("median")
    if not median:
        return plan, {**note, "reason": "fingerprint.json has no training spacing: not checked"}
    target = [float(v) for v in median]
    rel = max(abs(a - b) / b for a, b in zip(spacing_in, target))
    if rel <= SPACING_TOLERANCE:
        return plan, {**note, "model_zyx": target}
    reason = f"spacing differs by {rel:.0%} (> {SPACING_TOLERANCE:.0%}) from the training median"
    return plan.with_spacing(target), {**note, "model_zyx": target, "resampled": True, "reason": reason}


def scan_warnings(hu: np.ndarray, geometry: Geometry, fingerprint: dict) -> list[str]:
    """Warnings for a scan far from the training data: its median body HU outside the training body
    0.5-99.5 % percentile range, or an axis' physical extent outside EXTENT_RANGE x the training min/max."""
    out = []
    inten = fingerprint.get("intensity") or {}
    pct, thr = inten.get("percentiles") or {}, float(inten.get("body_threshold_hu", -500.0))
    body = hu[:, ::4, ::4]
    body = body[body > thr]
    if pct and body.size == 0:
        out.append(f"no voxel above {thr:.0f} HU: is the image in Hounsfield units?")
    elif pct:
        med, lo, hi = float(np.median(body)), float(pct["0.5"]), float(pct["99.5"])
        if not lo <= med <= hi:
            out.append(f"median body HU {med:.0f} lies outside the training range {lo:.0f}..{hi:.0f} HU")
    cases = (fingerprint.get("cases") or {}).values()
    ext = np.asarray([np.multiply(c["shape"], c["spacing_zyx"]) for c in cases], dtype=float).reshape(-1, 3)
    if ext.size:
        mine = np.multiply(geometry.shape, geometry.spacing_zyx)
        far = (mine < EXTENT_RANGE[0] * ext.min(0)) | (mine > EXTENT_RANGE[1] * ext.max(0))
        if far.any():
            out.append(f"extent (z, y, x) {np.round(mine).tolist()} mm is far from the training extents "
                       f"{np.round(ext.min(0)).tolist()}..{np.round(ext.max(0)).tolist()} mm")
    return out


# --------------------------------------------------------------------------- one case

@dataclass
class CasePrediction:
    """labels (uint8 StructSeg ids, postprocessed) and entropy (float32) in the input geometry;
    member_labels (N, z, y, x) uint8 StructSeg ids and spacing_zyx (mm) of the grid the models ran on;
    spacing: plan_for_scan's note; warnings."""

    labels: np.ndarray
    entropy: np.ndarray
    member_labels: np.ndarray
    spacing_zyx: tuple[float, float, float]
    spacing: dict
    warnings: list[str]


def predict_case(hu: np.ndarray, geometry: Geometry, ens: StudyEnsemble, *, device: torch.device,
                 case_id: str = "case") -> CasePrediction:
    """Ensemble prediction of one CT (``hu`` int16 (z, y, x) on ``geometry``): prepared as the store's
    cases were, run by ``run_ensemble`` as evaluation runs them, labels and entropy pasted back."""
    from sepnet.core.postprocess import apply_postprocessing
    from sepnet.data.grid import to_original
    from sepnet.data.prepare import prepare_case
    from sepnet.jobs.models import run_ensemble, to_organ_ids

    plan, spacing = plan_for_scan(ens.plan, geometry, ens.fingerprint)
    needed = [c for c in plan.channels if any(c in m.channels for m in ens.members)]
    prep = prepare_case(hu, geometry, plan, case_id=case_id, channels=needed)
    index = {c: i for i, c in enumerate(prep.meta.channels)}

    def image_of(channels: tuple[str, ...]) -> np.ndarray:
        return prep.image[[index[c] for c in channels]]

    out = run_ensemble(image_of, ens.members, ens.weights, inference=ens.inference, device=device)
    subset = ens.members[0].spec.subset
    # postprocessed on the models' grid, as the evaluation does, then pasted back
    labels = apply_postprocessing(to_organ_ids(out.labels, subset), ens.postprocess)
    return CasePrediction(labels=to_original(labels, prep.meta, order=0),
                          entropy=to_original(out.entropy, prep.meta, order=1),
                          member_labels=to_organ_ids(out.member_labels, subset),
                          spacing_zyx=tuple(prep.meta.spacing_zyx), spacing=spacing,
                          warnings=scan_warnings(hu, geometry, ens.fingerprint))


def organ_summary(labels_orig: np.ndarray, spacing_orig_zyx, member_labels: np.ndarray, spacing_zyx, *,
                  vvc_threshold: float, names: dict[int, str]) -> dict:
    """Per organ of ``names`` (StructSeg id -> name, the ensemble's subset): volumes, VVC and its flag."""
    from sepnet.core.ensemble import member_volumes, vvc

    vox_cm3 = float(np.prod(spacing_orig_zyx)) / 1000.0
    counts = np.bincount(labels_orig.ravel(), minlength=NUM_CLASSES)
    vols = member_volumes(member_labels, spacing_zyx=spacing_zyx, organs=list(names))
    v = vvc(vols)
    organs = {}
    for k, organ in enumerate(names):
        organs[names[organ]] = {
            "id": organ,
            "volume_cm3": float(counts[organ]) * vox_cm3,
            "member_volumes_cm3": [float(x) for x in vols[:, k]],
            "vvc": None if not np.isfinite(v[k]) else float(v[k]),
            "high_uncertainty": bool(np.isfinite(v[k]) and v[k] > vvc_threshold),
        }
    return organs


# --------------------------------------------------------------------------- CLI

def load_ensemble(args: argparse.Namespace) -> StudyEnsemble:
    """The ensemble named by exactly one of ``--study``, ``--bundle`` or ``--model`` (a registry URI
    resolved to a local bundle folder by ``sepnet.jobs.registry.resolve_model``)."""
    opts = {"fold": str(args.fold), "overlap": args.overlap, "tta": args.tta}
    if args.study is not None:
        return load_study(args.study, **opts)
    from sepnet.jobs.bundle import load_bundle

    if args.bundle is not None:
        return load_bundle(args.bundle, **opts)
    from sepnet.jobs.registry import resolve_model

    return load_bundle(resolve_model(args.model, tracking_uri=getattr(args, "tracking_uri", None)), **opts)


def run(args: argparse.Namespace) -> int:
    ens = load_ensemble(args)
    inputs = discover_inputs(Path(args.input))
    out_root = Path(args.output)
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        probe = out_root / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise DataError(f"{out_root}: output folder is not writable ({e.strerror})") from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"{len(inputs)} input(s); ensemble of {len(ens.members)} model(s) from fold(s) "
          f"{', '.join(map(str, ens.folds))}; keep-largest-component postprocessing of "
          f"{len(ens.postprocess.organs)} organ(s)")
    failed = 0
    with torch.no_grad():  # a context: the caller's grad mode is left as it was
        for case, path, kind in inputs:
            try:
                print(_predict_one(case, path, kind, ens, out_root / case, device=device,
                                   vvc_threshold=args.vvc_threshold))
            except SepnetError as e:
                failed += 1
                print(f"{case}: error: {e}", file=sys.stderr)
    return 1 if failed else 0


def _predict_one(case: str, path: Path, kind: str, ens: StudyEnsemble, out: Path, *, device: torch.device,
                 vvc_threshold: float) -> str:
    """Predict and write one input; returns the line to print."""
    from sepnet.data.readers import read_image, write_labels, write_volume
    from sepnet.hpc.resources import peak_rss_gib
    from sepnet.jobs.models import organ_names

    t0 = time.perf_counter()
    image, geom = read_image(path)
    pred = predict_case(image, geom, ens, device=device, case_id=case)
    write_labels(pred.labels, geom, out / "labels.nii.gz")
    write_volume(pred.entropy, geom, out / "uncertainty.nii.gz")
    names = organ_names(ens.members[0].spec.subset)
    organs = organ_summary(pred.labels, geom.spacing_zyx, pred.member_labels, pred.spacing_zyx,
                           vvc_threshold=vvc_threshold, names=names)
    pp = ens.postprocess
    summary = {
        "case": case, "input": str(path), "n_members": int(pred.member_labels.shape[0]), "folds": ens.folds,
        "spacing": pred.spacing, "warnings": pred.warnings, "mean_entropy": float(pred.entropy.mean()),
        "flagged_organs": [n for n, o in organs.items() if o["high_uncertainty"]], "organs": organs,
        "postprocessing": {"keep_largest_component": [names.get(o, str(o)) for o in pp.organs],
                           "organ_ids": list(pp.organs), "connectivity": pp.connectivity,
                           "folds": {str(f): v for f, v in ens.postprocess_folds.items()},
                           "rule": "an organ chosen by a strict majority of the used folds' postprocess.json"},
    }
    if kind == "dicom":
        summary.update(_write_dicom(pred.labels, path, out, names=names))
    atomic_write_json(out / "summary.json", summary)
    line = (f"{case}: {int((pred.labels > 0).sum())} organ voxels -> {out} "
            f"(high uncertainty: {', '.join(summary['flagged_organs']) or 'none'}); "
            f"{time.perf_counter() - t0:.1f} s, peak RSS {peak_rss_gib():.2f} GiB")
    sp = pred.spacing
    if sp["resampled"] and not sp["plan_resamples"]:
        line += (f"; resampled from {_mm(sp['input_zyx'])} to the models' {_mm(sp['model_zyx'])} mm "
                 f"({sp['reason']}) and pasted back")
    return line + "".join(f"\n  warning: {w}" for w in pred.warnings)


def _write_dicom(labels: np.ndarray, series: Path, out: Path, *, names: dict[int, str]) -> dict:
    """RTSTRUCT (one ROI per organ of ``names``) and, when some organ is predicted, DICOM-SEG beside it."""
    from sepnet.data.dicom_seg import write_dicom_seg
    from sepnet.data.readers import write_rtstruct

    write_rtstruct(labels, series, out / "rtstruct.dcm", organ_names=names)
    written = {"rtstruct": str(out / "rtstruct.dcm"), "dicom_seg": None}
    if (labels > 0).any():
        written["dicom_seg"] = str(write_dicom_seg(labels, series, out / "seg.dcm", organ_names=names))
    return written


def _mm(spacing) -> str:
    return " x ".join(f"{float(v):.2f}" for v in spacing)
