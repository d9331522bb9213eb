"""Bundles: a study's trained ensemble as one self-contained, checksummed folder.

``sepnet export STUDY OUT`` writes it (:func:`export_bundle`); ``sepnet predict --bundle OUT`` reads it
(:func:`load_bundle`) on a machine that has neither the study nor its store and gives the labels that
``--study`` gives: the ensemble is built by the one ``sepnet.jobs.predict.assemble_ensemble``, the models
by the one ``sepnet.jobs.models.load_trained``. Layout::

    bundle.json        format, sepnet and torch versions, study name, folds, members (config order),
                       pooled fusion weights (N, K), ensemble (rank-weight) and inference settings,
                       postprocessing (each fold's decision and the combined organs), organ subset and map
    plan.json          the case-preparation plan (``Plan.to_dict``: transforms, crop, spacing, fill, dtype)
    fingerprint.json   the training data's fingerprint (spacing check and scan warnings of predict)
    study.yaml         the study's resolved config, as the study holds it
    models/fold<F>/<model>/spec.json, done.json, best.pt   best.pt = {"model": plain state dict}
                       (tensors only: ``torch.load(weights_only=True)`` reads it)
    manifest.json      {"format", "files": {relative path: {"sha256", "size"}}} of every other file

:func:`verify_bundle` refuses a bundle with a missing, changed or unlisted file, naming the file, and one
of a newer format than this sepnet reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch

from sepnet import __version__
from sepnet.core.errors import DataError
from sepnet.hpc.atomic import atomic_write_bytes, atomic_write_json, replace_dir, temp_path
from sepnet.jobs.spec import read_model_json

BUNDLE_FORMAT = 1  # bump when a reader of this version could not read the new layout
MANIFEST, META, CONFIG = "manifest.json", "bundle.json", "study.yaml"
PLAN, FINGERPRINT = "plan.json", "fingerprint.json"


# --------------------------------------------------------------------------- export

def export_bundle(study: str | Path, out: str | Path, *, fold: str | int = "all") -> Path:
    """Write the ensemble of ``study`` (a study folder, or its YAML config) as a bundle folder ``out``.

    fold: ``"all"`` (every fold with all members trained) or one fold index. Written into a temp folder
    beside ``out`` and moved in by ``sepnet.hpc.atomic.replace_dir``: a failure leaves ``out`` as it was;
    an existing bundle at ``out`` is replaced. DataError for a study that cannot be predicted with, or an
    ``out`` that is a file or a non-empty folder other than a bundle. Returns ``out``.
    """
    from sepnet.jobs.config import load_config
    from sepnet.jobs.evaluate import POSTPROCESS_FILE
    from sepnet.jobs.predict import load_study, read_postprocessing
    from sepnet.jobs.study import Layout

    root = _study_root(Path(study))
    out = Path(out)
    _check_target(out)
    ens = load_study(root, fold=str(fold))  # everything predict needs, checked as predict checks it
    layout = Layout(root)
    decisions = {f: read_postprocessing(layout.eval_dir(f) / POSTPROCESS_FILE) for f in ens.folds}
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            raise DataError(f"{out}: cannot write the bundle here ({e.strerror})") from None
        _write_contents(tmp, ens=ens, config_text=layout.resolved_config.read_bytes(),
                        ensemble=load_config(layout.resolved_config).ensemble, decisions=decisions)
        _write_manifest(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _study_root(study: Path) -> Path:
    if study.is_file():  # a study YAML: its root
        from sepnet.jobs.config import load_config

        return Path(load_config(study).root)
    return study


def _check_target(out: Path) -> None:
    """Refuse to replace anything but a bundle or an empty folder (replace_dir removes what was there)."""
    if out.is_symlink() or out.is_file():
        raise DataError(f"{out}: exists and is not a folder; give a new folder for the bundle")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise DataError(f"{out}: exists and is not a sepnet bundle; refusing to replace it")


def _write_contents(folder: Path, *, ens, config_text: bytes, ensemble, decisions: dict) -> None:
    """Everything but the manifest: models, plan, fingerprint, config and bundle.json."""
    from sepnet.jobs.models import organ_names

    names = [m.name for m in ens.members[: len(ens.members) // len(ens.folds)]]
    for i, member in enumerate(ens.members):
        _write_member(folder / "models" / f"fold{ens.folds[i // len(names)]}" / member.name, member)
    atomic_write_json(folder / PLAN, ens.plan.to_dict())
    atomic_write_json(folder / FINGERPRINT, ens.fingerprint)
    atomic_write_bytes(folder / CONFIG, config_text)
    spec = ens.members[0].spec
    pp = ens.postprocess
    meta = {
        "format": BUNDLE_FORMAT, "sepnet_version": __version__, "torch_version": torch.__version__,
        "folds": list(ens.folds), "members": names,
        "fusion_weights": np.asarray(ens.weights, dtype=float).tolist(),  # (N, K), fold-major member order
        "ensemble": dataclasses.asdict(ensemble),  # weighting and rank_weights
        "inference": dataclasses.asdict(ens.inference),
        "postprocess": {"organs": list(pp.organs), "connectivity": pp.connectivity,
                        "rule": "an organ chosen by a strict majority of the used folds",
                        "folds": {str(f): None if d is None else d.to_dict() for f, d in decisions.items()}},
        "organs": {"subset": spec.organs, "num_classes": spec.num_classes,
                   "names": {str(k): v for k, v in organ_names(spec.subset).items()}},
    }
    atomic_write_json(folder / META, meta)


def _write_member(folder: Path, member) -> None:
    """spec.json, done.json and best.pt = {"model": plain CPU state dict} of one trained model."""
    from sepnet.hpc.checkpoint import save_atomic

    member.spec.write(folder)
    atomic_write_json(folder / "done.json", member.done)
    state = {k: v.detach().cpu().contiguous() for k, v in member.network.state_dict().items()}
    save_atomic({"model": state}, folder / "best.pt")


def _write_manifest(folder: Path) -> None:
    files = {p.relative_to(folder).as_posix(): {"sha256": _sha256(p), "size": p.stat().st_size}
             for p in sorted(folder.rglob("*")) if p.is_file()}
    atomic_write_json(folder / MANIFEST, {"format": BUNDLE_FORMAT, "files": files})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- verify and load

def verify_bundle(path: str | Path) -> dict:
    """The bundle's manifest, after checking every file against it. DataError naming the first file that
    is missing, changed (size or sha256) or not listed, a manifest that is missing or unreadable, and a
    bundle of a newer format than ``BUNDLE_FORMAT``."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such bundle folder")
    manifest = read_model_json(path / MANIFEST, what="bundle manifest (written by `sepnet export`)")
    _check_format(manifest, path / MANIFEST)
    files = manifest.get("files")
    if not isinstance(files, dict) or META not in files:
        raise DataError(f"{path / MANIFEST}: not a bundle manifest (no file list with {META})")
    for rel in sorted(files):
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise DataError(f"{path / MANIFEST}: lists a path outside the bundle ({rel})")
        if not (path / rel).is_file():
            raise DataError(f"{path / rel}: missing from the bundle (listed in {MANIFEST})")
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if not p.is_dir() and rel != MANIFEST and rel not in files:
            raise DataError(f"{p}: not part of the bundle (not listed in {MANIFEST}); remove it or re-export")
    for rel in sorted(files):
        entry, p = files[rel], path / rel
        if not isinstance(entry, dict) or p.stat().st_size != entry.get("size") or _sha256(p) != entry.get("sha256"):
            raise DataError(f"{p}: changed since export (size or sha256 differs from {MANIFEST}); re-export the bundle")
    return manifest


