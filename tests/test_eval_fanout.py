"""Evaluation fan-out (``evaluation.fan_out``): one infer job per fold x model saving its outputs, one fuse
job per fold consuming them. Checked against the single-job evaluation of the same trained models (the
session's ``trained_study``, evaluated without fan-out): with float32 outputs every file is equal, with the
float16 default only near-tie voxels may differ; plus resumption of a killed infer job, the dry run's
graph, the SLURM grouping (one array per fold's infer jobs) and the fuse step's memory contract."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_study

from sepnet.core.errors import ConfigError, DataError
from sepnet.jobs import evaluate
from sepnet.jobs.cli import main
from sepnet.jobs.config import load_config
from sepnet.jobs.evaluate import EvalTask, InferTask, make_eval_spec, outputs_dir
from sepnet.jobs.status import study_status
from sepnet.jobs.study import Layout

MODELS = ("sep-slf1-a05", "sep-slf2-a1", "unet3d")  # the tiny study's 2 members + 1 baseline
EVAL_FILES = ("metrics.csv", "postprocess.json", "vvc.csv", "uncertainty.json")


def _copy(trained_study: Path, dest: Path, *, extra: str = "") -> Path:
    """The trained study without its evaluation, under ``dest``; its YAML reads the original data folder,
    so the copied store is up to date (no preprocessing) and only the evaluation is left to do."""
    src = trained_study.parent
    cfg = write_tiny_study(dest, extra=extra)
    cfg.write_text(cfg.read_text().replace("path: data", f"path: {src / 'data'}"))
    shutil.copytree(src / "study", dest / "study", ignore=shutil.ignore_patterns(
        "eval", "logs", "mlruns", "mlartifacts", "mlflow.db", "report", "jobs.json"))
    return cfg


def _spec(cfg: Path, **evaluation):
    c = load_config(cfg)
    folds = json.loads(Layout(Path(c.root)).folds_file.read_text())["folds"]
    spec = make_eval_spec(c, folds, 0)
    return dataclasses.replace(spec, mlflow_uri=None, fold_run_key=None, save_maps=False,
                               evaluation=dataclasses.replace(spec.evaluation, fan_out=True, **evaluation))


def _rows(eval_dir: Path) -> list[dict]:
    with open(eval_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def inferred(trained_study, tmp_path_factory):
    """A copy of the trained study whose fold 0 infer jobs ran with float32 outputs (kept), not yet fused."""
    cfg = _copy(trained_study, tmp_path_factory.mktemp("inferred"))
    spec = _spec(cfg, keep_outputs=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "OUTPUT_DTYPE", "float32")
        for model in MODELS:
            InferTask(spec, model=model)()
    return cfg


def _fresh_copy(inferred: Path, dest: Path) -> Path:
    shutil.copytree(inferred.parent, dest)
    return dest / "study.yaml"


def test_fused_float32_outputs_give_the_single_job_results_exactly(inferred, trained_study, tmp_path):
    cfg = _fresh_copy(inferred, tmp_path / "s")
    done = EvalTask(_spec(cfg))()
    ours, single = tmp_path / "s" / "study" / "eval" / "fold0", trained_study.parent / "study" / "eval" / "fold0"
    for name in EVAL_FILES:  # the same fusion code on the same probabilities: the same bytes
        assert (ours / name).read_text() == (single / name).read_text(), name
    assert done["summary"] == json.loads((single / "done.json").read_text())["summary"]
    assert not (ours / "outputs").exists()  # removed after done.json (keep_outputs false)


def test_the_fuse_step_holds_one_members_probabilities_at_a_time(inferred, tmp_path, monkeypatch):
    cfg = _fresh_copy(inferred, tmp_path / "s")
    real = evaluate.SavedOutputs.probabilities
    live: list[weakref.ref] = []
    loads = []

    def counted(self, model):
        alive = [r for r in live if r() is not None]
        assert not alive, f"{len(alive)} member probabilities still alive when {model.name}'s are loaded"
        probs = real(self, model)
        assert probs.dtype == np.float32 and probs.shape[0] == model.spec.num_classes  # float32: this fixture
        live.append(weakref.ref(probs))
        loads.append((self.case, model.name))
        return probs

    monkeypatch.setattr(evaluate.SavedOutputs, "probabilities", counted)
    spec = _spec(cfg, keep_outputs=True)
    EvalTask(spec)()
    cases = [*spec.val_cases, *spec.test_cases]
    assert loads == [(c, m) for c in cases for m in spec.members]  # every member once per case, in order
    assert (tmp_path / "s" / "study" / "eval" / "fold0" / "outputs").is_dir()  # kept when asked


class Killed(BaseException):
    """What a SIGKILL looks like to the code after it: nothing runs on (not even ``except Exception``)."""


def test_a_killed_infer_job_resumes_with_the_cases_not_yet_saved(inferred, tmp_path, monkeypatch, capsys):
    cfg = _fresh_copy(inferred, tmp_path / "s")
    spec = _spec(cfg)
    folder = outputs_dir(Path(spec.study_root) / "eval" / "fold0", "sep-slf1-a05")
    shutil.rmtree(folder)
    real, saved = evaluate.save_output, []

    def killed_after_one(path, values, *, attrs):
        if saved:
            raise Killed  # the job is killed while computing its second case
        saved.append(path)
        return real(path, values, attrs=attrs)

    monkeypatch.setattr(evaluate, "save_output", killed_after_one)
    with pytest.raises(Killed):
        InferTask(spec, model="sep-slf1-a05")()
    cases = [*spec.val_cases, *spec.test_cases]
    assert sorted(p.name for p in folder.iterdir()) == [f"{cases[0]}.zarr"]  # no done.json, no temporaries
    first = folder / f"{cases[0]}.zarr"
    stamp = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    (folder / f".{cases[1]}.zarr.tmp-99999").mkdir()  # a temporary a killed write left behind
    monkeypatch.setattr(evaluate, "save_output", real)
    capsys.readouterr()
    done = InferTask(spec, model="sep-slf1-a05")()
    out = capsys.readouterr().out
    assert f"infer fold0/sep-slf1-a05 case {cases[0]}: already saved" in out
    for case in cases[1:]:
        assert re.search(rf"^infer fold0/sep-slf1-a05 case {case}: [\d.]+ s, probabilities [\d.]+ MB$", out, re.M)
    assert done["written"] == len(cases) - 1 and done["cases"] == cases and done["dtype"] == "float16"
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == stamp  # not rewritten
    assert sorted(p.name for p in folder.iterdir()) == sorted(["done.json", *(f"{c}.zarr" for c in cases)])
    # a saved member output: (K, Z, Y, X) float16 on the stored grid, zstd, chunks over all K
    import zarr

    arr = zarr.open_array(folder / f"{cases[1]}.zarr", mode="r")
    assert arr.dtype == np.float16 and arr.shape[0] == 23 and arr.chunks[0] == 23
    assert arr.attrs["kind"] == "probabilities" and arr.attrs["case"] == cases[1]
    # the fuse step refuses outputs of another training of a model
    done_file = Path(spec.study_root) / "models" / "fold0" / "unet3d" / "done.json"
    done_file.write_text(done_file.read_text().replace("{", '{"retrained": 1, ', 1))
    with pytest.raises(DataError, match="saved from another training of unet3d"):
        EvalTask(spec)()


def test_fan_out_study_equals_the_single_job_evaluation(trained_study, tmp_path, capsys):
    """Through `sepnet cv` with the local executor and the float16 default: only the evaluation is left,
    as infer jobs (one per model) and a fuse job; `sepnet status` shows them done with their lines."""
    cfg = _copy(trained_study, tmp_path)
    assert main(["cv", str(cfg), "--set", "folds.folds=[0]", "--set", "evaluation.fan_out=true"]) == 0
    root = tmp_path / "study"
    jobs = json.loads((root / "jobs.json").read_text())["jobs"]
    assert sorted(jobs) == ["fuse/fold0", *(f"infer/fold0/{m}" for m in MODELS), "report"]
    rows = {r[0]: r for r in study_status(root)}
    for m in MODELS:
        _, state, _, line = rows[f"infer/fold0/{m}"]
        # the job's last line: its case count, seconds and peak RSS
        assert state == "done" and re.match(rf"infer fold0/{m}: [23] case\(s\) in \d+ s, peak RSS [\d.]+ GiB$", line)
    assert rows["fuse/fold0"][1] == "done"
    assert re.match(r"evaluate fold0: 2 test case\(s\) in \d+ s, peak RSS", rows["fuse/fold0"][3])
    assert [r[0] for r in study_status(root)][-5:] == [*(f"infer/fold0/{m}" for m in MODELS), "fuse/fold0", "report"]
    ours, single = root / "eval" / "fold0", trained_study.parent / "study" / "eval" / "fold0"
    assert not (ours / "outputs").exists() and (root / "report" / "report.json").is_file()
    a, b = _rows(single), _rows(ours)
    assert [(r["model"], r["case"], r["organ"]) for r in a] == [(r["model"], r["case"], r["organ"]) for r in b]
    # the baseline's saved labels are exact; a member's float16 probabilities move near-tie voxels only.
    # These 4-iteration models are the worst case: near-uniform probabilities whose top two classes lie
    # closer than float16's spacing (2^-11 near 0.05) in ~0.1 % of the voxels (trained models: ~2e-6);
    # volumes within 2 %, Dice within 0.01 (measured: 0.4 % and < 1e-4 here)
    for x, y in zip(a, b):
        if x["model"] == "unet3d":
            assert x == y
        else:
            assert float(y["vol_pred_cm3"]) == pytest.approx(float(x["vol_pred_cm3"]), rel=0.02, abs=0.05)
            assert float(y["dice"]) == pytest.approx(float(x["dice"]), abs=0.01, nan_ok=True)
    import SimpleITK as sitk

    for f in sorted((single / "ensemble").glob("*_labels.nii.gz")):  # the final labels, as predict gives them
        x, y = (sitk.GetArrayFromImage(sitk.ReadImage(str(d / "ensemble" / f.name))) for d in (single, ours))
        assert (x != y).mean() < 0.005, f.name


def test_dry_run_lists_infer_and_fuse_jobs_with_the_evaluate_stages_resources(tmp_path, capsys):
    cfg = write_tiny_study(tmp_path, extra="evaluation: {fan_out: true}\n")
    text = cfg.read_text().replace("executor: {kind: local, array_parallelism: 2, time_min: 20}",
                                   "executor: {kind: local, time_min: 20, stages: {evaluate: {cpus_per_task: 2, "
                                   "time_min: 30}}}")
    cfg.write_text(text)
    assert main(["cv", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for f in (0, 1):
        for m in MODELS:
            assert re.search(rf"^  \[todo\] infer/fold{f}/{m}  \(after 3 trainings\)$", out, re.M)
        assert re.search(rf"^  \[todo\] fuse/fold{f}  \(after 3 infer jobs\)$", out, re.M)
    assert "evaluate/fold" not in out and "report  (after 2 evaluations)" in out
    row = re.search(r"^evaluate\s+(\d+)\s.*?([\d.]+)\s+([\d.]+)$", out, re.M)
    assert (int(row[1]), float(row[2])) == (8, 8 * 2 * 30 / 60)  # 6 infer + 2 fuse jobs, 2 CPUs, 30 min each


def test_infer_jobs_of_a_fold_are_one_slurm_array_after_its_trainings(tmp_path, monkeypatch):
    from sepnet.hpc import executors
    from sepnet.hpc.scheduling import GraphJob, submit_graph_slurm
    from sepnet.jobs.cv import plan_jobs

    cfg = load_config(write_tiny_study(tmp_path, extra="evaluation: {fan_out: true}\n"))
    folds = [{"train": ["a"], "val": ["b"], "test": ["c"]}] * 2
    planned = plan_jobs(cfg, folds, [0, 1])
    stage = {k: object() for k in ("preprocess", "train", "evaluate", "report")}  # one executor per stage
    graph = [GraphJob(j.name, j.name, stage[j.kind], after=j.after) for j in planned]
    arrays = []

    class Job:
        def __init__(self, name):
            self.job_id = name

    def submit(executor, tasks, *, after=()):
        arrays.append((list(tasks), sorted(j.job_id for j in after)))
        return [Job(t) for t in tasks]

    monkeypatch.setattr(executors, "submit_tasks", submit)
    submit_graph_slurm(graph)
    by_task = {t: (tuple(ts), deps) for ts, deps in arrays for t in ts}
    for f in (0, 1):
        infer, deps = by_task[f"infer/fold{f}/unet3d"]
        assert infer == tuple(f"infer/fold{f}/{m}" for m in MODELS)  # one array
        assert deps == sorted(f"train/fold{f}/{m}" for m in MODELS)  # afterok on the fold's trainings
        assert by_task[f"fuse/fold{f}"] == ((f"fuse/fold{f}",), sorted(infer))
    assert by_task["report"][1] == ["fuse/fold0", "fuse/fold1"]


@pytest.mark.parametrize("value", ["maybe", "1"])
def test_fan_out_is_checked_at_load(tmp_path, value):
    cfg = write_tiny_study(tmp_path, extra=f"evaluation: {{fan_out: {value}}}\n")
    with pytest.raises(ConfigError, match=r"evaluation\.fan_out: expected true/false"):
        load_config(cfg)
    assert load_config(write_tiny_study(tmp_path / "d")).evaluation.fan_out is False  # default: one job per fold
