"""Malformed-input corpus for the commands after preprocessing: ``cv`` configs, ``evaluate --pred --ref``,
``predict`` inputs and model folders. Each bad input gives one line naming it and its cause, a non-zero
exit and no traceback, and the good inputs of the same run still succeed.

- ``sepnet cv``: each entry changes one key of the tiny study (a wrong type in every section, unknown
  keys, impossible resources, a fold that would be empty, a missing dataset); exit 2, one ``error:`` line
  naming the key. The unchanged config runs (``--dry-run``) beside them.
- ``sepnet evaluate``: one folder pair holding a matching prediction and predictions whose grid differs
  from the reference (shape, spacing, origin, direction), of another dimension or out-of-range values.
- ``sepnet predict``: one input folder holding a good scan beside a 2-D image, a 4-D image, a truncated
  NIfTI and a DICOM series with a missing slice; an image far smaller than the patch (predicted on the
  padded window, with a warning naming its extent); a missing input path.
- Model folders of a copy of the trained study: a truncated ``best.pt``, and ``spec.json`` naming another
  architecture than the weights; the intact fold still predicts.

Independent truth: the inputs are written with SimpleITK, nibabel or raw bytes, never through sepnet's
readers, and the expected messages are the causes put in.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from conftest import TINY_STUDY

from sepnet.data.phantom import make_case
from sepnet.data.readers import write_case
from sepnet.jobs.cli import main


def _one_error(err: str, command: str) -> str:
    """The single error line of a failed command (exit 2)."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"sepnet {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- sepnet cv configs

def _study(**_) -> dict:
    return yaml.safe_load(TINY_STUDY.format(kind="local"))


def _set(path: str, value):
    """A mutation setting the dotted key ``path`` (list items as ``members.0``) to ``value``."""

    def apply(d: dict) -> None:
        *parents, last = path.split(".")
        node = d
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return apply


def _drop(path: str):
    def apply(d: dict) -> None:
        *parents, last = path.split(".")
        node = d
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        del node[last]

    return apply


# (id, mutation, text the error line must contain)
CV_CASES = [
    # a wrong type in every section
    ("type-name", _set("name", 7), "name: expected a string"),
    ("type-root", _set("root", ["a", "b"]), "root: expected a string"),
    ("type-datasets", _set("datasets", {"path": "data"}), "datasets: expected a list"),
    ("type-dataset-path", _set("datasets.0.path", 3), "datasets[0].path: expected a string"),
    ("type-phantom", _set("datasets.0.phantom", "four"), "datasets[0].phantom: expected a mapping"),
    ("type-phantom-cases", _set("datasets.0.phantom.cases", "4"), "datasets[0].phantom.cases: expected an integer"),
    ("type-preprocess-transforms", _set("preprocess.transforms", "SLF1"), "preprocess.transforms: expected a list"),
    ("type-preprocess-crop", _set("preprocess.crop", "big"), "preprocess.crop: expected a list"),
    ("type-preprocess-workers", _set("preprocess.workers", 1.5), "preprocess.workers: expected an integer"),
    ("type-folds-k", _set("folds.k", 2.5), "folds.k: expected an integer"),
    ("type-folds-val", _set("folds.val_fraction", "half"), "folds.val_fraction: expected a number"),
    ("type-members", _set("members", {"name": "m"}), "members: expected a list"),
    ("type-member-alpha", _set("members.0.alpha", "high"), "members[0].alpha: expected a number"),
    ("type-member-axis", _set("members.0.separable_axis", "w"), "members[0].separable_axis: 'w' is not one of"),
    ("type-baseline-base", _set("baselines.0.base", "wide"), "baselines[0].base: expected an integer"),
    ("type-training-batch", _set("training.batch_size", 1.5), "training.batch_size: expected an integer"),
    ("type-training-amp", _set("training.amp", 1), "training.amp: expected true/false"),
    ("type-training-patch", _set("training.patch", [16, "32", 32]), "training.patch[1]: expected an integer"),
    ("type-inference-overlap", _set("inference.overlap", "much"), "inference.overlap: expected a number"),
    ("type-inference-tta", _set("inference.tta", "maybe"), "inference.tta: expected true/false or a list, got 'maybe'"),
    ("type-ensemble-weighting", _set("ensemble.weighting", "best"), "ensemble.weighting: 'best' is not one of"),
    ("type-ensemble-weights", _set("ensemble.rank_weights", "5,4"), "ensemble.rank_weights: expected a list"),
    ("type-evaluation", _set("evaluation.percentile", "95th"), "evaluation.percentile: expected a number"),
    ("type-executor-time", _set("executor.time_min", "1h"), "executor.time_min: expected an integer"),
    ("type-executor-extra", _set("executor.extra", ["a"]), "executor.extra: expected a mapping"),
    ("type-mlflow", _set("mlflow.tracking_uri", 5), "mlflow.tracking_uri: expected a string"),
    ("type-section", _set("training", [1, 2]), "training: expected a mapping"),
    # unknown and missing keys
    ("unknown-top", _set("trainig", {"epochs": 1}), "unknown key trainig"),
    ("unknown-section", _set("folds.kk", 3), "unknown key folds.kk"),
    ("unknown-member", _set("members.0.netwrok", "sepnet"), "unknown key members[0].netwrok"),
    ("unknown-executor", _set("executor.gpus", 1), "unknown key executor.gpus"),
    ("missing-name", _drop("name"), "missing required key name"),
    ("missing-member-name", _drop("members.1.name"), "missing required key members[1].name"),
    # names, values and resources no run can satisfy
    ("unknown-network", _set("members.0.network", "resnet"), "members[0].network: unknown network 'resnet'"),
    ("gpus-local", _set("executor.gpus_per_node", 64), "executor.gpus_per_node: 64 GPUs requested"),
    ("negative-cpus", _set("executor.cpus_per_task", -2), "executor.cpus_per_task: must be >= 1, got -2"),
    ("negative-gpus", _set("executor.gpus_per_node", -1), "executor.gpus_per_node: must be >= 0"),
    ("nodes-local", _set("executor.nodes", 2), "executor.nodes: the local executor runs on one node"),
    ("zero-time", _set("executor.time_min", 0), "executor.time_min: must be >= 1"),
    ("bad-kind", _set("executor.kind", "k8s"), "executor.kind: unknown kind 'k8s'"),
    ("fold-out-of-range", _set("folds.folds", [3]), "folds.folds: fold 3 does not exist"),
    ("one-fold", _set("folds.k", 1), "folds.k: need at least 2 folds"),
    ("no-datasets", _set("datasets", []), "datasets: at least one dataset is needed"),
]


@pytest.fixture
def study_dir(tmp_path) -> Path:
    d = tmp_path / "cfg"
    d.mkdir()
    return d


def _write_cfg(folder: Path, data: dict, name: str = "study.yaml") -> Path:
    p = folder / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


@pytest.mark.parametrize("mutate, expected", [c[1:] for c in CV_CASES], ids=[c[0] for c in CV_CASES])
def test_cv_config_corpus(study_dir, capsys, mutate, expected):
    data = _study()
    mutate(data)
    cfg = _write_cfg(study_dir, data)
    assert main(["cv", str(cfg)]) == 2
    line = _one_error(capsys.readouterr().err, "cv")
    assert str(cfg) in line and expected in line, line
    assert not (study_dir / "study").exists() and not (study_dir / "data").exists()  # nothing done before the check
    # the unchanged config of the same folder still plans
    good = _write_cfg(study_dir, _study(), "good.yaml")
    assert main(["cv", str(good), "--dry-run"]) == 0
    assert "[todo] report" in capsys.readouterr().out


def test_cv_missing_dataset_and_unreadable_configs(study_dir, capsys):
    data = _study()
    data["datasets"] = [{"path": "nowhere", "format": "structseg"}]
    cfg = _write_cfg(study_dir, data)
    assert main(["cv", str(cfg)]) == 2
    line = _one_error(capsys.readouterr().err, "cv")
    assert str(study_dir / "nowhere") in line and "dataset folder does not exist" in line
    assert main(["cv", str(study_dir / "none.yaml")]) == 2
    assert "config file not found" in _one_error(capsys.readouterr().err, "cv")
    bad = study_dir / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    assert main(["cv", str(bad)]) == 2
    assert "not valid YAML" in _one_error(capsys.readouterr().err, "cv")
    scalar = study_dir / "scalar.yaml"
    scalar.write_text("just a string\n")
    assert main(["cv", str(scalar)]) == 2
    assert "expected a mapping at the top level" in _one_error(capsys.readouterr().err, "cv")


def test_cv_fold_that_would_be_empty(study_dir, capsys):
    """k = 5 folds of 4 cases: fold 4 would test on nothing. Refused by the plan (dry run) and the real run."""
    data = _study()
    data["folds"]["k"] = 5
    cfg = _write_cfg(study_dir, data)
    assert main(["cv", str(cfg), "--dry-run"]) == 2
    assert "4 cases cannot make 5 folds" in _one_error(capsys.readouterr().err, "cv")
    assert main(["cv", str(cfg)]) == 2
    assert "4 cases cannot make 5 folds" in _one_error(capsys.readouterr().err, "cv")
    assert not list((study_dir / "study").glob("models/*"))  # nothing trained
    # the same study with 4 folds plans
    assert main(["cv", str(cfg), "--dry-run", "--set", "folds.k=4"]) == 0


def test_cv_bad_config_in_a_real_process_prints_no_traceback(study_dir):
    data = _study()
    data["training"]["epochs"] = "ten"
    cfg = _write_cfg(study_dir, data)
    r = subprocess.run([sys.executable, "-m", "sepnet.jobs.cli", "cv", str(cfg)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"sepnet cv: error: {cfg}: training.epochs: expected an integer, got 'ten'"]


# --------------------------------------------------------------------------- sepnet evaluate --pred --ref

def _label_image(arr: np.ndarray, *, spacing=(1.0, 1.0, 2.5), origin=(0.0, 0.0, 0.0),
                 direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(float(v) for v in direction))
    return img


def test_evaluate_mismatched_grids_beside_a_matching_pair(tmp_path, capsys):
    ref_arr = np.zeros((8, 24, 24), np.uint8)
    ref_arr[2:6, 6:14, 6:14] = 1  # brain stem
    ref_arr[3:5, 15:20, 15:20] = 16  # parotid
    pred_arr = ref_arr.copy()
    pred_arr[2:6, 6:14, 6:10] = 0  # half the brain stem missed: Dice 2*128/(256+128) = 2/3
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    bad = {
        "shape": _label_image(pred_arr[:7]),
        "spacing": _label_image(pred_arr, spacing=(1.0, 1.0, 3.0)),
        "origin": _label_image(pred_arr, origin=(0.0, 4.0, 0.0)),
        "direction": _label_image(pred_arr, direction=(0, 1, 0, -1, 0, 0, 0, 0, 1)),
    }
    for name in ["good", *bad]:
        sitk.WriteImage(_label_image(ref_arr), str(ref_dir / f"{name}.nii.gz"))
        sitk.WriteImage(bad.get(name, _label_image(pred_arr)), str(pred_dir / f"{name}.nii.gz"))
    # not a grid mismatch but unreadable as labels: 2-D, values above 22
    sitk.WriteImage(_label_image(ref_arr), str(ref_dir / "flat.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(pred_arr[3]), str(pred_dir / "flat.nii.gz"))
    sitk.WriteImage(_label_image(ref_arr), str(ref_dir / "values.nii.gz"))
    sitk.WriteImage(_label_image(np.where(pred_arr > 0, 40, 0).astype(np.uint8)), str(pred_dir / "values.nii.gz"))
    out = tmp_path / "metrics.csv"
    assert main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "-o", str(out)]) == 1
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    skipped = [ln for ln in cap.out.splitlines() if ln.startswith("skipped:")]
    assert len(skipped) == 6, cap.out
    for name in bad:
        line = next(ln for ln in skipped if f"{name}.nii.gz:" in ln)
        assert "grid differs from" in line and str(ref_dir / f"{name}.nii.gz") in line
    assert any("flat.nii.gz: expected a 3-D label map, got 2-D" in ln for ln in skipped)
    assert any("values.nii.gz: label values must be in 0..22, found 0..40" in ln for ln in skipped)
    # the matching pair was evaluated: one case, brain stem Dice 2/3, parotid 1
    assert "over 1 case(s)" in cap.out
    import csv

    rows = {int(r["organ"]): r for r in csv.DictReader(out.open())}
    assert float(rows[1]["dice"]) == pytest.approx(2 / 3)
    assert float(rows[16]["dice"]) == pytest.approx(1.0)


# --------------------------------------------------------------------------- sepnet predict inputs

def _nifti(arr: np.ndarray, path: Path, spacing=(3.8, 3.8, 4.0)) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing[: arr.ndim])
    sitk.WriteImage(img, str(path))


def _predict_inputs(folder: Path) -> dict[str, str]:
    """A folder of inputs: one good 16-slice scan and bad ones; returns bad name -> expected cause."""
    folder.mkdir(parents=True)
    image = make_case(seed=[99, 0], size="tiny", case_id="good").image
    _nifti(image[14:30], folder / "good.nii.gz")
    _nifti(image[8], folder / "flat.nii.gz")  # 2-D
    vec = np.stack([image[14:30]] * 2, axis=-1).transpose(2, 1, 0, 3)  # (x, y, z, 2): a 4-D NIfTI
    nib.save(nib.Nifti1Image(vec.astype(np.int16), np.diag([3.8, 3.8, 4.0, 1.0])), str(folder / "vec.nii.gz"))
    (folder / "truncated.nii.gz").write_bytes((folder / "good.nii.gz").read_bytes()[:500])
    # a DICOM series with a missing slice (written by write_case, one file deleted)
    write_case(make_case(seed=[97, 0], size="tiny", case_id="dcm"), folder / "dcm", format="dicom")
    shutil.move(folder / "dcm" / "dcm" / "ct", folder / "gap")
    shutil.rmtree(folder / "dcm")
    slices = sorted((folder / "gap").iterdir())
    slices[len(slices) // 2].unlink()
    (folder / "gone.nii.gz").symlink_to(folder / "deleted.nii.gz")  # a broken link is an input that fails
    return {
        "gone": "gone.nii.gz: broken symbolic link",
        "flat": "flat.nii.gz: 2-D image",
        "vec": "vec.nii.gz: 4-D image",
        "truncated": "truncated.nii.gz",
        "gap": "missing slices",
    }


def _study_copy(trained_study: Path, dest: Path) -> Path:
    """The parts of the trained study that predict reads (models, store, resolved config), copied."""
    src = trained_study.parent / "study"
    dest.mkdir()
    for part in ("models", "store"):
        shutil.copytree(src / part, dest / part)
    shutil.copy(src / "study.yaml", dest / "study.yaml")
    return dest


def test_predict_bad_inputs_beside_a_good_one(trained_study, tmp_path, capsys):
    study = trained_study.parent / "study"
    bad = _predict_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(out), "--study", str(study), "--fold", "1"]) == 1
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    errors = [ln for ln in cap.err.splitlines() if ": error: " in ln]
    assert len(errors) == len(bad), cap.err
    for name, cause in bad.items():
        line = next(ln for ln in errors if ln.startswith(f"{name}: error: "))
        assert cause in line, line
        assert not (out / name / "labels.nii.gz").exists()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "good" / "labels.nii.gz")))
    assert labels.shape == (16, 64, 64) and labels.max() <= 22
    assert json.loads((out / "good" / "summary.json").read_text())["n_members"] == 2


