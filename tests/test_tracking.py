"""jobs.tracking against a real ``mlflow server`` on 127.0.0.1: idempotent runs, run tree, params, config."""

from __future__ import annotations

import re

import pytest

from sepnet.jobs import tracking
from sepnet.jobs.config import config_from_dict


def _cfg(tmp_path, **mlflow):
    return config_from_dict({"name": "s", "root": str(tmp_path / "study"), "datasets": [{"path": "d"}],
                             "mlflow": mlflow})


def test_resolve_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri(_cfg(tmp_path)) == f"sqlite:///{tmp_path / 'study' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert tracking.resolve_uri(_cfg(tmp_path)) == "http://127.0.0.1:9"
    assert tracking.resolve_uri(_cfg(tmp_path, tracking_uri="http://h:1")) == "http://h:1"


def test_default_artifact_location_beside_sqlite(tmp_path):
    assert tracking.default_artifact_location(f"sqlite:///{tmp_path}/x/mlflow.db") == (
        tmp_path / "x" / "mlartifacts").as_uri()
    assert tracking.default_artifact_location("http://127.0.0.1:5000") is None


def test_git_commit(tmp_path):
    commit = tracking.git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert tracking.git_commit(tmp_path) is None  # not a checkout


def test_run_tree_on_mlflow_server(mlflow_server):
    c = tracking.client(mlflow_server)
    exp = tracking.ensure_experiment(c, "tree")
    assert tracking.ensure_experiment(c, "tree") == exp
    parent = tracking.get_or_create_run(c, exp, key="tree", name="study")
    kids = {m: tracking.get_or_create_run(c, exp, key=f"tree/fold0/{m}", name=m, parent_run_id=parent,
                                          tags={"sepnet.member": m}) for m in ("a", "b")}
    # reruns find the same runs: no duplicates
    assert tracking.get_or_create_run(c, exp, key="tree", name="study") == parent
    again = tracking.get_or_create_run(c, exp, key="tree/fold0/a", name="a", parent_run_id=parent,
                                       tags={"sepnet.member": "a", "sepnet.executor_job_id": "42"})
    assert again == kids["a"]
    # read the tree back from the server
    all_runs = c.search_runs([exp])
    assert len(all_runs) == 3
    children = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.data.tags["sepnet.member"] for r in children) == ["a", "b"]
    assert c.get_run(kids["a"]).data.tags["sepnet.executor_job_id"] == "42"
    assert c.get_run(kids["b"]).info.run_name == "b"


def test_params_and_config_on_mlflow_server(mlflow_server, tmp_path):
    c = tracking.client(mlflow_server)
    exp = tracking.ensure_experiment(c, "params")
    run = tracking.get_or_create_run(c, exp, key="p", name="p")
    params = {"training": {"lr": 0.001, "patch": [16, 128, 128]}, "long": "x" * 7000,
              "many": {f"k{i:03d}": i for i in range(150)}}  # > 100 params: several batches
    logged = tracking.log_params_flat(c, run, params)
    got = c.get_run(run).data.params
    assert got["training.lr"] == "0.001" and got["training.patch"] == "[16, 128, 128]"
    assert len(got["long"]) == tracking.PARAM_VALUE_LIMIT and got["long"].endswith("...")
    assert got["many.k149"] == "149" and len(got) == 153 == len(logged)
    tracking.log_params_flat(c, run, params)  # rerun: same values, no "param already logged" error
    with pytest.raises(Exception):  # noqa: B017 - MLflow refuses to change a logged param
        tracking.log_params_flat(c, run, {"training": {"lr": 0.5}})
    text = "name: s  # comment kept\nmembers:\n  - {name: m}\n"
    tracking.log_config_text(c, run, text)
    path = c.download_artifacts(run, "config.yaml", str(tmp_path))
    assert open(path).read() == text


