"""Parity of `sepnet predict` with the evaluation job: a test case's original file, predicted by the
study's ensemble of that fold, gives the labels the evaluation job fused for it (identical, in the
original geometry, both after the fold's keep-largest-component postprocessing) and its vote-entropy
map (within float tolerance); with and without resampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_tiny_study

from sepnet.jobs.cli import main


def _read(path: Path) -> tuple[np.ndarray, sitk.Image]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img


def _check_parity(study: Path, dataset: Path, out: Path, *, fold: int = 0) -> dict:
    case = json.loads((study / "folds.json").read_text())["folds"][fold]["test"][0]
    assert main(["predict", "-i", str(dataset / case), "-o", str(out), "--study", str(study),
                 "--fold", str(fold)]) == 0
    ens_dir = study / "eval" / f"fold{fold}" / "ensemble"
    ref_labels, ref_img = _read(ens_dir / f"{case}_labels.nii.gz")
    ref_entropy, _ = _read(ens_dir / f"{case}_entropy.nii.gz")
    labels, img = _read(out / case / "labels.nii.gz")
    entropy, _ = _read(out / case / "uncertainty.nii.gz")
    # the original file's geometry, as the evaluation wrote it
    assert img.GetSize() == ref_img.GetSize() == sitk.ReadImage(str(dataset / case / "data.nii.gz")).GetSize()
    assert img.GetSpacing() == pytest.approx(ref_img.GetSpacing())
    # a comparison that can fail: the members disagree somewhere and more than one label is predicted
    assert ref_entropy.max() > 0 and len(np.unique(ref_labels)) > 1
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(entropy, ref_entropy, atol=1e-5)
    # both sides applied the fold's postprocessing (the evaluation saves its postprocessed labels)
    summary = json.loads((out / case / "summary.json").read_text())
    decided = json.loads((study / "eval" / f"fold{fold}" / "postprocess.json").read_text())
    assert summary["postprocessing"]["organ_ids"] == decided["organs"]
    return summary


def test_predict_equals_evaluation_without_resampling(trained_study, tmp_path):
    summary = _check_parity(trained_study.parent / "study", trained_study.parent / "data", tmp_path / "out")
    assert summary["spacing"]["resampled"] is False and not summary["spacing"]["plan_resamples"]


def test_predict_equals_evaluation_with_a_resampling_plan(tmp_path):
    cfg = write_tiny_study(tmp_path / "rs")
    # one fold, the two members, a plan resampling every case to coarser voxels on all three axes; rank
    # weights 3, 1 (two members' default is 1, 1), so predict must also weight the members as evaluation did
    assert main(["cv", str(cfg), "--set", "preprocess.spacing=[5.0, 4.5, 4.5]", "--set", "folds.folds=[0]",
                 "--set", "baselines=[]", "--set", "ensemble.rank_weights=[3.0, 1.0]"]) == 0
    study = tmp_path / "rs" / "study"
    assert json.loads((study / "store" / "plan.json").read_text())["spacing_zyx"] == [5.0, 4.5, 4.5]
    summary = _check_parity(study, tmp_path / "rs" / "data", tmp_path / "out")
    assert summary["spacing"]["plan_resamples"] and summary["spacing"]["resampled"]
    assert summary["spacing"]["model_zyx"] == [5.0, 4.5, 4.5]
