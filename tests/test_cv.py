"""`sepnet cv`: a whole tiny study end to end (local executor and real SLURM), resume, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import write_tiny_study

from sepnet.core.organs import NUM_CLASSES, NUM_ORGANS
from sepnet.jobs.cli import main
from sepnet.jobs.config import load_config
from sepnet.jobs.spec import ModelSpec
from sepnet.jobs.tracking import KEY_TAG, client, resolve_uri

MODELS = ["sep-slf1-a05", "sep-slf2-a1", "unet3d"]


def run_keys(cfg_path: Path) -> Counter:
    cfg = load_config(cfg_path)
    c = client(resolve_uri(cfg))
    exp = c.get_experiment_by_name(cfg.name)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    return Counter(r.data.tags.get(KEY_TAG) for r in runs)


def expected_keys(name: str, folds=(0, 1)) -> set[str]:
    keys = {name}
    for f in folds:
        keys |= {f"{name}/fold{f}"} | {f"{name}/fold{f}/{m}" for m in [*MODELS, "ensemble"]}
    return keys


def test_dry_run_plans_without_writing(tmp_path, capsys):
    cfg = write_tiny_study(tmp_path)
    assert main(["cv", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("[todo] train/fold") == 6 and "evaluate/fold1" in out and "report" in out
    assert "6 training jobs" in out
    assert not (tmp_path / "study").exists() and not (tmp_path / "data").exists()


def test_study_end_to_end_on_the_local_executor(trained_study):
    root = trained_study.parent / "study"
    # every model and the ensemble evaluated on every test case and organ of both folds
    rows = []
    for f in (0, 1):
        with open(root / "eval" / f"fold{f}" / "metrics.csv") as fh:
            rows += list(csv.DictReader(fh))
    folds = json.loads((root / "folds.json").read_text())["folds"]
    n_test = sum(len(f["test"]) for f in folds)
    assert n_test == 4
    per_model = Counter(r["model"] for r in rows)
    assert per_model == {m: n_test * NUM_ORGANS for m in [*MODELS, "ensemble", "ensemble+pp"]}
    # the report: tables, claims, figures; parameters of each model
    report = root / "report"
    md = (report / "report.md").read_text()
    assert "## Claims of the paper on this data" in md and "ensemble" in md
    for f in ("dice_table.csv", "hd95_table.csv", "per_case.csv", "report.json", "vvc_dice.png", "error_rates.png"):
        assert (report / f).is_file(), f
    summary = json.loads((report / "report.json").read_text())
    assert {c["id"] for c in summary["claims"]} == {1, 2, 3, 4, 5, 6}
    done = json.loads((root / "models" / "fold0" / "sep-slf1-a05" / "done.json").read_text())
    assert done["iterations"] == 4 and done["params"] > 0
    # predictions and uncertainty maps of the ensemble in the original geometry
    import SimpleITK as sitk

    case = folds[0]["test"][0]
    lab = sitk.ReadImage(str(root / "eval" / "fold0" / "ensemble" / f"{case}_labels.nii.gz"))
    src = sitk.ReadImage(str(trained_study.parent / "data" / case / "data.nii.gz"))
    assert lab.GetSize() == src.GetSize() and lab.GetSpacing() == pytest.approx(src.GetSpacing())
    assert lab.GetOrigin() == pytest.approx(src.GetOrigin())
    # the study keeps its resolved config, loadable as it is
    assert load_config(root / "study.yaml").to_dict() == load_config(trained_study).to_dict()
    # one model spec per model, written by its training job
    spec = ModelSpec.read(root / "models" / "fold0" / "unet3d")
    assert (spec.kind, spec.network, spec.channels, spec.num_classes) == ("baseline", "unet3d", ("SLF1",), NUM_CLASSES)
    # MLflow: the run tree, each run exactly once
    keys = run_keys(trained_study)
    assert set(keys) == expected_keys("tiny")
    assert max(keys.values()) == 1


def test_rerun_resumes_without_duplicates(trained_study, capsys):
    root = trained_study.parent / "study"
    before = {p: p.stat().st_mtime_ns for p in root.glob("models/*/*/best.pt")}
    assert main(["cv", str(trained_study)]) == 0
    out = capsys.readouterr().out
    assert "[todo]" not in out and out.count("[done]") == 10  # preprocessing, 6 trainings, 2 evaluations, report
    assert {p: p.stat().st_mtime_ns for p in root.glob("models/*/*/best.pt")} == before
    assert max(run_keys(trained_study).values()) == 1
    # status agrees
    assert main(["status", str(root)]) == 0
    assert "10/10 done" in capsys.readouterr().out


def test_interrupted_study_resumes(tmp_path):
    cfg = write_tiny_study(tmp_path)
    root = tmp_path / "study"
    one_fold = ["--set", "folds.folds=[0]"]  # one fold keeps it short: 3 trainings, evaluation, report
    proc = subprocess.Popen([sys.executable, "-m", "sepnet.jobs.cli", "cv", str(cfg), *one_fold], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(root.glob("models/*/*/done.json")):
            assert proc.poll() is None, "cv ended before it could be interrupted"
            time.sleep(0.5)
        assert list(root.glob("models/*/*/done.json")), "no model finished in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the controller and its running jobs
        proc.wait()
    assert load_config(root / "study.yaml").folds.folds == [0]  # written before any job, overrides applied
    first = {p: p.stat().st_mtime_ns for p in root.glob("models/*/*/done.json")}
    assert 0 < len(first) < 3 and not (root / "report" / "report.json").exists()
    assert main(["cv", str(cfg), *one_fold]) == 0
    assert (root / "report" / "report.json").is_file()
    assert len(list(root.glob("models/*/*/done.json"))) == 3
    # models finished before the kill were not retrained
    assert {p: p.stat().st_mtime_ns for p in first} == first
    keys = run_keys(cfg)
    assert set(keys) == expected_keys("tiny", folds=(0,)) and max(keys.values()) == 1


@pytest.mark.slurm
def test_study_on_slurm(tmp_path, slurm):
    cfg = write_tiny_study(tmp_path, kind="slurm")
    assert main(["cv", str(cfg), "--set", "folds.folds=[0]", "--set", "baselines=[]"]) == 0
    root = tmp_path / "study"
    assert (root / "report" / "report.json").is_file()
    jobs = json.loads((root / "jobs.json").read_text())["jobs"]
    # preprocessing, 2 trainings, evaluation, report
    assert {j["executor"] for j in jobs.values()} == {"slurm"} and len(jobs) == 5
    keys = run_keys(cfg)
    assert max(keys.values()) == 1 and "tiny/fold0/ensemble" in keys


def test_bad_input_fails_before_work(tmp_path, capsys):
    cfg = write_tiny_study(tmp_path)
    text = cfg.read_text()
    # an unknown key, and a wrong type: exit 2, one line naming the key, no traceback
    cfg.write_text(text.replace("batch_size: 1,", "batch_sise: 1,"))
    assert main(["cv", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown key training.batch_sise" in err and "Traceback" not in err
    cfg.write_text(text.replace("epochs: 1,", "epochs: one,"))
    assert main(["cv", str(cfg)]) == 2
    assert "training.epochs: expected an integer" in capsys.readouterr().err
    # a dataset folder with zero readable cases
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing here")
    cfg.write_text(text.replace("  - path: data\n    format: structseg\n    phantom: {cases: 4, seed: 3, size: tiny}",
                                f"  - path: {empty}\n    format: structseg"))
    assert main(["cv", str(cfg)]) == 2
    assert str(empty) in capsys.readouterr().err
    # an output folder that cannot be written
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg.write_text(text.replace("root: study", f"root: {blocker}/study"))
    assert main(["cv", str(cfg)]) == 2
    assert "not writable" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # nothing generated before the checks
