"""`sepnet predict`: labels and uncertainty in the input's original geometry; RTSTRUCT and DICOM-SEG for DICOM
input; the folds' postprocessing applied and reported."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from sepnet.core.organs import ORGAN_NAMES
from sepnet.data.dicom_seg import read_dicom_seg
from sepnet.data.phantom import make_case
from sepnet.data.readers import read_case, write_case
from sepnet.evaluation.metrics import dice
from sepnet.jobs.cli import main


def _same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == pytest.approx(b.GetSpacing(), abs=1e-5)
    assert a.GetOrigin() == pytest.approx(b.GetOrigin(), abs=1e-4)
    assert a.GetDirection() == pytest.approx(b.GetDirection(), abs=1e-6)


def test_predict_nifti_keeps_the_input_geometry(trained_study, tmp_path):
    study = trained_study.parent / "study"
    case = make_case(seed=[99, 0], size="tiny", case_id="new")
    # a scan the models never saw, written with a rotated direction and shifted origin
    img = sitk.GetImageFromArray(case.image)
    img.SetSpacing(case.geometry.spacing)
    img.SetOrigin((12.5, -40.0, 7.0))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    src = tmp_path / "in" / "scan.nii.gz"
    src.parent.mkdir()
    sitk.WriteImage(img, str(src))
    out = tmp_path / "out"
    assert main(["predict", "-i", str(src), "-o", str(out), "--study", str(study)]) == 0
    labels = sitk.ReadImage(str(out / "scan" / "labels.nii.gz"))
    unc = sitk.ReadImage(str(out / "scan" / "uncertainty.nii.gz"))
    _same_geometry(labels, img)
    _same_geometry(unc, img)
    lab = sitk.GetArrayFromImage(labels)
    assert lab.dtype == np.uint8 and lab.max() <= 22
    h = sitk.GetArrayFromImage(unc)
    assert h.min() >= 0 and h.max() <= np.log(4) + 1e-5  # 4 voters (2 members x 2 folds)
    summary = json.loads((out / "scan" / "summary.json").read_text())
    assert summary["n_members"] == 4 and summary["folds"] == [0, 1]
    # postprocessing: an organ both folds' evaluations chose (a strict majority of 2)
    chosen = [set(json.loads((study / "eval" / f"fold{f}" / "postprocess.json").read_text())["organs"]) for f in (0, 1)]
    assert summary["postprocessing"]["organ_ids"] == sorted(chosen[0] & chosen[1])
    assert summary["postprocessing"]["folds"] == {str(f): sorted(c) for f, c in enumerate(chosen)}
    assert set(summary["organs"]) == set(ORGAN_NAMES.values())
    vox = float(np.prod(img.GetSpacing())) / 1000
    for name, organ in summary["organs"].items():
        assert organ["volume_cm3"] == pytest.approx(float((lab == organ["id"]).sum()) * vox), name
        assert len(organ["member_volumes_cm3"]) == 4


def test_predict_dicom_writes_rtstruct_and_dicom_seg(trained_study, tmp_path):
    study = trained_study.parent / "study"
    case = make_case(seed=[98, 0], size="tiny", case_id="dcm")
    write_case(case, tmp_path / "in", format="dicom")
    series = tmp_path / "in" / "dcm" / "ct"
    out = tmp_path / "out"
    assert main(["predict", "-i", str(series), "-o", str(out), "--study", str(study), "--fold", "0"]) == 0
    labels = sitk.ReadImage(str(out / "ct" / "labels.nii.gz"))
    reader = sitk.ImageSeriesReader()
    ct = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(series)))
    _same_geometry(labels, ct)
    rt = pydicom.dcmread(out / "ct" / "rtstruct.dcm")
    assert rt.Modality == "RTSTRUCT"
    # one ROI per StructSeg organ; those with contours are exactly the predicted organs
    names = {roi.ROINumber: roi.ROIName for roi in rt.StructureSetROISequence}
    assert set(names.values()) == set(ORGAN_NAMES.values())
    contoured = {names[c.ReferencedROINumber] for c in rt.ROIContourSequence if len(getattr(c, "ContourSequence", []))}
    predicted = {ORGAN_NAMES[i] for i in np.unique(sitk.GetArrayFromImage(labels)) if i > 0}
    assert predicted and contoured == predicted
    # the structure set refers to the CT series it was drawn on
    ref_series = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0].SeriesInstanceUID
    assert ref_series == pydicom.dcmread(next(series.iterdir())).SeriesInstanceUID
    # the DICOM-SEG beside it: its frames are the NIfTI labels, voxel for voxel
    lab = sitk.GetArrayFromImage(labels)
    summary = json.loads((out / "ct" / "summary.json").read_text())
    assert summary["dicom_seg"] == str(out / "ct" / "seg.dcm")
    assert summary["rtstruct"] == str(out / "ct" / "rtstruct.dcm")
    seg, seg_names = read_dicom_seg(out / "ct" / "seg.dcm", series)
    np.testing.assert_array_equal(seg, lab)
    assert seg_names == {i: ORGAN_NAMES[i] for i in np.unique(lab) if i > 0}
    # the RTSTRUCT read back by the project's DICOM reader (polygons: close to the labels, not equal)
    case_dir = tmp_path / "readback" / "dcm"
    shutil.copytree(series, case_dir / "ct")
    shutil.copy(out / "ct" / "rtstruct.dcm", case_dir / "rtstruct.dcm")
    back = read_case(case_dir)
    np.testing.assert_array_equal(np.unique(back.label), np.unique(lab))
    assert dice(back.label > 0, lab > 0) > 0.8


def test_predict_batch_and_bad_input(trained_study, tmp_path, capsys):
    study = trained_study.parent / "study"
    folder = tmp_path / "batch"
    for i in range(2):
        write_case(make_case(seed=[97, i], size="tiny", case_id=f"b{i}"), folder, format="structseg")
    (folder / "broken.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "out"
    # one bad input is reported and the others are still segmented; the exit code says something failed
    assert main(["predict", "-i", str(folder), "-o", str(out), "--study", str(study), "--fold", "1"]) == 1
    err = capsys.readouterr().err
    assert "broken" in err and "Traceback" not in err
    assert (out / "b0" / "labels.nii.gz").is_file() and (out / "b1" / "summary.json").is_file()
    # missing input / no trained models: one line, exit 2
    assert main(["predict", "-i", str(tmp_path / "nope"), "-o", str(out), "--study", str(study)]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "emptystudy"
    shutil.copytree(study / "store", empty / "store", ignore=shutil.ignore_patterns("cases"))
    assert main(["predict", "-i", str(folder), "-o", str(out), "--study", str(empty)]) == 2
    assert "no trained model" in capsys.readouterr().err


def test_predict_resamples_a_scan_at_another_spacing_and_warns(trained_study, tmp_path, capsys):
    study = trained_study.parent / "study"
    case = make_case(seed=[96, 0], size="tiny", case_id="fine")
    # half the in-plane spacing the models were trained at (3.8 mm), and HU far above any CT's
    img = sitk.GetImageFromArray((case.image.astype(np.int32) + 3000).astype(np.int16))
    img.SetSpacing((1.9, 1.9, case.geometry.spacing[2]))
    src = tmp_path / "fine.nii.gz"
    sitk.WriteImage(img, str(src))
    out = tmp_path / "out"
    assert main(["predict", "-i", str(src), "-o", str(out), "--study", str(study), "--fold", "0"]) == 0
    printed = capsys.readouterr().out
    assert "resampled from" in printed and "warning: median body HU" in printed
    _same_geometry(sitk.ReadImage(str(out / "fine" / "labels.nii.gz")), img)
    _same_geometry(sitk.ReadImage(str(out / "fine" / "uncertainty.nii.gz")), img)
    summary = json.loads((out / "fine" / "summary.json").read_text())
    sp = summary["spacing"]
    assert sp["resampled"] and not sp["plan_resamples"] and sp["input_zyx"][1:] == pytest.approx([1.9, 1.9])
    fp = json.loads((study / "store" / "fingerprint.json").read_text())
    assert sp["model_zyx"] == pytest.approx(fp["spacing_zyx"]["median"])
    assert any("HU" in w for w in summary["warnings"])


def test_predict_refuses_a_plan_it_cannot_reproduce(trained_study, tmp_path, capsys):
    study = trained_study.parent / "study"
    old = tmp_path / "old"
    shutil.copytree(study / "store", old / "store", ignore=shutil.ignore_patterns("cases"))
    (old / "store" / "cases").mkdir()
    shutil.copy(study / "study.yaml", old / "study.yaml")
    (old / "models").symlink_to(study / "models")
    # a plan.json of an older sepnet: transform names only, no breakpoints, fill or dtype
    (old / "store" / "plan.json").write_text(json.dumps({"transforms": ["SLF1", "SLF2"], "crop": None}))
    src = tmp_path / "in"
    write_case(make_case(seed=[95, 0], size="tiny", case_id="x"), src, format="structseg")
    assert main(["predict", "-i", str(src / "x"), "-o", str(tmp_path / "out"), "--study", str(old)]) == 2
    err = capsys.readouterr().err
    assert "plan.json" in err and "Traceback" not in err


def test_load_trained_reads_spec_done_and_weights_only(trained_study, tmp_path):
    from sepnet.core.errors import DataError
    from sepnet.jobs.models import load_trained
    from sepnet.jobs.spec import ModelSpec

    src = trained_study.parent / "study" / "models" / "fold0" / "sep-slf1-a05"
    model_dir = tmp_path / "m"
    shutil.copytree(src, model_dir)
    model = load_trained(model_dir)
    assert model.spec == ModelSpec.read(src) and model.channels == ("SLF1",)
    assert model.val_dice().shape == (model.spec.num_classes,)
    (model_dir / "spec.json").unlink()
    with pytest.raises(DataError, match="spec.json"):
        load_trained(model_dir)
    shutil.copy(src / "spec.json", model_dir / "spec.json")
    data = (model_dir / "best.pt").read_bytes()
    (model_dir / "best.pt").write_bytes(data[: len(data) // 2])  # a truncated checkpoint
    with pytest.raises(DataError, match="best.pt"):
        load_trained(model_dir)


def test_predict_pastes_back_labels_and_uncertainty_never_probabilities(trained_study, tmp_path, monkeypatch):
    """The memory contract at 512x512: what goes back to the scan's grid is one 3-D map at a time (labels,
    entropy), never a (K, Z, Y, X) array on the original grid."""
    import sepnet.data.grid as grid

    pasted, real = [], grid.to_original
    monkeypatch.setattr(grid, "to_original", lambda a, meta, **kw: pasted.append(np.ndim(a)) or real(a, meta, **kw))
    case = make_case(seed=[99, 1], size="tiny", case_id="new")
    src = tmp_path / "in"
    write_case(case, src, format="structseg")
    assert main(["predict", "-i", str(src / "new" / "data.nii.gz"), "-o", str(tmp_path / "out"),
                 "--study", str(trained_study.parent / "study")]) == 0
    assert pasted == [3, 3]  # the labels and the vote entropy
