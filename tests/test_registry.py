"""The evaluated ensemble as an MLflow pyfunc model and in the Model Registry, against a real ``mlflow
server``: registered by the report job with the headline metrics as tags, loaded by
``mlflow.pyfunc.load_model`` with the labels of ``sepnet predict``, resolved by ``predict --model``,
idempotent on rerun, and without touching the finished study run."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from sepnet.core.errors import DataError
from sepnet.data.phantom import make_case
from sepnet.jobs import registry
from sepnet.jobs.cli import main

NAME = "sepnet-tiny"
EXPERIMENT = "registry-test"  # its own experiment: other tests may log the tiny study to the same server


@contextmanager
def tracking_uri(uri: str):
    """MLflow's global tracking URI (what ``models:/`` URIs resolve through) for the block only."""
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)


def _report_task(cfg, run_id):
    from sepnet.jobs.report import ReportTask

    return ReportTask(cfg=cfg, fold_ids=[0, 1], parent_run_id=run_id)


@pytest.fixture(scope="module")
def registered(trained_study, mlflow_server):
    """The trained tiny study's report job run once more against the server, with ``mlflow.register``."""
    from mlflow.tracking import MlflowClient

    from sepnet.jobs.config import load_config
    from sepnet.jobs.orchestrate import ensure_runs, study_run_keys

    study = trained_study.parent / "study"
    cfg = load_config(study / "study.yaml", overrides={"mlflow.tracking_uri": mlflow_server,
                                                      "mlflow.experiment": EXPERIMENT, "mlflow.register": NAME})
    assert cfg.mlflow.register == NAME
    run_id = ensure_runs(cfg, [0, 1])[study_run_keys(cfg)]
    _report_task(cfg, run_id)()
    return SimpleNamespace(cfg=cfg, study=study, run_id=run_id, uri=mlflow_server,
                           client=MlflowClient(tracking_uri=mlflow_server))


@pytest.fixture(scope="module")
def scan(registered, tmp_path_factory):
    """A small phantom NIfTI (rotated direction, shifted origin) and the labels ``sepnet predict --study``
    gives for it."""
    d = tmp_path_factory.mktemp("registry-scan")
    case = make_case(seed=[96, 0], size="tiny", case_id="reg")
    hu = np.ascontiguousarray(case.image[:16, :48, :48])  # small: one sliding window per member
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(case.geometry.spacing)
    img.SetOrigin((12.5, -40.0, 7.0))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    src = d / "scan.nii.gz"
    sitk.WriteImage(img, str(src))
    assert main(["predict", "-i", str(src), "-o", str(d / "out"), "--study", str(registered.study)]) == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "out" / "scan" / "labels.nii.gz")))
    assert labels.any()  # a comparison with an all-background map would prove little
    return SimpleNamespace(path=src, hu=hu, image=img, labels=labels)


def test_report_registers_the_ensemble_with_headline_tags(registered):
    import json

    c = registered.client
    versions = c.search_model_versions(f"name = '{NAME}'")
    assert [v.version for v in versions] == ["1"]
    mv = versions[0]
    assert mv.run_id == registered.run_id
    # the tags are the shipped (postprocessed) ensemble's figures of report.json
    report = json.loads((registered.study / "report" / "report.json").read_text())
    s = report["summary"]["ensemble+pp"]
    assert mv.tags["metrics_of"] == "ensemble+pp"
    assert float(mv.tags["dice_weighted"]) == pytest.approx(s["dice"]["weighted"]["mean"], abs=1e-4)
    assert float(mv.tags["hd95_weighted_mm"]) == pytest.approx(s["hd95"]["weighted"]["mean"], abs=1e-4)
    assert float(mv.tags["dice_small_organs"]) == pytest.approx(s["dice"]["small"]["mean"], abs=1e-4)
    assert mv.tags["n_cases"] == "4" and mv.tags["sepnet.study"] == "tiny"
    from sepnet import __version__

    assert mv.tags["sepnet.version"] == __version__
    # the version's source is a logged model that is an output of the study's run
    model_id = mv.source.removeprefix("models:/")
    run = c.get_run(registered.run_id)
    assert model_id in [o.model_id for o in run.outputs.model_outputs]
    lm = c.get_logged_model(model_id)
    assert lm.source_run_id == registered.run_id and str(lm.status).endswith("READY")
    # with a signature and an input example
    with tracking_uri(registered.uri):
        info = mlflow.models.get_model_info(f"models:/{NAME}/1")
    assert set(info.signature.inputs.input_names()) == {"path", "image", "spacing_zyx", "origin", "direction"}
    assert info.saved_input_example_info is not None


def test_pyfunc_predicts_the_labels_of_sepnet_predict(registered, scan):
    with tracking_uri(registered.uri):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    by_path = model.predict(pd.DataFrame({"path": [str(scan.path)]}))
    assert by_path.dtype == np.uint8
    np.testing.assert_array_equal(by_path, scan.labels)
    img = scan.image
    by_array = model.predict({"image": scan.hu, "spacing_zyx": list(img.GetSpacing())[::-1],
                              "origin": list(img.GetOrigin()), "direction": list(img.GetDirection())})
    np.testing.assert_array_equal(by_array, scan.labels)
    # the saved input example is runnable: labels on its grid
    example = model.input_example
    out = model.predict(example)
    assert out.shape == np.asarray(example["image"]).shape and out.dtype == np.uint8


