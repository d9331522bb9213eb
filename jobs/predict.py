"""``sepnet predict``: segment new CT scans with a trained ensemble, with uncertainty.

For each input (NIfTI, NRRD, MHA, a DICOM CT series folder, or a StructSeg case folder; a folder
of several such inputs is batch mode) it writes into ``OUTDIR/<case>/``:

- ``labels.nii.gz``: the ensemble's organ labels (uint8 StructSeg ids) in the input's original
  geometry (same shape, spacing, origin, direction);
- ``uncertainty.nii.gz``: the voxel-wise vote entropy of the members (nats), same geometry;
- ``summary.json``: per organ the ensemble volume (cm3), each member's volume, the structure
  uncertainty VVC = sigma/mu, and a flag when VVC exceeds the threshold;
- ``rtstruct.dcm`` when the input is a DICOM series: the labels as an RTSTRUCT on that series.

Preprocessing (intensity transforms, crop, resampling) is replayed from the study store's
``plan.json``, so inference sees exactly what training saw.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from sepnet.core.errors import DataError, SepnetError
from sepnet.core.organs import NUM_CLASSES, ORGAN_IDS, ORGAN_NAMES
from sepnet.jobs.study import atomic_write_json

log = logging.getLogger("sepnet.predict")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", required=True,
                   help="a CT image (NIfTI/NRRD/MHA), a DICOM series folder, or a folder of several inputs")
    p.add_argument("-o", "--output", required=True, help="output folder (one subfolder per case)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--study", help="a study folder trained by `sepnet cv`")
    src.add_argument("--models", help="a models folder (fold*/<model>/ with best.pt) beside a plan.json")
    p.add_argument("--fold", default="all", help="'all' (default: every fold's ensemble, averaged) or a fold index")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
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
        if child.is_file() and child.name.endswith(IMAGE_SUFFIXES):
            out.append((_case_name(child), child, "image"))
        elif child.is_dir():
            if _is_dicom_dir(child):
                out.append((child.name, child, "dicom"))
            elif (child / "data.nii.gz").is_file():
                out.append((child.name, child / "data.nii.gz", "structseg"))
    if not out:
        raise DataError(f"{path}: no CT image, DICOM series or case folder found")
    return out


# --------------------------------------------------------------------------- models

def load_ensemble(models_root: Path, fold: str):
    """fold -> list of TrainedModel (ensemble members; all models when none is marked as member)."""
    from sepnet.jobs.models import find_models, load_trained

    found = find_models(models_root)
    if not found:
        raise DataError(f"{models_root}: no trained model (fold*/<model>/best.pt + done.json)")
    if fold != "all":
        if not fold.isdigit() or int(fold) not in found:
            raise DataError(f"--fold {fold}: trained folds are {', '.join(map(str, sorted(found)))}")
        found = {int(fold): found[int(fold)]}
    out = {}
    for f, dirs in found.items():
        models = [load_trained(d) for d in dirs]
        members = [m for m in models if m.kind == "member"]
        out[f] = members or models
    return out


def _plan_for(args) -> tuple[dict, Path]:
    if args.study:
        root = Path(args.study)
        plan_file, models_root = root / "store" / "plan.json", root / "models"
    else:
        models_root = Path(args.models)
        plan_file = next((p for p in (models_root / "plan.json", models_root.parent / "store" / "plan.json")
                          if p.is_file()), models_root / "plan.json")
    if not plan_file.is_file():
        raise DataError(f"{plan_file}: preprocessing plan not found (needed to replay crop/transforms)")
    return json.loads(plan_file.read_text()), models_root


# --------------------------------------------------------------------------- one case

def predict_case(image: np.ndarray, geometry, ensembles: dict, plan: dict, *, device: torch.device,
                 overlap: float = 0.5, tta: bool = False, case_id: str = "case"):
    """Ensemble prediction of one CT.

    image: int16 HU (z, y, x) on ``geometry``. Returns (labels uint8, entropy float32) in the original
    geometry, member labels (N, z, y, x) on the stored grid, and the stored-grid spacing (z, y, x) mm.
    """
    from sepnet.core.ensemble import rank_weights, vote_entropy
    from sepnet.core.inference import sliding_window
    from sepnet.core.intensity import apply_transform
    from sepnet.data.store import CaseMeta, centre_crop_box, crop_like, resampled_grid, to_original

    spacing = plan.get("spacing_zyx")
    grid = resampled_grid(geometry, spacing) if spacing else geometry
    box = centre_crop_box(grid.shape, plan.get("crop"))
    stored_shape = tuple(b - a for a, b in box)
    meta = CaseMeta(case_id=case_id, channels=tuple(plan.get("transforms", ())), geometry=geometry, grid=grid,
                    crop_box=box, spacing_zyx=grid.spacing_zyx, stored_shape=stored_shape, annotated=(),
                    source_hash="")
    hu = crop_like(image.astype(np.float32), meta, order=1)
    channels: dict[str, np.ndarray] = {}
    fused_all = None
    member_labels = []
    for _fold, members in ensembles.items():
        dice = np.stack([m.val_dice(NUM_CLASSES) for m in members])
        w = rank_weights(dice) if len(members) > 1 and np.isfinite(dice).any() else np.ones((len(members),
                                                                                               NUM_CLASSES))
        fused = None
        for i, m in enumerate(members):
            for t in m.channels:
                if t not in channels:
                    channels[t] = apply_transform(hu, t).astype(np.float32)
            vol = np.stack([channels[t] for t in m.channels])
            patch = list(m.spec.get("patch") or [16, 128, 128])
            probs = sliding_window(vol, m.predictor(device), num_classes=NUM_CLASSES, patch=patch, overlap=overlap,
                                   batch_size=2, tta=tta, device=device)
            member_labels.append(probs.argmax(0).to(torch.uint8).cpu().numpy())
            wi = torch.as_tensor(w[i], dtype=torch.float32).view(-1, 1, 1, 1)
            fused = probs * wi if fused is None else fused.add_(probs * wi)
        fused /= torch.as_tensor(w.sum(0), dtype=torch.float32).clamp_min(1e-12).view(-1, 1, 1, 1)
        fused_all = fused if fused_all is None else fused_all.add_(fused)
    labels = fused_all.argmax(0).to(torch.uint8).cpu().numpy()
    stack = np.stack(member_labels)
    entropy = vote_entropy(stack).astype(np.float32)
    return (to_original(labels, meta, order=0), to_original(entropy, meta, order=1), stack, grid.spacing_zyx)


def organ_summary(labels_orig: np.ndarray, spacing_orig_zyx, member_labels: np.ndarray, spacing_zyx, *,
                  vvc_threshold: float) -> dict:
    from sepnet.core.ensemble import member_volumes, vvc

    vox_cm3 = float(np.prod(spacing_orig_zyx)) / 1000.0
    counts = np.bincount(labels_orig.ravel(), minlength=NUM_CLASSES)
    vols = member_volumes(member_labels, spacing_zyx=spacing_zyx, organs=ORGAN_IDS)
    v = vvc(vols)
    organs = {}
    for k, organ in enumerate(ORGAN_IDS):
        organs[ORGAN_NAMES[organ]] = {
            "id": organ,
            "volume_cm3": float(counts[organ]) * vox_cm3,
            "member_volumes_cm3": [float(x) for x in vols[:, k]],
            "vvc": None if not np.isfinite(v[k]) else float(v[k]),
            "high_uncertainty": bool(np.isfinite(v[k]) and v[k] > vvc_threshold),
        }
    return organs


def run(args: argparse.Namespace) -> int:
    plan, models_root = _plan_for(args)
    ensembles = load_ensemble(models_root, str(args.fold))
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
    with torch.no_grad():  # a context: the caller's grad mode is left as it was
        return _predict_all(args, inputs, ensembles, plan, out_root, device)


def _predict_all(args, inputs, ensembles, plan, out_root: Path, device) -> int:
    from tqdm import tqdm

    from sepnet.data.readers import read_image

    n_models = sum(len(v) for v in ensembles.values())
    print(f"{len(inputs)} input(s); ensemble of {n_models} model(s) from fold(s) {', '.join(map(str, ensembles))}")
    failed = 0
    for case, path, kind in tqdm(inputs, desc="predict", unit="case", disable=not sys.stderr.isatty()):
        try:
            image, geom = read_image(path)
            labels, entropy, member_labels, spacing = predict_case(
                image, geom, ensembles, plan, device=device, overlap=args.overlap, tta=args.tta, case_id=case)
            out = out_root / case
            from sepnet.data.readers import write_labels, write_volume

            write_labels(labels, geom, out / "labels.nii.gz")
            write_volume(entropy, geom, out / "uncertainty.nii.gz")
            organs = organ_summary(labels, geom.spacing_zyx, member_labels, spacing,
                                   vvc_threshold=args.vvc_threshold)
            summary = {
                "case": case, "input": str(path), "n_members": int(member_labels.shape[0]),
                "folds": sorted(ensembles), "mean_entropy": float(entropy.mean()),
                "flagged_organs": [n for n, o in organs.items() if o["high_uncertainty"]], "organs": organs,
            }
            if kind == "dicom":
                from sepnet.data.readers import write_rtstruct

                write_rtstruct(labels, path, out / "rtstruct.dcm", organ_names=ORGAN_NAMES)
                summary["rtstruct"] = str(out / "rtstruct.dcm")
            atomic_write_json(out / "summary.json", summary)
            flagged = ", ".join(summary["flagged_organs"]) or "none"
            print(f"{case}: {int((labels > 0).sum())} organ voxels -> {out} (high uncertainty: {flagged})")
        except SepnetError as e:
            failed += 1
            print(f"{case}: error: {e}", file=sys.stderr)
    return 1 if failed else 0