def test_run_tracker_buffers_and_resumes_its_run(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    off = tracking.RunTracker(uri, enabled=False, experiment="e", key="k", name="n")  # e.g. DDP rank 1
    off.metric("loss", 1.0, 1)
    off.finish()
    assert off.run_id is None and not (tmp_path / "mlflow.db").exists()
    monkeypatch.setattr(tracking.RunTracker, "BUFFER", 3)
    t = tracking.RunTracker(uri, enabled=True, experiment="e", key="s/fold0/m", name="fold0/m",
                            tags={"sepnet.fold": "0"}, params={"training": {"lr": 0.001}}, config_text="a: 1\n")
    c = tracking.client(uri)
    for step in range(1, 5):
        t.metric("loss", 1.0 / step, step)
    t.metric("loss", float("nan"), 5)  # dropped, not sent
    assert [m.step for m in c.get_metric_history(t.run_id, "loss")] == [1, 2, 3]  # the first full buffer
    t.finish()
    run = c.get_run(t.run_id)
    assert [m.step for m in c.get_metric_history(t.run_id, "loss")] == [1, 2, 3, 4]
    assert run.info.status == "FINISHED" and run.data.params["training.lr"] == "0.001"
    assert run.data.tags["sepnet.fold"] == "0" and run.data.tags[tracking.KEY_TAG] == "s/fold0/m"
    again = tracking.RunTracker(uri, enabled=True, experiment="e", key="s/fold0/m", name="fold0/m")
    assert again.run_id == t.run_id and c.get_run(t.run_id).info.status == "RUNNING"  # a resumed job's run


def test_experiment_kind_tag_and_runs_url(mlflow_server):
    # MLflow 3's UI opens an experiment tagged custom_model_development on its runs (not GenAI traces)
    c = tracking.client(mlflow_server)
    exp = c.create_experiment("untagged")  # an experiment made before the tag existed gets it too
    assert tracking.EXPERIMENT_KIND_TAG not in c.get_experiment(exp).tags
    assert tracking.ensure_experiment(c, "untagged") == exp
    assert c.get_experiment(exp).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    new = tracking.ensure_experiment(c, "kind-new")
    assert c.get_experiment(new).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracking.runs_url(mlflow_server + "/", new) == f"{mlflow_server}/#/experiments/{new}/runs"
    assert tracking.ui_hint(mlflow_server, "kind-new") == f"MLflow runs: {mlflow_server}/#/experiments/{new}/runs"
    assert tracking.runs_url("sqlite:////x/mlflow.db", "3") == "http://127.0.0.1:5000/#/experiments/3/runs"


def test_finished_run_found_without_reopening(mlflow_server):
    from mlflow.entities import Metric

    c = tracking.client(mlflow_server)
    exp = tracking.ensure_experiment(c, "no-reopen")
    run = tracking.get_or_create_run(c, exp, key="k", name="n")
    c.set_terminated(run)
    before = c.get_run(run).info
    again = tracking.get_or_create_run(c, exp, key="k", name="n", tags={"sepnet.model": "m"}, reopen=False)
    c.log_batch(again, metrics=[Metric("test_dice_Lens_L", 0.5, 0, 0)])  # logging to a FINISHED run
    after = c.get_run(run)
    assert again == run and after.data.metrics["test_dice_Lens_L"] == 0.5 and after.data.tags["sepnet.model"] == "m"
    assert (after.info.status, after.info.end_time) == ("FINISHED", before.end_time)
    tracking.get_or_create_run(c, exp, key="k", name="n")  # the default reopens: a resumed job's run
    assert c.get_run(run).info.status == "RUNNING"


def test_run_tracker_system_metrics_and_files(tmp_path):
    pytest.importorskip("psutil")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = tracking.RunTracker(uri, enabled=True, experiment="e", key="sys", name="sys", system_metrics=True,
                            system_metrics_interval=3600.0)  # no periodic sample: the final one at finish
    (tmp_path / "w.txt").write_text("weights")
    t.log_files([tmp_path / "w.txt", tmp_path / "absent.txt"], "model")
    t.finish()
    c = tracking.client(uri)
    run = c.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)
    assert any(k.startswith("system/system_memory_usage") for k in run.data.metrics)
    assert [f.path for f in c.list_artifacts(t.run_id, "model")] == ["model/w.txt"]


def test_run_tracker_without_psutil(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_psutil(name, *a, **k):
        if name == "psutil" or name.startswith("mlflow.system_metrics"):
            raise ImportError("No module named 'psutil'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_psutil)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = tracking.RunTracker(uri, enabled=True, experiment="e", key="nops", name="n", system_metrics=True)
    t.metric("loss", 1.0, 1)
    t.finish()
    run = tracking.client(uri).get_run(t.run_id)
    assert run.info.status == "FINISHED" and set(run.data.metrics) == {"loss"}