def test_predict_image_far_smaller_than_the_patch_is_named_in_a_warning(trained_study, tmp_path, capsys):
    """A 3 x 6 x 6 voxel scan (the patch is 16 x 64 x 64): predicted on the padded window, with a warning
    that its extent is far from the training scans'."""
    study = trained_study.parent / "study"
    (tmp_path / "in").mkdir()
    image = make_case(seed=[99, 0], size="tiny", case_id="small").image
    _nifti(image[20:23, 28:34, 28:34], tmp_path / "in" / "small.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", "-i", str(tmp_path / "in" / "small.nii.gz"), "-o", str(out), "--study", str(study),
                 "--fold", "1"]) == 0
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    extent = r"\n  warning: extent \(z, y, x\) \[12\.0, 2\d\.\d, 2\d\.\d\] mm is far from the training extents"
    assert re.search(r"small: .*(\n  warning: .*)*" + extent, cap.out), cap.out
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out / "small" / "labels.nii.gz"))).shape == (3, 6, 6)
    assert json.loads((out / "small" / "summary.json").read_text())["warnings"]


def test_predict_missing_input(trained_study, tmp_path, capsys):
    study = trained_study.parent / "study"
    missing = tmp_path / "scan.nii.gz"
    assert main(["predict", "-i", str(missing), "-o", str(tmp_path / "out"), "--study", str(study)]) == 2
    line = _one_error(capsys.readouterr().err, "predict")
    assert f"{missing}: input does not exist" in line


