"""Zarr store: preprocessing round trip, crash safety, bad cases, fingerprint, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from sepnet.core.errors import DataError
from sepnet.core.intensity import apply_transform
from sepnet.data.case import Case, Geometry
from sepnet.data.grid import centre_crop_box, crop_like, to_original
from sepnet.data.preprocess import preprocess
from sepnet.data.store import Store

SHAPE = (6, 40, 44)  # (z, y, x)
SPACING = (0.9, 0.8, 2.5)  # (x, y, z) mm


def synthetic_case(case_id: str, *, seed: int, shape=SHAPE) -> Case:
    """Tiny CT-like case: air around an elliptic body (~40 HU + noise), a bone block, 4 organs inside the
    central 32x32 in-plane region (so a 32x32 crop keeps every label voxel)."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    zz, yy, xx = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    cy, cx = y / 2, x / 2
    body = ((yy - cy) / (0.45 * y)) ** 2 + ((xx - cx) / (0.45 * x)) ** 2 < 1
    hu = np.where(body, 40 + rng.normal(0, 15, shape), -1000).astype(np.int16)
    hu[:, int(cy) - 3 : int(cy) + 3, int(cx) + 6 : int(cx) + 10] = 900  # bone
    lab = np.zeros(shape, np.uint8)
    lab[1:5, int(cy) - 8 : int(cy) - 2, int(cx) - 8 : int(cx) - 2] = 1  # brain stem block
    lab[2, int(cy) + 3, int(cx) + 3] = 4  # one-voxel lens
    lab[:, int(cy) - 3 : int(cy) + 3, int(cx) + 6 : int(cx) + 10] = 21  # mandible on the bone
    lab[0:2, int(cy) + 5 : int(cy) + 8, int(cx) - 10 : int(cx) - 6] = 20
    geom = Geometry(spacing=SPACING, origin=(-20.0, -16.0, 5.0), direction=tuple(np.eye(3).ravel()), shape=shape)
    return Case(case_id=case_id, image=hu, label=lab, geometry=geom)


def write_structseg(case: Case, root: Path) -> Path:
    d = root / case.case_id
    d.mkdir(parents=True, exist_ok=True)
    for arr, name in ((case.image, "data.nii.gz"), (case.label, "label.nii.gz")):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(case.geometry.spacing)
        img.SetOrigin(case.geometry.origin)
        img.SetDirection(case.geometry.direction)
        sitk.WriteImage(img, str(d / name), True)
    return d


@pytest.fixture
def dataset(tmp_path):
    cases = [synthetic_case(f"case_{i:02d}", seed=i) for i in range(3)]
    for c in cases:
        write_structseg(c, tmp_path / "ds")
    return tmp_path / "ds", {c.case_id: c for c in cases}


KW = dict(transforms=("SLF1", "NLF1"), crop=(32, 32), chunks=(1, 4, 16, 16), workers=1, progress=False)


# ---- tests --------------------------------------------------------------------------------------------


def test_crop_box_hand_computed():
    assert centre_crop_box((6, 40, 44), (32, 32)) == ((0, 6), (4, 36), (6, 38))
    assert centre_crop_box((6, 20, 44), (32, 32)) == ((0, 6), (0, 20), (6, 38))  # smaller axis kept whole
    assert centre_crop_box((6, 40, 44), None) == ((0, 6), (0, 40), (0, 44))


def test_round_trip_exact(dataset, tmp_path):
    ds, cases = dataset
    rep = preprocess(ds, tmp_path / "store", **KW)
    assert rep.done == sorted(cases) and not rep.failed and not rep.skipped
    st = Store(tmp_path / "store")
    assert st.case_ids == sorted(cases)
    for cid, case in cases.items():
        meta = st.meta(cid)
        assert st.channels(cid) == ("SLF1", "NLF1")
        assert meta.crop_box == ((0, 6), (4, 36), (6, 38))
        assert meta.stored_shape == (6, 32, 32) and meta.original_shape == SHAPE
        assert meta.geometry.same_grid(case.geometry) and not meta.resampled
        assert st.image(cid).dtype == np.float16 and st.label(cid).dtype == np.uint8
        # label: every organ voxel is inside the crop, so the round trip is exact
        np.testing.assert_array_equal(to_original(st.read_label(cid), meta), case.label)
        img = st.read_image(cid, ["NLF1", "SLF1"])
        assert img.dtype == np.float32 and img.shape == (2, 6, 32, 32)
        back = to_original(img, meta)
        sl = (slice(None), slice(4, 36), slice(6, 38))
        for k, name in enumerate(["NLF1", "SLF1"]):
            ref = apply_transform(case.image, name)
            np.testing.assert_allclose(back[k][sl], ref[sl], atol=1e-3, rtol=0)  # float16 step < 5e-4 on [0, 1]
            assert np.all(back[k][:, :4] == 0)  # outside the crop: fill
        np.testing.assert_array_equal(crop_like(case.label, meta), st.read_label(cid))


