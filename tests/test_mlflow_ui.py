"""What MLflow's UI shows for a study, read back from the tiny trained study's sqlite store.

The runs tree, the experiment's kind tag, fold splits and ensemble weights as params, organ-named
metrics, the parent's headline metrics, each model's weights as an artifact, system metrics, the runs
URL in report.md and from ``sepnet cv``, the by-organ figure's shape, and ``sepnet relocate`` of a
copied study (artifacts downloaded from the copy).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from sepnet.core.organs import ORGAN_NAMES
from sepnet.jobs import tracking
from sepnet.jobs.config import load_config
from sepnet.jobs.study import Layout


def _study(cfg_path: Path):
    cfg = load_config(cfg_path)
    c = tracking.client(tracking.resolve_uri(cfg))
    exp = c.get_experiment_by_name(cfg.mlflow.experiment or cfg.name)
    runs = {r.data.tags[tracking.KEY_TAG]: r for r in c.search_runs([exp.experiment_id], max_results=1000)}
    return cfg, c, exp, runs


@pytest.fixture(scope="module")
def study(trained_study):
    return _study(trained_study)


def _training_runs(cfg, runs):
    return {k: r for k, r in runs.items() if "sepnet.member" in r.data.tags}


def test_experiment_opens_on_runs_and_tree(study):
    cfg, c, exp, runs = study
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    models = [m.name for m in cfg.models()]
    folds = json.loads(Layout(Path(cfg.root)).folds_file.read_text())["folds"]
    want = {cfg.name} | {f"{cfg.name}/fold{f}" for f in range(len(folds))} | {
        f"{cfg.name}/fold{f}/{m}" for f in range(len(folds)) for m in [*models, "ensemble"]}
    assert set(runs) == want
    parent = runs[cfg.name].info.run_id
    for f in range(len(folds)):
        fold = runs[f"{cfg.name}/fold{f}"]
        assert fold.data.tags["mlflow.parentRunId"] == parent
        for m in [*models, "ensemble"]:
            assert runs[f"{cfg.name}/fold{f}/{m}"].data.tags["mlflow.parentRunId"] == fold.info.run_id
    assert all(r.info.status == "FINISHED" for r in runs.values())


def test_training_runs_not_reopened_by_evaluation(study):
    cfg, c, exp, runs = study
    layout = Layout(Path(cfg.root))
    for key, r in _training_runs(cfg, runs).items():
        fold = int(r.data.tags["sepnet.fold"])
        eval_started_ms = (layout.eval_dir(fold) / "postprocess.json").stat().st_mtime * 1000
        assert r.info.status == "FINISHED"
        assert r.info.end_time < eval_started_ms, key  # ended by training, not by evaluation
        assert any(k.startswith("test_dice_") for k in r.data.metrics), key  # yet evaluation's metrics are there


def test_metric_names_by_organ(study):
    cfg, c, exp, runs = study
    names = set(ORGAN_NAMES.values())
    for key, r in _training_runs(cfg, runs).items():
        val = {k.removeprefix("val_dice_") for k in r.data.metrics if k.startswith("val_dice_")} - {"mean_fg"}
        test = {k.removeprefix("test_dice_") for k in r.data.metrics if k.startswith("test_dice_")}
        test = {t for t in test if not t.startswith(("mean", "weighted"))}  # the summaries
        assert val and val <= names, (key, val)  # no numbered val_dice_07
        assert test <= names
        assert val & test, key  # the same organ under the same name in both


def test_parent_has_headline_metrics_only(study):
    cfg, c, exp, runs = study
    parent = runs[cfg.name]
    report = json.loads((Layout(Path(cfg.root)).report / "report.json").read_text())
    assert set(parent.data.metrics) <= {"ensemble_dice_weighted", "ensemble_hd95_weighted",
                                        "ensemble_pp_dice_weighted", "ensemble_pp_hd95_weighted"}
    want = report["summary"]["ensemble"]["dice"]["weighted"]["mean"]
    assert parent.data.metrics["ensemble_dice_weighted"] == pytest.approx(want)


def test_fold_runs_hold_their_split(study):
    cfg, c, exp, runs = study
    folds = json.loads(Layout(Path(cfg.root)).folds_file.read_text())["folds"]
    for f, split in enumerate(folds):
        r = runs[f"{cfg.name}/fold{f}"]
        for part in ("train", "val", "test"):
            assert r.data.params[f"split.n_{part}"] == str(len(split[part]))
            assert r.data.params[f"split.{part}"].split(",") == split[part]
        art = json.loads(Path(c.download_artifacts(r.info.run_id, "split.json")).read_text())
        assert {p: art[p] for p in ("train", "val", "test")} == {p: split[p] for p in ("train", "val", "test")}


def test_ensemble_run_holds_members_and_weights(study):
    cfg, c, exp, runs = study
    members = [m.name for m in cfg.members]
    for f in (0, 1):
        done = json.loads((Layout(Path(cfg.root)).eval_dir(f) / "done.json").read_text())
        p = runs[f"{cfg.name}/fold{f}/ensemble"].data.params
        assert p["ensemble.members"].split(",") == members and p["ensemble.weighting"] == cfg.ensemble.weighting
        for m, w in zip(members, done["weights"]):
            assert json.loads(p[f"ensemble.weights.{m}"]) == pytest.approx(w, abs=1e-6)


def test_weights_artifact_loads(study, tmp_path):
    cfg, c, exp, runs = study
    layout = Layout(Path(cfg.root))
    key, r = sorted(_training_runs(cfg, runs).items())[0]
    assert {f.path for f in c.list_artifacts(r.info.run_id, "model")} >= {"model/best.pt", "model/spec.json"}
    got = torch.load(c.download_artifacts(r.info.run_id, "model/best.pt", str(tmp_path)), weights_only=True)
    ref = torch.load(layout.model_dir(int(r.data.tags["sepnet.fold"]), r.data.tags["sepnet.member"]) / "best.pt",
                     weights_only=True)
    assert got["model"].keys() == ref["model"].keys()
    assert all(torch.equal(got["model"][k], ref["model"][k]) for k in ref["model"])


def test_system_metrics_on_training_runs(study):
    pytest.importorskip("psutil")
    cfg, c, exp, runs = study
    for key, r in _training_runs(cfg, runs).items():
        assert any(k.startswith("system/cpu_utilization") for k in r.data.metrics), key


def test_report_names_runs_url(study):
    cfg, c, exp, runs = study
    md = (Layout(Path(cfg.root)).report / "report.md").read_text()
    assert f"/#/experiments/{exp.experiment_id}/runs" in md


def test_by_organ_figure_near_4_to_3(study):
    import matplotlib.image as mpimg

    cfg, *_ = study
    h, w = mpimg.imread(Layout(Path(cfg.root)).report / "dice_by_organ.png").shape[:2]
    assert 1.1 < w / h < 1.6, (w, h)  # about 4:3: readable in the artifact viewer


def test_relocate_copied_study(trained_study, tmp_path, capsys):
    from sepnet.jobs.cli import main

    src = trained_study.parent
    dst = tmp_path / "moved"
    shutil.copytree(src, dst)
    cfg, c, exp, runs = _study(dst / trained_study.name)
    root = Path(cfg.root)
    run = runs[f"{cfg.name}/fold0/{cfg.members[0].name}"]
    assert run.info.artifact_uri.startswith(Layout(src / "study").root.resolve().as_uri())  # still the old folder
    marker = root / "mlartifacts" / run.info.run_id / "artifacts" / "model" / "spec.json"
    marker.write_text('{"copied": true}')  # only the copy has this content

    assert main(["relocate", str(root), "--dry-run"]) == 0
    assert "nothing written" in capsys.readouterr().out
    assert c.get_run(run.info.run_id).info.artifact_uri == run.info.artifact_uri
    assert main(["relocate", str(root)]) == 0
    assert (root / "mlflow.db.before-relocate").is_file()
    moved = c.get_run(run.info.run_id).info.artifact_uri
    assert moved.startswith(root.resolve().as_uri() + "/mlartifacts/")
    assert c.get_experiment(exp.experiment_id).artifact_location == (root / "mlartifacts").resolve().as_uri()
    got = c.download_artifacts(run.info.run_id, "model/spec.json", str(tmp_path / "dl"))
    assert Path(got).read_text() == '{"copied": true}'
    capsys.readouterr()
    assert main(["relocate", str(root)]) == 0  # idempotent
    assert "nothing to change" in capsys.readouterr().out
    assert c.get_run(run.info.run_id).info.artifact_uri == moved

    # a rerun of the copy (its config params changed: root) resumes, ends its runs and prints the runs page
    assert main(["cv", str(dst / trained_study.name)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"mlflow ui --backend-store-uri \S+ +then open http://\S+/#/experiments/"
                     rf"{exp.experiment_id}/runs", out), out[-2000:]
    assert c.get_run(runs[cfg.name].info.run_id).info.status == "FINISHED"


def test_relocate_refuses_server_store_and_missing_store(tmp_path, capsys):
    from sepnet.jobs.cli import main

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.yaml").write_text("name: s\nmlflow: {tracking_uri: 'http://127.0.0.1:5000'}\n")
    assert main(["relocate", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a sqlite store" in err and "study.yaml" in err
    (tmp_path / "e").mkdir()
    assert main(["relocate", str(tmp_path / "e")]) == 2
    assert "no MLflow sqlite store" in capsys.readouterr().err
