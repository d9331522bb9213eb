"""A study's evaluated ensemble as an MLflow model, in the Model Registry, and back.

- :class:`EnsembleModel`: the ``mlflow.pyfunc`` model. Its one artifact is a bundle
  (:func:`sepnet.jobs.bundle.export_bundle`); ``load_context`` loads it with
  :func:`sepnet.jobs.bundle.load_bundle`, ``predict`` runs :func:`sepnet.jobs.predict.predict_case`, the one
  prediction path, so its labels are those of ``sepnet predict``.
- :func:`log_ensemble`: export the study's bundle and log it as an MLflow 3 *logged model* of the study's
  run (``source_run_id`` + the run's model outputs), with a signature and an input example; register it as
  a new version of a registered model when asked. It only writes to the run (no status change, the
  run is never reopened). A rerun with the same bundle (same checksum) on the same run reuses the logged
  model and the version: no duplicates.
- :func:`resolve_model`: ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` -> a local bundle folder,
  downloaded once into a cache (``$SEPNET_CACHE``, else ``$XDG_CACHE_HOME/sepnet``, else
  ``~/.cache/sepnet``).

Input of ``predict`` (one CT per call; a DataFrame of several ``path`` rows gives a list):

- ``{"path": "ct.nii.gz"}`` or a DataFrame with a ``path`` column: anything ``sepnet predict -i`` reads
  (NIfTI, NRRD, MHA, a DICOM series folder, a StructSeg case folder); a bare ``str`` works when the
  model is called unwrapped (MLflow's schema enforcement turns a bare string into an unnamed column);
- ``{"image": (z, y, x) HU array, "spacing_zyx": [sz, sy, sx] mm}``, optionally ``"origin"`` (x, y, z) mm
  LPS and ``"direction"`` (9 numbers, row-major), as in :class:`sepnet.data.case.Geometry` (defaults: 0
  and the identity); the three vectors as floats (the signature's arrays of doubles refuse integers).

Output: labels uint8 (z, y, x), StructSeg organ ids, on the input's grid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from sepnet.core.errors import DataError

log = logging.getLogger("sepnet.registry")

ARTIFACT_KEY = "bundle"  # the bundle's key in the pyfunc model's artifacts
MODEL_NAME = "ensemble"  # the logged model's name on the study's run
CHECKSUM_TAG = "sepnet.bundle_sha256"
STUDY_TAG = "sepnet.study"
HEADLINE_MODELS = ("ensemble+pp", "ensemble")  # the report column the shipped model is (postprocessed first)
MODEL_CODE = """\
# The sepnet ensemble as an MLflow pyfunc model (models from code): needs sepnet installed.
from mlflow.models import set_model

from sepnet.jobs.registry import EnsembleModel

set_model(EnsembleModel())
"""
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))/?$")


# --------------------------------------------------------------------------- the pyfunc model

class EnsembleModel(mlflow.pyfunc.PythonModel):
    """A study's ensemble behind ``mlflow.pyfunc``: labels uint8 (z, y, x) for one CT (see the module)."""

    # the signature validates the input; no type-hint wrapping of predict (MLflow warns without hints)
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        import torch

        from sepnet.jobs.bundle import load_bundle

        self.ens = load_bundle(context.artifacts[ARTIFACT_KEY])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def predict(self, context, model_input, params=None):
        """Labels uint8 (z, y, x) of the CT in ``model_input`` (a list for a DataFrame of several);
        DataError for an input it cannot read."""
        import torch

        from sepnet.jobs.predict import predict_case

        scans = _scans(model_input)
        with torch.no_grad():
            labels = [predict_case(hu, geom, self.ens, device=self.device, case_id=name).labels
                      for name, hu, geom in scans]
        return labels[0] if len(labels) == 1 else labels


def _scans(model_input: Any) -> list[tuple[str, np.ndarray, Any]]:
    """(name, HU int16 (z, y, x), Geometry) of each CT in ``model_input`` (see the module)."""
    import pandas as pd

    if isinstance(model_input, (str, os.PathLike)):
        return [_read_path(model_input)]
    if isinstance(model_input, dict):
        rows = [model_input]
    elif isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict("records")
    else:
        raise DataError(f"model input: expected a path, a dict or a DataFrame, got {type(model_input).__name__}")
    out = []
    for row in rows:
        if isinstance(row.get("path"), (str, os.PathLike)):
            out.append(_read_path(row["path"]))
        elif row.get("image") is not None:
            out.append(_from_array(row))
        else:
            raise DataError("model input: give {'path': a CT file or folder} or {'image': HU (z, y, x), "
                            "'spacing_zyx': [sz, sy, sx]} (a bare string is lost to MLflow's schema check)")
    if not out:
        raise DataError("model input: no CT given")
    return out