def test_round_trip_resampled(dataset, tmp_path):
    """Resample z 2.5 -> 1.25 mm (an exact 2x refinement): labels come back exactly with nearest."""
    ds, cases = dataset
    preprocess(ds, tmp_path / "store", **{**KW, "spacing": (1.25, 0.8, 0.9)})
    st = Store(tmp_path / "store")
    cid = sorted(cases)[0]
    meta = st.meta(cid)
    assert meta.resampled and meta.spacing_zyx == (1.25, 0.8, 0.9) and meta.stored_shape == (12, 32, 32)
    lab = st.read_label(cid)
    np.testing.assert_array_equal(to_original(lab, meta, order=0), cases[cid].label)
    np.testing.assert_array_equal(crop_like(cases[cid].label, meta, order=0), lab)
    # stored slice 2k lies exactly on original slice k: the linear HU resampling reproduces it there
    ref = apply_transform(cases[cid].image, "SLF1")[:, 4:36, 6:38]
    np.testing.assert_allclose(st.read_image(cid, ["SLF1"])[0, ::2], ref, atol=1e-3)


def test_interrupted_run_leaves_only_complete_cases(dataset, tmp_path, monkeypatch):
    ds, cases = dataset
    import zarr

    real = zarr.Array.__setitem__
    calls = {"n": 0}

    def crashing(self, key, value):
        calls["n"] += 1
        if calls["n"] == 6:  # second case, its label (after its image): the case group is half written
            raise KeyboardInterrupt
        return real(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", crashing)
    with pytest.raises(KeyboardInterrupt):
        preprocess(ds, tmp_path / "store", **KW)
    names = sorted(p.name for p in (tmp_path / "store" / "cases").iterdir() if p.is_dir())
    assert any(n.startswith(".case_01.tmp-") for n in names), names  # the half case is on disk ...
    st = Store(tmp_path / "store")
    assert st.case_ids == ["case_00"]  # ... but not accepted
    with pytest.raises(DataError, match="case_01"):
        st.meta("case_01")
    assert st.fingerprint()["case_ids"] == ["case_00"]

    monkeypatch.setattr(zarr.Array, "__setitem__", real)
    rep = preprocess(ds, tmp_path / "store", **KW)
    assert rep.skipped == ["case_00"] and rep.done == ["case_01", "case_02"] and not rep.failed
    assert not [p for p in (tmp_path / "store" / "cases").iterdir() if p.name.startswith(".")]
    assert Store(tmp_path / "store").case_ids == sorted(cases)

    # a changed source file is redone, the others skipped; a changed plan redoes everything
    f = ds / "case_02" / "label.nii.gz"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    rep = preprocess(ds, tmp_path / "store", **KW)
    assert rep.done == ["case_02"] and rep.skipped == ["case_00", "case_01"]
    rep = preprocess(ds, tmp_path / "store", **{**KW, "transforms": ("SLF2",)})
    assert rep.done == sorted(cases)
    assert Store(tmp_path / "store").channels("case_00") == ("SLF2",)


def test_bad_case_reported_others_processed(dataset, tmp_path, capsys, caplog):
    ds, cases = dataset
    bad = ds / "case_01" / "data.nii.gz"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated gzip (interrupted copy)
    from sepnet.jobs.cli import main

    code = main(["preprocess", str(ds), str(tmp_path / "store"), "--crop", "32", "--transforms", "SLF1",
                 "--chunks", "1,4,16,16", "--workers", "1", "--no-progress"])  # fmt: skip
    assert code == 1
    failed = [r.getMessage() for r in caplog.records if "failed case" in r.getMessage()]
    assert len(failed) == 1 and "case_01" in failed[0] and "data.nii.gz" in failed[0]
    assert "\n" not in failed[0]
    assert "2 written, 0 up to date, 1 failed (case_01)" in capsys.readouterr().out
    st = Store(tmp_path / "store")
    assert st.case_ids == ["case_00", "case_02"]
    assert st.fingerprint()["case_ids"] == ["case_00", "case_02"]


def test_fingerprint_matches_direct_counts(dataset, tmp_path):
    ds, cases = dataset
    preprocess(ds, tmp_path / "store", **KW)
    fp = json.loads((tmp_path / "store" / "fingerprint.json").read_text())
    assert fp["num_cases"] == 3 and fp["case_ids"] == sorted(cases)
    voxel_cm3 = np.prod(SPACING) / 1000
    total = np.zeros(23, int)
    body = []
    for cid, case in cases.items():
        counts = np.bincount(case.label.ravel(), minlength=23)
        total += counts
        got = fp["cases"][cid]
        assert got["voxels"] == {str(k): int(v) for k, v in enumerate(counts) if k and v}
        for k, v in got["volume_cm3"].items():
            assert v == pytest.approx(counts[int(k)] * voxel_cm3)
        body.append(case.image[case.image > -500].astype(float))
    assert fp["organs"]["voxels"] == {str(k): int(v) for k, v in enumerate(total) if k and v}
    body = np.concatenate(body)
    assert fp["intensity"]["mean"] == pytest.approx(body.mean())
    assert fp["intensity"]["std"] == pytest.approx(body.std(), rel=1e-6)
    assert fp["intensity"]["percentiles"]["50"] == pytest.approx(np.percentile(body, 50), abs=2)
    assert fp["spacing_zyx"]["median"] == pytest.approx([2.5, 0.8, 0.9])
    assert fp["shape_zyx"]["max"] == list(SHAPE)
    # class frequencies on the stored (cropped) labels sum to 1 and match a direct count
    stored = sum(np.bincount(c.label[:, 4:36, 6:38].ravel(), minlength=23) for c in cases.values())
    assert fp["class_frequencies"]["4"] == pytest.approx(stored[4] / stored.sum())
    assert sum(fp["class_frequencies"].values()) == pytest.approx(1.0)
    plan = json.loads((tmp_path / "store" / "plan.json").read_text())
    assert plan["crop"] == [32, 32] and [t["name"] for t in plan["transforms"]] == ["SLF1", "NLF1"]


def test_missing_store_names_path(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        Store(tmp_path / "nowhere")


def test_parallel_workers_match_serial(dataset, tmp_path):
    ds, cases = dataset
    preprocess(ds, tmp_path / "a", **KW)
    rep = preprocess(ds, tmp_path / "b", **{**KW, "workers": 2})
    assert rep.done == sorted(cases)
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    for cid in cases:
        np.testing.assert_array_equal(a.read_image(cid), b.read_image(cid))
        np.testing.assert_array_equal(a.read_label(cid), b.read_label(cid))


def test_phantom_round_trip_with_real_readers(tmp_path):
    """A tiny phantom (all 22 organs) through writer -> reader -> store -> original geometry."""
    from sepnet.data.phantom import make_case
    from sepnet.data.readers import write_case

    case = make_case(seed=1, size="tiny", case_id="ph1")
    write_case(case, tmp_path / "ds", format="structseg")
    crop = (48, 48)  # 64x64 in-plane -> rows/cols 8..55 kept
    rep = preprocess(tmp_path / "ds", tmp_path / "store", **{**KW, "crop": crop, "transforms": ("SLF3",)})
    assert rep.done == ["ph1"]
    st = Store(tmp_path / "store")
    meta = st.meta("ph1")
    assert meta.crop_box == ((0, case.image.shape[0]), (8, 56), (8, 56))
    expected = np.zeros_like(case.label)  # what survives the crop, pasted back at its place
    expected[:, 8:56, 8:56] = case.label[:, 8:56, 8:56]
    np.testing.assert_array_equal(to_original(st.read_label("ph1"), meta), expected)
    ref = apply_transform(case.image, "SLF3")[:, 8:56, 8:56]
    np.testing.assert_allclose(st.read_image("ph1")[0], ref, atol=1e-3)
    fp = st.fingerprint()
    counts = np.bincount(case.label.ravel(), minlength=23)
    assert fp["organs"]["voxels"] == {str(k): int(v) for k, v in enumerate(counts) if k and v}
