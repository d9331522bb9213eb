"""The evaluation job's wiring: postprocessing decided on the fold's validation cases and applied to the
ensemble (``ensemble+pp`` rows), per-case uncertainty counts, per-case and summary log lines (with the
missed organs), cases read through the store's checksums, and organ-subset models evaluated on their
own organs. Checked against recomputations from the original case files (``sepnet.jobs.predict``,
``sepnet.data.readers``) and hand-computed values."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from sepnet.core.errors import DataError
from sepnet.core.networks import build
from sepnet.core.organs import COMMON7, ORGAN_IDS
from sepnet.core.postprocess import PostprocessDecision, choose_postprocessing
from sepnet.data.readers import read_case
from sepnet.evaluation.uncertainty import counts_from_json, error_counts
from sepnet.hpc.checkpoint import save_atomic
from sepnet.jobs.cli import main
from sepnet.jobs.config import load_config
from sepnet.jobs.evaluate import EvalTask, make_eval_spec
from sepnet.jobs.models import subset_annotated, subset_reference, to_organ_ids
from sepnet.jobs.predict import combine_postprocessing, load_study, predict_case
from sepnet.jobs.spec import ModelSpec
from sepnet.jobs.study import Layout


def _folds(study: Path) -> list[dict]:
    return json.loads((study / "folds.json").read_text())["folds"]


def _metrics(study: Path, fold: int = 0) -> list[dict]:
    with open(study / "eval" / f"fold{fold}" / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _raw(study: Path, case_dir: Path, *, fold: int = 0):
    """The fold's ensemble on an original case file without postprocessing, and the case's reference."""
    ens = dataclasses.replace(load_study(study, fold=str(fold)), postprocess=PostprocessDecision(()))
    case = read_case(case_dir)
    with torch.no_grad():
        pred = predict_case(case.image, case.geometry, ens, device=torch.device("cpu"), case_id=case.case_id)
    return pred, case


def test_postprocessing_is_decided_on_the_validation_cases(trained_study):
    study, data = trained_study.parent / "study", trained_study.parent / "data"
    fold = _folds(study)[0]
    assert fold["val"]
    written = json.loads((study / "eval" / "fold0" / "postprocess.json").read_text())
    assert written["val_cases"] == fold["val"]
    preds, refs, annotated = [], [], []
    for case_id in fold["val"]:
        pred, case = _raw(study, data / case_id)
        preds.append(pred.labels)
        refs.append(case.label)
        annotated.append(case.annotated)
    # the same rule recomputed from the original files (an independent path to the labels)
    expected = choose_postprocessing(preds, refs, organs=ORGAN_IDS, annotated=annotated)
    got = PostprocessDecision.from_dict(written)
    assert got.organs == expected.organs
    assert got.dice_before == pytest.approx(expected.dice_before)
    assert got.dice_after == pytest.approx(expected.dice_after)


def test_ensemble_pp_rows_and_saved_labels_are_the_postprocessed_ensemble(trained_study):
    study = trained_study.parent / "study"
    decision = PostprocessDecision.from_dict(json.loads((study / "eval" / "fold0" / "postprocess.json").read_text()))
    rows = _metrics(study)
    test_cases = _folds(study)[0]["test"]
    by = {(r["model"], r["case"], int(r["organ"])): r for r in rows}
    for case_id in test_cases:
        for organ in ORGAN_IDS:
            plain, pp = by[("ensemble", case_id, organ)], by[("ensemble+pp", case_id, organ)]
            if organ not in decision.organs:  # untouched organs score the same
                assert pp == {**plain, "model": "ensemble+pp"}
            else:  # postprocessing only removes voxels
                assert float(pp["vol_pred_cm3"]) <= float(plain["vol_pred_cm3"]) + 1e-9
        # the saved labels (what predict gives) have one 26-connected component per chosen organ
        import SimpleITK as sitk

        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(study / "eval" / "fold0" / "ensemble" /
                                                           f"{case_id}_labels.nii.gz")))
        for organ in decision.organs:
            _, n = ndimage.label(labels == organ, structure=np.ones((3, 3, 3)))
            assert n <= 1, (case_id, organ)


def test_uncertainty_counts_per_test_case(trained_study):
    study, data = trained_study.parent / "study", trained_study.parent / "data"
    pooled, cases = counts_from_json(json.loads((study / "eval" / "fold0" / "uncertainty.json").read_text()))
    test_cases = _folds(study)[0]["test"]
    assert sorted(cases) == sorted(test_cases)
    total = None
    for c in cases.values():
        total = c if total is None else total + c
    for r in ("whole", "background", "organs"):
        np.testing.assert_array_equal(pooled.voxels[r], total.voxels[r])
        np.testing.assert_array_equal(pooled.errors[r], total.errors[r])
    # one case recomputed from its original file: the plain (not postprocessed) ensemble's errors
    pred, case = _raw(study, data / test_cases[0])
    again = error_counts(pred.labels, case.label, pred.entropy, n_members=pred.member_labels.shape[0],
                         annotated=case.annotated)
    for r in ("whole", "background", "organs"):
        np.testing.assert_array_equal(cases[test_cases[0]].voxels[r], again.voxels[r])
        np.testing.assert_array_equal(cases[test_cases[0]].errors[r], again.errors[r])


def test_evaluation_log_has_a_line_per_case_and_the_missed_organs(trained_study):
    study = trained_study.parent / "study"
    job = json.loads((study / "jobs.json").read_text())["jobs"]["evaluate/fold0"]
    log = Path(job["stdout"]).read_text()
    done = json.loads((study / "eval" / "fold0" / "done.json").read_text())
    for case_id in _folds(study)[0]["test"]:
        m = re.search(rf"case {case_id}: [0-9.]+ s, ensemble mean Dice ([0-9.]+|nan)", log)
        assert m, case_id
    for case_id in _folds(study)[0]["val"]:
        assert f"validation case {case_id}:" in log
    sm = done["summary"]["ensemble"]
    assert f"ensemble: weighted Dice {sm['dice_weighted']:.4f}, weighted HD95 {sm['hd95_weighted']:.2f} mm " \
           f"({sm['missed']} missed organ(s))" in log
    assert "ensemble+pp: weighted Dice" in log
    # `missed` counts the (case, organ) rows flagged pred_empty
    rows = _metrics(study)
    assert sm["missed"] == sum(r["model"] == "ensemble" and r["flag"] == "pred_empty" for r in rows)


def _copy_study(trained_study: Path, dest: Path) -> Path:
    src = trained_study.parent / "study"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("eval", "logs", "mlruns", "mlartifacts", "mlflow.db",
                                                             "report", "jobs.json"))
    return dest


def _spec(trained_study: Path, copy: Path, **changes):
    cfg = load_config(Layout(trained_study.parent / "study").resolved_config)
    spec = make_eval_spec(cfg, _folds(copy), 0)
    return dataclasses.replace(spec, study_root=str(copy), store=str(copy / "store"), mlflow_uri=None,
                               fold_run_key=None, save_maps=False, **changes)


def test_a_damaged_test_case_is_a_data_error_naming_it(trained_study, tmp_path):
    copy = _copy_study(trained_study, tmp_path / "s")
    case_id = _folds(copy)[0]["test"][0]
    chunks = sorted(p for p in (copy / "store" / "cases" / case_id / "image").rglob("*")
                    if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunks[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunks[0].write_bytes(bytes(data))
    spec = _spec(trained_study, copy, models=["sep-slf1-a05", "sep-slf2-a1"], val_cases=[])
    with pytest.raises(DataError, match=case_id):
        EvalTask(spec)()
    assert not (copy / "eval" / "fold0" / "done.json").exists()


def _constant_common7_model(model_dir: Path, *, cls: int) -> None:
    """Rewrite a trained member as a COMMON7 (8-class) network whose logits favour class ``cls`` everywhere."""
    old = ModelSpec.read(model_dir)
    spec = dataclasses.replace(old, organs="common7", num_classes=COMMON7.num_classes,
                               organ_ids=tuple(int(i) for i in COMMON7.inverse_lut()[1:]))
    net = build(spec.network, in_channels=spec.in_channels, num_classes=spec.num_classes, base=spec.base,
                separable_axis=spec.separable_axis)
    head = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    assert head.out_channels == spec.num_classes
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(cls), spec.num_classes).float() * 10)
    spec.write(model_dir)
    save_atomic({"model": net.state_dict()}, model_dir / "best.pt")
    done = json.loads((model_dir / "done.json").read_text())
    (model_dir / "done.json").write_text(json.dumps({**done, "val_dice": [0.5] * spec.num_classes}))


def test_an_organ_subset_is_evaluated_and_predicted_in_structseg_ids(trained_study, tmp_path):
    copy = _copy_study(trained_study, tmp_path / "s")
    mandible = [n for n, _ in COMMON7.classes].index("Mandible") + 1  # class 7 = StructSeg 21 + 22
    for name in ("sep-slf1-a05", "sep-slf2-a1"):
        _constant_common7_model(copy / "models" / "fold0" / name, cls=mandible)
    spec = _spec(trained_study, copy)  # the unet3d baseline stays a 22-organ model
    EvalTask(spec)()
    rows = _metrics(copy)
    common7 = {1, 6, 7, 8, 12, 13, 21}
    for model in ("ensemble", "ensemble+pp", "sep-slf1-a05"):
        assert {int(r["organ"]) for r in rows if r["model"] == model} == common7
    assert {int(r["organ"]) for r in rows if r["model"] == "unet3d"} == set(ORGAN_IDS)
    # everything predicted as the whole mandible (21): its Dice against the reference's 21 + 22, by hand
    from sepnet.data.store import Store

    store = Store(copy / "store")
    for case_id in spec.test_cases:
        ref = store.read_label(case_id)
        ref_mandible = int(np.isin(ref, (21, 22)).sum())
        dice = 2 * ref_mandible / (ref.size + ref_mandible)
        row = next(r for r in rows if r["model"] == "ensemble" and r["case"] == case_id and r["organ"] == "21")
        assert float(row["dice"]) == pytest.approx(dice)
        stem = next(r for r in rows if r["model"] == "ensemble" and r["case"] == case_id and r["organ"] == "1")
        assert float(stem["vol_pred_cm3"]) == 0.0 and stem["flag"] in ("pred_empty", "both_empty")
    # predict maps the classes back to StructSeg ids and names the merged class by the subset's name
    case_id = spec.test_cases[0]
    out = tmp_path / "out"
    assert main(["predict", "-i", str(trained_study.parent / "data" / case_id), "-o", str(out),
                 "--study", str(copy), "--fold", "0"]) == 0
    import SimpleITK as sitk

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / case_id / "labels.nii.gz")))
    assert set(np.unique(labels).tolist()) == {21}
    summary = json.loads((out / case_id / "summary.json").read_text())
    assert set(summary["organs"]) == {n for n, _ in COMMON7.classes}
    assert summary["organs"]["Mandible"]["id"] == 21


def test_subset_helpers_by_hand():
    ref = np.array([[[0, 1, 2, 21, 22, 6]]], dtype=np.uint8)
    # COMMON7 classes: 1 Brain_Stem, 2 Opt_Nerve_L (6), ..., 7 Mandible (21 + 22); eyes are not in it
    np.testing.assert_array_equal(subset_reference(ref, COMMON7), [[[0, 1, 0, 21, 21, 6]]])
    np.testing.assert_array_equal(to_organ_ids(np.array([0, 1, 2, 7]), COMMON7), [0, 1, 6, 21])
    assert subset_annotated((1, 6, 21), COMMON7) == (1, 6)  # the mandible needs 21 and 22
    assert subset_annotated(None, COMMON7) is None
    full = np.arange(23, dtype=np.uint8)
    np.testing.assert_array_equal(subset_reference(full, COMMON7)[[21, 22, 2]], [21, 21, 0])


def test_folds_combine_postprocessing_by_strict_majority():
    a = PostprocessDecision((1, 2, 3))
    b = PostprocessDecision((2, 3))
    c = PostprocessDecision((3,))
    assert combine_postprocessing([a, b, c]).organs == (2, 3)
    assert combine_postprocessing([a, b]).organs == (2, 3)  # 2 of 2
    assert combine_postprocessing([a, None]).organs == ()  # 1 of 2 is no majority
    assert combine_postprocessing([a]).organs == (1, 2, 3)
    assert combine_postprocessing([None]).organs == ()
    with pytest.raises(DataError, match="connectivit"):
        combine_postprocessing([a, PostprocessDecision((1,), 6)])