def load_bundle(path: str | Path, *, fold: str | int = "all", overlap: float | None = None,
                tta: bool | None = None):
    """The :class:`sepnet.jobs.predict.StudyEnsemble` of a bundle folder, verified first
    (:func:`verify_bundle`). ``fold``: ``"all"`` (the bundle's folds) or one of them; ``overlap``/``tta``
    override the bundle's inference settings as for ``--study``. DataError naming the file for a bundle
    that is altered, of a newer format, or inconsistent (fusion weights unlike its members')."""
    from sepnet.core.postprocess import PostprocessDecision
    from sepnet.data.prepare import Plan
    from sepnet.jobs.config import load_config
    from sepnet.jobs.models import find_models
    from sepnet.jobs.predict import assemble_ensemble
    from sepnet.jobs.study import Layout

    path = Path(path)
    verify_bundle(path)
    meta = read_model_json(path / META, what="bundle description")
    _check_format(meta, path / META)
    try:
        decisions = {int(f): None if d is None else PostprocessDecision.from_dict(d)
                     for f, d in meta["postprocess"]["folds"].items()}
        stored = np.asarray(meta["fusion_weights"], dtype=float)
        bundle_folds = [int(f) for f in meta["folds"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path / META}: incomplete bundle description ({type(e).__name__}: {e})") from None
    found = {f: [d.name for d in dirs] for f, dirs in find_models(path).items()}
    ens = assemble_ensemble(load_config(path / CONFIG), where=path, found=found, model_dir=Layout(path).model_dir,
                            decision_of=decisions.get,
                            plan=Plan.from_dict(read_model_json(path / PLAN, what="plan"), source=str(path / PLAN)),
                            fingerprint=read_model_json(path / FINGERPRINT, what="fingerprint"),
                            fold=str(fold), overlap=overlap, tta=tta)
    if ens.folds == bundle_folds and (stored.shape != ens.weights.shape or not np.allclose(stored, ens.weights)):
        raise DataError(f"{path / META}: fusion weights differ from those of the bundle's members (done.json)")
    return ens


def _check_format(data, path: Path) -> None:
    version = data.get("format") if isinstance(data, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise DataError(f"{path}: no bundle format version")
    if version > BUNDLE_FORMAT:
        raise DataError(f"{path}: bundle format {version} is newer than this sepnet's {BUNDLE_FORMAT}; "
                        "upgrade sepnet")
