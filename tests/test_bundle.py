"""Bundles (`sepnet export`, `sepnet predict --bundle/--model`): the same labels as `--study` without the study or
its store; tensors-only weights; altered bundles refused naming the file; atomic export."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from sepnet.core.errors import DataError
from sepnet.data.phantom import make_case
from sepnet.jobs import bundle as bundle_mod
from sepnet.jobs.bundle import export_bundle, load_bundle, verify_bundle
from sepnet.jobs.cli import main


@pytest.fixture(scope="module")
def exported(trained_study, tmp_path_factory) -> dict:
    """The trained study, a bundle of all its folds (written by the CLI) and a phantom NIfTI scan."""
    d = tmp_path_factory.mktemp("bundle")
    study = trained_study.parent / "study"
    assert main(["export", str(study), str(d / "all")]) == 0
    case = make_case(seed=[97, 0], size="tiny", case_id="scan")
    img = sitk.GetImageFromArray(case.image)
    img.SetSpacing(case.geometry.spacing)
    img.SetOrigin((3.0, -20.0, 5.5))
    scan = d / "in" / "scan.nii.gz"
    scan.parent.mkdir()
    sitk.WriteImage(img, str(scan))
    return {"study": study, "bundle": d / "all", "scan": scan}


def _labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_bundle_predicts_the_study_labels_without_study_or_store(exported, trained_study, tmp_path, monkeypatch):
    study, scan = exported["study"], exported["scan"]
    assert main(["predict", "-i", str(scan), "-o", str(tmp_path / "study"), "--study", str(study)]) == 0
    assert main(["predict", "-i", str(scan), "-o", str(tmp_path / "study-0"), "--study", str(study),
                 "--fold", "0"]) == 0
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(exported["bundle"], moved)
    asked = []
    registry = types.ModuleType("sepnet.jobs.registry")
    registry.resolve_model = lambda uri, tracking_uri=None: asked.append((uri, tracking_uri)) or moved
    monkeypatch.setitem(sys.modules, "sepnet.jobs.registry", registry)
    # the study folder, its store and its dataset gone: everything must come from the bundle
    home = trained_study.parent
    away = home.with_name(home.name + "-away")
    home.rename(away)
    try:
        assert main(["predict", "-i", str(scan), "-o", str(tmp_path / "bundle"), "--bundle", str(moved)]) == 0
        assert main(["predict", "-i", str(scan), "-o", str(tmp_path / "bundle-0"), "--bundle", str(moved),
                     "--fold", "0"]) == 0
        assert main(["predict", "-i", str(scan), "-o", str(tmp_path / "model"), "--model", "models:/tiny/1",
                     "--tracking-uri", "http://127.0.0.1:1"]) == 0
    finally:
        away.rename(home)
    assert asked == [("models:/tiny/1", "http://127.0.0.1:1")]
    ref = _labels(tmp_path / "study" / "scan" / "labels.nii.gz")
    assert (ref > 0).any()
    for out in ("bundle", "model"):
        assert np.array_equal(_labels(tmp_path / out / "scan" / "labels.nii.gz"), ref)
        assert np.array_equal(_labels(tmp_path / out / "scan" / "uncertainty.nii.gz"),
                              _labels(tmp_path / "study" / "scan" / "uncertainty.nii.gz"))
        summary = json.loads((tmp_path / out / "scan" / "summary.json").read_text())
        assert summary == json.loads((tmp_path / "study" / "scan" / "summary.json").read_text())
    # one fold of an all-folds bundle predicts as that fold of the study
    one = _labels(tmp_path / "bundle-0" / "scan" / "labels.nii.gz")
    assert np.array_equal(one, _labels(tmp_path / "study-0" / "scan" / "labels.nii.gz"))
    assert json.loads((tmp_path / "bundle-0" / "scan" / "summary.json").read_text())["folds"] == [0]


def test_predict_needs_exactly_one_source(exported, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "-i", str(exported["scan"]), "-o", str(tmp_path), "--study", str(exported["study"]),
              "--bundle", str(exported["bundle"])])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "-i", str(exported["scan"]), "-o", str(tmp_path)])


def test_fold_bundle_holds_tensors_only_weights_equal_to_the_study(exported, tmp_path, capsys):
    study = exported["study"]
    out = tmp_path / "fold0"
    assert main(["export", str(study), str(out), "--fold", "0"]) == 0
    printed = capsys.readouterr().out
    assert "sep-slf1-a05, sep-slf2-a1" in printed and "fold(s) 0;" in printed
    assert sorted(p.name for p in (out / "models").iterdir()) == ["fold0"]
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["folds"] == [0] and meta["members"] == ["sep-slf1-a05", "sep-slf2-a1"]
    assert meta["torch_version"] == torch.__version__ and meta["format"] == bundle_mod.BUNDLE_FORMAT
    assert not (out / "store").exists()
    for name in meta["members"]:
        weights = torch.load(out / "models" / "fold0" / name / "best.pt", weights_only=True)
        assert list(weights) == ["model"]
        trained = torch.load(study / "models" / "fold0" / name / "best.pt", weights_only=True)["model"]
        assert weights["model"].keys() == trained.keys()
        assert all(torch.equal(weights["model"][k], trained[k]) for k in trained)
    # the plan and the manifest: what the store holds, and every file with its true checksum
    assert json.loads((out / "plan.json").read_text()) == json.loads((study / "store" / "plan.json").read_text())
    files = json.loads((out / "manifest.json").read_text())["files"]
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sorted(files) == [f for f in on_disk if f != "manifest.json"]
    for rel, entry in files.items():
        assert entry["sha256"] == hashlib.sha256((out / rel).read_bytes()).hexdigest()
    ens = load_bundle(out)
    assert ens.folds == [0] and len(ens.members) == 2
    with pytest.raises(DataError, match="--fold 1"):
        load_bundle(out, fold="1")


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


ALTERATIONS = {
    "weights byte": ("models/fold1/sep-slf2-a1/best.pt", _flip_byte, "changed since export"),
    "plan byte": ("plan.json", _flip_byte, "changed since export"),
    "missing file": ("models/fold0/sep-slf1-a05/done.json", Path.unlink, "missing from the bundle"),
    "extra file": ("models/fold0/notes.txt", lambda p: p.write_text("hello"), "not listed in manifest.json"),
    "no manifest": ("manifest.json", Path.unlink, "missing"),
}


@pytest.mark.parametrize("what", sorted(ALTERATIONS))
def test_an_altered_bundle_is_refused_naming_the_file(exported, tmp_path, capsys, what):
    rel, alter, message = ALTERATIONS[what]
    copy = tmp_path / "bundle"
    shutil.copytree(exported["bundle"], copy)
    alter(copy / rel)
    capsys.readouterr()
    assert main(["predict", "-i", str(exported["scan"]), "-o", str(tmp_path / "out"), "--bundle", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(copy / rel) in err[0] and message in err[0], err
    assert not (tmp_path / "out").exists()


def _rewrite_manifest(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():
        data = (folder / rel).read_bytes()
        entry.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_bundle_of_a_newer_format_or_inconsistent_weights_is_refused(exported, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(exported["bundle"], copy)
    meta = json.loads((copy / "bundle.json").read_text())
    (copy / "bundle.json").write_text(json.dumps({**meta, "format": bundle_mod.BUNDLE_FORMAT + 1}))
    _rewrite_manifest(copy)  # consistent checksums: only the format stands in the way
    with pytest.raises(DataError, match=r"bundle\.json: bundle format 2 is newer"):
        load_bundle(copy)
    weights = np.asarray(meta["fusion_weights"])
    weights[0, 1] += 0.5
    (copy / "bundle.json").write_text(json.dumps({**meta, "fusion_weights": weights.tolist()}))
    _rewrite_manifest(copy)
    with pytest.raises(DataError, match="fusion weights differ"):
        load_bundle(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": 7}))
    with pytest.raises(DataError, match=r"manifest\.json: bundle format 7 is newer"):
        verify_bundle(copy)


def test_export_is_atomic_and_a_reexport_replaces(exported, tmp_path, monkeypatch, capsys):
    study = exported["study"]
    out = tmp_path / "b"
    export_bundle(study, out)
    # an unchanged study exports byte-identical files (the manifest holds every file's sha256)
    assert (out / "manifest.json").read_bytes() == (exported["bundle"] / "manifest.json").read_bytes()
    real, calls = bundle_mod._write_member, []

    def failing(folder, member):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(folder))
        real(folder, member)

    monkeypatch.setattr(bundle_mod, "_write_member", failing)
    with pytest.raises(OSError):
        export_bundle(study, out, fold="0")
    assert json.loads((out / "bundle.json").read_text())["folds"] == [0, 1]  # the old bundle, intact
    verify_bundle(out)
    calls.clear()
    with pytest.raises(OSError):
        export_bundle(study, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp folder left behind
    monkeypatch.setattr(bundle_mod, "_write_member", real)
    export_bundle(study, out, fold="0")
    assert json.loads((out / "bundle.json").read_text())["folds"] == [0]
    assert sorted(p.name for p in (out / "models").iterdir()) == ["fold0"]
    verify_bundle(out)
    # a folder that is not a bundle is never replaced
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export", str(study), str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(other) in err[0] and "not a sepnet bundle" in err[0]
    assert (other / "keep.txt").read_text() == "mine"