# --------------------------------------------------------------------------- model folders

def test_model_folders_truncated_checkpoint_and_other_architecture(trained_study, tmp_path, capsys):
    from sepnet.core.errors import DataError
    from sepnet.jobs.models import load_trained

    study = _study_copy(trained_study, tmp_path / "study")
    scan = tmp_path / "scan.nii.gz"
    _nifti(make_case(seed=[99, 0], size="tiny", case_id="s").image[14:30], scan)
    fold0 = study / "models" / "fold0"
    truncated = fold0 / "sep-slf1-a05" / "best.pt"
    whole = truncated.read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    spec_file = fold0 / "sep-slf2-a1" / "spec.json"
    spec = json.loads(spec_file.read_text())
    assert spec["network"] == "sepnet"
    spec_file.write_text(json.dumps({**spec, "network": "unet3d"}))  # sepnet weights, spec of a 3D U-Net

    with pytest.raises(DataError, match=r"best\.pt: checkpoint is damaged or truncated"):
        load_trained(fold0 / "sep-slf1-a05")
    with pytest.raises(DataError, match=r"best\.pt: checkpoint does not fit the network"):
        load_trained(fold0 / "sep-slf2-a1")
    for fold in ("0", "all"):
        assert main(["predict", "-i", str(scan), "-o", str(tmp_path / "out"), "--study", str(study),
                     "--fold", fold]) == 2
        line = _one_error(capsys.readouterr().err, "predict")
        assert f"{truncated}: checkpoint is damaged or truncated" in line, line
    truncated.write_bytes(whole)
    assert main(["predict", "-i", str(scan), "-o", str(tmp_path / "out"), "--study", str(study), "--fold", "0"]) == 2
    line = _one_error(capsys.readouterr().err, "predict")
    assert f"{fold0 / 'sep-slf2-a1' / 'best.pt'}: checkpoint does not fit the network" in line, line
    # the intact fold of the same study still predicts
    assert main(["predict", "-i", str(scan), "-o", str(tmp_path / "out"), "--study", str(study), "--fold", "1"]) == 0
    assert (tmp_path / "out" / "scan" / "labels.nii.gz").is_file()