def _read_path(path: str | os.PathLike) -> tuple[str, np.ndarray, Any]:
    from sepnet.data.readers import read_image

    hu, geom = read_image(path)
    return Path(path).name, hu, geom


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _from_array(row: dict) -> tuple[str, np.ndarray, Any]:
    """An array CT: ``image`` HU (z, y, x) (rounded to int16), ``spacing_zyx``, optional origin/direction."""
    from sepnet.data.case import Geometry

    image = np.asarray(row["image"])
    if image.ndim != 3 or not image.size:
        raise DataError(f"model input 'image': expected a (z, y, x) array, got shape {image.shape}")
    if image.dtype != np.int16:
        image = np.clip(np.rint(image.astype(np.float64)), -32768, 32767).astype(np.int16)

    def vector(key: str, n: int, default: tuple) -> tuple[float, ...]:
        v = row.get(key)
        if not _present(v):
            if default is None:
                raise DataError(f"model input: '{key}' ({n} numbers) is required with 'image'")
            return default
        a = np.asarray(v, dtype=np.float64).ravel()
        if a.size != n or not np.isfinite(a).all():
            raise DataError(f"model input '{key}': expected {n} finite numbers, got {a.tolist()}")
        return tuple(float(x) for x in a)

    sz, sy, sx = vector("spacing_zyx", 3, None)
    if min(sz, sy, sx) <= 0:
        raise DataError(f"model input 'spacing_zyx': must be positive, got {[sz, sy, sx]}")
    geom = Geometry(spacing=(sx, sy, sz), origin=vector("origin", 3, (0.0, 0.0, 0.0)),
                    direction=vector("direction", 9, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)),
                    shape=tuple(int(s) for s in image.shape))
    return str(row.get("name") or "array"), image, geom