def test_predict_model_alias_resolves_through_the_tracking_uri(registered, scan, tmp_path, monkeypatch):
    registered.client.set_registered_model_alias(NAME, "champion", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)
    monkeypatch.setenv("SEPNET_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["predict", "-i", str(scan.path), "-o", str(out), "--model", f"models:/{NAME}@champion"]) == 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "scan" / "labels.nii.gz")))
    np.testing.assert_array_equal(labels, scan.labels)
    # downloaded once into the cache; a second resolve is that folder
    first = registry.resolve_model(f"models:/{NAME}@champion")
    assert first.is_relative_to(tmp_path / "cache") and (first / "manifest.json").is_file()
    assert registry.resolve_model(f"models:/{NAME}/1") == first
    # a damaged cache entry is downloaded again, not used
    from sepnet.jobs.bundle import verify_bundle

    plan = first / "plan.json"
    original = plan.read_bytes()
    plan.write_bytes(original + b" ")
    assert registry.resolve_model(f"models:/{NAME}/1") == first
    assert plan.read_bytes() == original
    verify_bundle(first)


def test_unknown_model_uri_is_one_line_exit_2(registered, scan, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)
    monkeypatch.setenv("SEPNET_CACHE", str(tmp_path / "cache"))
    for uri in (f"models:/{NAME}/99", f"models:/{NAME}@nope", "models:/no-such-model/1", "runs:/abc/model"):
        assert main(["predict", "-i", str(scan.path), "-o", str(tmp_path / "out"), "--model", uri]) == 2
        err = capsys.readouterr().err.strip()
        assert uri in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_rerun_of_the_report_creates_no_second_version(registered):
    c = registered.client
    before = c.search_logged_models([c.get_run(registered.run_id).info.experiment_id])
    _report_task(registered.cfg, registered.run_id)()
    assert [v.version for v in c.search_model_versions(f"name = '{NAME}'")] == ["1"]
    after = c.search_logged_models([c.get_run(registered.run_id).info.experiment_id])
    assert sorted(m.model_id for m in after) == sorted(m.model_id for m in before)


def test_logging_leaves_the_finished_run_as_it_was(registered):
    c = registered.client
    exp = c.get_run(registered.run_id).info.experiment_id
    run_id = c.create_run(exp, run_name="finished").info.run_id
    c.set_terminated(run_id)
    info = c.get_run(run_id).info
    done = registry.log_ensemble(registered.cfg, client=c, run_id=run_id, register="")
    assert done.created and done.version is None  # a new run: a new logged model, not registered
    after = c.get_run(run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", info.end_time)
    assert [o.model_id for o in after.outputs.model_outputs] == [done.model_id]


def test_a_failed_model_logging_keeps_the_report(registered, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("registry down")

    monkeypatch.setattr(registry, "log_ensemble", broken)
    with caplog.at_level(logging.WARNING, logger="sepnet.report"):
        path = _report_task(registered.cfg, registered.run_id)()
    assert Path(path).is_file()
    assert any("registry down" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- without a server

def test_headline_tags_from_a_report():
    stat = {"mean": 0.5, "std": 0.1, "n": 3, "missing": 0}
    report = {"study": "s", "summary": {
        "ensemble": {"dice": {"weighted": {**stat, "mean": 0.1}}},
        "ensemble+pp": {"dice": {"weighted": {**stat, "mean": 0.61234}, "small": {**stat, "mean": 0.25}},
                        "hd95": {"weighted": {**stat, "mean": 4.5}}}}}
    tags = registry.headline_tags(report)
    assert {k: tags[k] for k in ("metrics_of", "dice_weighted", "hd95_weighted_mm", "dice_small_organs",
                                 "n_cases", "sepnet.study")} == {
        "metrics_of": "ensemble+pp", "dice_weighted": "0.6123", "hd95_weighted_mm": "4.5000",
        "dice_small_organs": "0.2500", "n_cases": "3", "sepnet.study": "s"}
    del report["summary"]["ensemble+pp"]
    assert registry.headline_tags(report)["dice_weighted"] == "0.1000"


def test_model_input_errors_and_geometry():
    hu = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(DataError, match="spacing_zyx"):
        registry._scans({"image": hu})
    with pytest.raises(DataError, match="spacing_zyx.*positive"):
        registry._scans({"image": hu, "spacing_zyx": [3, 0, 1]})
    with pytest.raises(DataError, match="direction"):
        registry._scans({"image": hu, "spacing_zyx": [3, 1, 1], "direction": [1, 0, 0]})
    with pytest.raises(DataError, match=r"\(z, y, x\)"):
        registry._scans({"image": hu[0], "spacing_zyx": [3, 1, 1]})
    with pytest.raises(DataError, match="'path'"):
        registry._scans(pd.DataFrame({"other": [1]}))
    [(_, image, geom)] = registry._scans({"image": hu + 0.6, "spacing_zyx": [3.0, 0.8, 0.9]})
    assert image.dtype == np.int16 and image.max() == 1
    assert geom.spacing == (0.9, 0.8, 3.0) and geom.shape == (2, 3, 4) and geom.origin == (0.0, 0.0, 0.0)


def test_resolve_model_refuses_bad_uris(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(DataError, match="not a registered model URI"):
        registry.resolve_model("models:/name", tracking_uri="http://127.0.0.1:1")
    with pytest.raises(DataError, match="MLFLOW_TRACKING_URI"):
        registry.resolve_model("models:/name/1")