def signature() -> Any:
    """Input: optional columns ``path`` (string) or ``image`` (any: the (z, y, x) array, passed through
    without copying) + ``spacing_zyx``, ``origin``, ``direction`` (arrays of doubles); output: labels
    uint8 (z, y, x)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("string", "path", required=False), ColSpec(AnyType(), "image", required=False),
                     *(ColSpec(Array("double"), k, required=False) for k in ("spacing_zyx", "origin", "direction"))])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1), "labels")]))


def input_example() -> dict:
    """A runnable array input: a small water-and-air phantom (int16 HU) at 3 x 1 x 1 mm."""
    image = np.full((8, 32, 32), -1000, dtype=np.int16)
    image[2:6, 8:24, 8:24] = 0
    return {"image": image.tolist(), "spacing_zyx": [3.0, 1.0, 1.0]}


# --------------------------------------------------------------------------- logging and registering

@dataclass
class LoggedEnsemble:
    """What :func:`log_ensemble` did: the logged model (``models:/<model_id>``), whether it was new, and
    the registered version (None when not registering) and whether that was new."""

    model_id: str
    model_uri: str
    checksum: str
    created: bool
    name: str | None = None
    version: str | None = None
    version_created: bool = False

    def line(self) -> str:
        s = f"ensemble logged as {self.model_uri}" + ("" if self.created else " (unchanged, reused)")
        if self.version is not None:
            s += f"; registered as models:/{self.name}/{self.version}" + ("" if self.version_created else " (existing)")
        return s


def bundle_checksum(bundle: Path) -> str:
    """sha256 of the bundle's manifest file list (every file's path, size and sha256), after verifying
    the bundle against it: the same ensemble exported twice has the same checksum."""
    from sepnet.jobs.bundle import verify_bundle

    files = verify_bundle(bundle)["files"]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def headline_tags(report: dict) -> dict[str, str]:
    """Version tags from ``report.json``: the shipped ensemble's weighted Dice, weighted HD95 (mm),
    small-organ Dice, the number of test cases, the study name and the sepnet version."""
    from sepnet import __version__

    summary = report.get("summary") or {}
    model = next((m for m in HEADLINE_MODELS if m in summary), None)
    tags = {STUDY_TAG: str(report.get("study", "")), "sepnet.version": __version__}
    if model is None:
        return tags
    s = summary[model]

    def stat(metric: str, how: str) -> dict:
        return (s.get(metric) or {}).get(how) or {}

    tags["metrics_of"] = model
    for key, metric, how in (("dice_weighted", "dice", "weighted"), ("hd95_weighted_mm", "hd95", "weighted"),
                             ("dice_small_organs", "dice", "small")):
        v = stat(metric, how).get("mean")
        if v is not None and math.isfinite(float(v)):
            tags[key] = f"{float(v):.4f}"
    n = stat("dice", "weighted").get("n")
    if n is not None:
        tags["n_cases"] = str(int(n))
    return tags


def _study_run(cfg: Any, client: Any, run_id: str | None) -> str | None:
    from sepnet.jobs import tracking

    if run_id is not None:
        return run_id
    exp = tracking.ensure_experiment(client, cfg.mlflow.experiment or cfg.name)
    return tracking.find_run(client, exp, cfg.name)


def log_ensemble(cfg: Any, *, client: Any, run_id: str | None = None, register: str | None = None,
                 report: dict | None = None) -> LoggedEnsemble | None:
    """Log the evaluated ensemble of study ``cfg`` (a StudyConfig) on its study run, and register it
    under ``register`` (None: ``cfg.mlflow.register``; ``""`` or both None: not registered).

    ``run_id``: the study's run (None: found by its key). ``report``: report.json's content (None: read
    from the study). Returns None when the study has no run. Idempotent: the same bundle on the same
    run gives the same logged model and version."""
    from sepnet.jobs.bundle import export_bundle
    from sepnet.jobs.study import Layout

    run_id = _study_run(cfg, client, run_id)
    if run_id is None:
        return None
    layout = Layout(Path(cfg.root))
    if report is None:
        path = layout.report / "report.json"
        report = json.loads(path.read_text()) if path.is_file() else {}
    register = register if register is not None else cfg.mlflow.register
    with tempfile.TemporaryDirectory(prefix=".sepnet-pyfunc-", dir=layout.root) as tmp:
        bundle = export_bundle(layout.root, Path(tmp) / "bundle", fold="all")
        checksum = bundle_checksum(bundle)
        run = client.get_run(run_id)
        found = _find_logged_model(client, run.info.experiment_id, run_id, checksum)
        if found is not None:
            done = LoggedEnsemble(found, f"models:/{found}", checksum, created=False)
        else:
            model_id = _log_pyfunc(client, run, bundle, checksum=checksum, study=cfg.name, tmp=Path(tmp))
            done = LoggedEnsemble(model_id, f"models:/{model_id}", checksum, created=True)
    if register:
        done.name = register
        done.version, done.version_created = _register(client, register, done, run_id=run_id,
                                                       tags=headline_tags(report))
    return done


def _find_logged_model(client: Any, experiment_id: str, run_id: str, checksum: str) -> str | None:
    models = client.search_logged_models(
        [experiment_id], filter_string=f"tags.`{CHECKSUM_TAG}` = '{checksum}' AND source_run_id = '{run_id}'")
    ready = [m for m in models if str(m.status).upper().endswith("READY")]
    return ready[0].model_id if ready else None


def _log_pyfunc(client: Any, run: Any, bundle: Path, *, checksum: str, study: str, tmp: Path) -> str:
    """Save the pyfunc model locally, upload it as a logged model of ``run`` and mark it READY."""
    import mlflow
    import torch
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    from sepnet import __version__

    run_id = run.info.run_id
    lm = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                    tags={CHECKSUM_TAG: checksum, STUDY_TAG: study}, model_type="sepnet-ensemble")
    try:
        local = tmp / "model"
        meta = Model(artifact_path=lm.artifact_location, model_uuid=lm.model_id, run_id=run_id, model_id=lm.model_id)
        code = tmp / "sepnet_ensemble.py"  # models from code: the model is this import, nothing is pickled
        code.write_text(MODEL_CODE)
        mlflow.pyfunc.save_model(
            path=str(local), python_model=str(code), artifacts={ARTIFACT_KEY: str(bundle)},
            signature=signature(), input_example=input_example(), mlflow_model=meta,
            # given, so MLflow does not load the model in a subprocess to infer them
            pip_requirements=[f"sepnet=={__version__}", f"torch=={torch.__version__.split('+')[0]}",
                              f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"])
        client.log_model_artifacts(lm.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(lm.model_id, step=0)])
    except BaseException:
        client.finalize_logged_model(lm.model_id, "FAILED")
        raise
    client.finalize_logged_model(lm.model_id, "READY")
    return lm.model_id


def _register(client: Any, name: str, done: LoggedEnsemble, *, run_id: str, tags: dict[str, str]) -> tuple[str, bool]:
    """(version, created): the version of ``name`` holding this logged model, else a new one."""
    from mlflow.exceptions import MlflowException

    from sepnet.jobs import tracking

    try:
        client.create_registered_model(name, description="sepnet ensembles (3D-SepNet, head-and-neck OARs)")
    except MlflowException as e:
        if "ALREADY_EXISTS" not in str(e.error_code):
            raise
    for mv in client.search_model_versions(f"name = '{tracking.quote(name)}' AND run_id = '{run_id}'"):
        if mv.tags.get(CHECKSUM_TAG) == done.checksum:
            return str(mv.version), False
    mv = client.create_model_version(name, source=done.model_uri, run_id=run_id, model_id=done.model_id,
                                     tags={**tags, CHECKSUM_TAG: done.checksum})
    return str(mv.version), True


# --------------------------------------------------------------------------- from the registry

def cache_root() -> Path:
    """Where downloaded bundles are kept: ``$SEPNET_CACHE``, else ``$XDG_CACHE_HOME/sepnet``, else
    ``~/.cache/sepnet``."""
    if os.environ.get("SEPNET_CACHE"):
        return Path(os.environ["SEPNET_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sepnet"


def resolve_model(uri: str, *, tracking_uri: str | None = None) -> Path:
    """The local bundle folder of registered model ``uri`` (``models:/NAME/VERSION`` or
    ``models:/NAME@ALIAS``), downloaded from the registry at ``tracking_uri`` (None:
    ``$MLFLOW_TRACKING_URI``) on first use. DataError naming ``uri`` when it is malformed, unknown to
    the registry or holds no sepnet bundle."""
    from mlflow.exceptions import MlflowException

    from sepnet.hpc.atomic import replace_dir
    from sepnet.jobs import tracking

    m = _URI.match(uri)
    if m is None:
        raise DataError(f"{uri}: not a registered model URI (models:/NAME/VERSION or models:/NAME@ALIAS)")
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise DataError(f"{uri}: no MLflow tracking URI to resolve it (set MLFLOW_TRACKING_URI)")
    client = tracking.client(tracking_uri)
    name = m["name"]
    try:
        mv = (client.get_model_version(name, m["version"]) if m["version"]
              else client.get_model_version_by_alias(name, m["alias"]))
        where = client.get_model_version_download_uri(name, mv.version)
    except MlflowException as e:
        raise DataError(f"{uri}: not found in the model registry at {tracking_uri} ({_first_line(e)})") from None
    key = hashlib.sha256(f"{tracking_uri}\0{name}\0{mv.version}\0{mv.model_id or mv.source}".encode()).hexdigest()[:16]
    final = cache_root() / "models" / f"{_safe(name)}-v{mv.version}-{key}"
    if _intact(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{final.name}.", dir=final.parent) as tmp:
        try:
            local = Path(_download(where, dst=tmp, tracking_uri=tracking_uri))
        except MlflowException as e:
            raise DataError(f"{uri}: download from {where} failed ({_first_line(e)})") from None
        bundle = _bundle_in(local, uri)
        replace_dir(bundle, final)
    return final


def _intact(bundle: Path) -> bool:
    """A cached bundle that matches its manifest (a damaged or partial one is downloaded again)."""
    from sepnet.jobs.bundle import verify_bundle

    if not (bundle / "manifest.json").is_file():
        return False
    try:
        verify_bundle(bundle)
    except DataError as e:
        log.warning("%s; downloading it again", e)
        return False
    return True


def _download(artifact_uri: str, *, dst: str, tracking_uri: str) -> str:
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=dst, tracking_uri=tracking_uri)


def _bundle_in(model_dir: Path, uri: str) -> Path:
    """The bundle folder inside a downloaded pyfunc model (its MLmodel names the artifact's path)."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    try:
        meta = yaml.safe_load(mlmodel.read_text())
        rel = meta["flavors"]["python_function"]["artifacts"][ARTIFACT_KEY]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        raise DataError(f"{uri}: not a sepnet ensemble (its MLmodel has no '{ARTIFACT_KEY}' artifact)") from None
    bundle = model_dir / rel
    if not (bundle / "manifest.json").is_file():
        raise DataError(f"{uri}: its '{ARTIFACT_KEY}' artifact holds no bundle manifest")
    return bundle


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _first_line(e: Exception) -> str:
    return (str(getattr(e, "message", None) or e).strip().splitlines() or [type(e).__name__])[0][:200]


__all__ = ["EnsembleModel", "LoggedEnsemble", "log_ensemble", "resolve_model", "headline_tags", "bundle_checksum",
           "signature", "input_example", "cache_root"]
