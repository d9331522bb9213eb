"""sepnet.data.prepare: the one case preparation (store == prepare_case), fill outside the image, the plan
(every parameter recorded and hashed, old plans refused)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sepnet.core import intensity
from sepnet.core.errors import ConfigError, DataError
from sepnet.data.case import Geometry
from sepnet.data.prepare import Plan, TransformSpec, make_plan, prepare_case
from sepnet.data.preprocess import preprocess
from sepnet.data.store import Store

KW = dict(transforms=("SLF1", "NLF1"), crop=(48, 40), chunks=(1, 8, 32, 32), workers=1, progress=False)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A tiny phantom case written as StructSeg and read back (the HU the store writer sees)."""
    from sepnet.data.phantom import make_case
    from sepnet.data.readers import read_case, write_case

    root = tmp_path_factory.mktemp("ph")
    folder = write_case(make_case(seed=2, size="tiny", case_id="ph"), root / "ds", format="structseg")
    return root / "ds", read_case(folder, format="structseg", require_label=True)


@pytest.mark.parametrize("spacing", [None, (3.0, 2.5, 3.2)])
def test_store_holds_exactly_prepare_case(phantom, tmp_path, spacing):
    ds, case = phantom
    rep = preprocess(ds, tmp_path / "store", **KW, spacing=spacing)
    assert rep.done == ["ph"], rep.failed
    st = Store(tmp_path / "store")
    plan = st.plan()
    assert plan == make_plan(transforms=KW["transforms"], crop=KW["crop"], spacing_zyx=spacing,
                             chunks=KW["chunks"])
    prep = prepare_case(case.image, case.geometry, plan, label=case.label, case_id="ph")
    assert prep.image.dtype == np.float32 and prep.meta.resampled == (spacing is not None)
    np.testing.assert_array_equal(st.read_image("ph"), prep.image)  # bit for bit
    np.testing.assert_array_equal(st.read_label("ph"), prep.label)
    meta = st.meta("ph")
    assert (meta.crop_box, meta.grid, meta.stored_shape) == (prep.meta.crop_box, prep.meta.grid,
                                                             prep.meta.stored_shape)
    # predict's use: no label, a subset of the channels in another order -> the same values
    sub = prepare_case(case.image, case.geometry, plan, channels=["NLF1"])
    assert sub.label is None and sub.meta.channels == ("NLF1",)
    np.testing.assert_array_equal(sub.image[0], prep.image[1])


def test_values_are_rounded_through_the_plan_dtype():
    geom = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), (2, 3, 3))
    hu = np.arange(18, dtype=np.int16).reshape(2, 3, 3) * 37 - 300
    spec = TransformSpec("w", (-400.0, 400.0), (0.0, 1.0))
    for dtype in ("float16", "float32"):
        plan = make_plan(transforms=[spec], crop=None, dtype=dtype)
        got = prepare_case(hu, geom, plan).image[0]
        want = ((hu.astype(np.float64) + 400.0) / 800.0).astype(np.float32).astype(dtype).astype(np.float32)
        np.testing.assert_array_equal(got, want)


def test_fill_outside_the_image_is_minus_1024_hu():
    """5 slices at 3 mm resampled to 2 mm: 8 slices, the last (14 mm) lies outside the image (max 12 mm)."""
    geom = Geometry((1.0, 1.0, 3.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), (5, 4, 4))
    hu = np.full((5, 4, 4), 100, np.int16)
    spec = TransformSpec("w", (-2000.0, 2000.0), (0.0, 1.0))  # linear, so -1024 and 0 differ
    plan = make_plan(transforms=[spec], crop=None, spacing_zyx=(2.0, 1.0, 1.0), dtype="float32")
    prep = prepare_case(hu, geom, plan, label=np.ones((5, 4, 4), np.uint8))
    assert prep.image.shape == (1, 8, 4, 4)
    np.testing.assert_allclose(prep.image[0, 7], (-1024 + 2000) / 4000, rtol=0, atol=1e-7)
    np.testing.assert_allclose(prep.image[0, :6], (100 + 2000) / 4000, rtol=0, atol=1e-6)
    assert np.all(prep.label[7] == 0) and np.all(prep.label[:6] == 1)


def test_plan_round_trip_and_key():
    plan = make_plan(transforms=("SLF2", TransformSpec("mine", (-50.0, 0.0, 80.0), (0.0, 0.5, 1.0))),
                     crop=(64, 32), spacing_zyx=(3, 1, 1), chunks=(1, 4, 8, 8), codec="lz4", clevel=5)
    d = json.loads(json.dumps(plan.to_dict()))
    back = Plan.from_dict(d, source="plan.json")
    assert back == plan and back.key() == plan.key()
    assert d["transforms"][0] == {"name": "SLF2", "hu_breakpoints": [-500.0, -100.0, 100.0, 1500.0],
                                  "values": [0.0, 0.2, 0.8, 1.0]}
    assert d["fill_hu"] == -1024.0 and d["dtype"] == "float16" and d["spacing_zyx"] == [3.0, 1.0, 1.0]
    assert plan.with_spacing(None).spacing_zyx is None and plan.with_spacing(None).key() != plan.key()
    keys = {plan.key()}
    for other in (dict(clevel=4), dict(fill_hu=-1000.0), dict(dtype="float32"), dict(crop=None)):
        keys.add(make_plan(**{**dict(transforms=("SLF2", plan.transforms[1]), crop=(64, 32), spacing_zyx=(3, 1, 1),
                                     chunks=(1, 4, 8, 8), codec="lz4", clevel=5), **other}).key())
    assert len(keys) == 5


def test_changed_breakpoint_changes_key_and_rewrites_the_store(phantom, tmp_path, monkeypatch):
    ds, _ = phantom
    kw = {**KW, "transforms": ("SLF1",)}
    key = make_plan(transforms=("SLF1",)).key()
    assert preprocess(ds, tmp_path / "store", **kw).done == ["ph"]
    assert preprocess(ds, tmp_path / "store", **kw).skipped == ["ph"]
    monkeypatch.setitem(intensity.PRESETS, "SLF1", ((-500.0, -250.0, 200.0, 1500.0), (0.0, 0.2, 0.8, 1.0)))
    assert make_plan(transforms=("SLF1",)).key() != key
    assert preprocess(ds, tmp_path / "store", **kw).done == ["ph"]
    assert Store(tmp_path / "store").plan().transforms[0].hu_breakpoints == (-500.0, -250.0, 200.0, 1500.0)


def test_old_or_unreproducible_plan_refused_naming_the_file(tmp_path):
    good = make_plan(transforms=("SLF1",)).to_dict()
    old = {"transforms": ["SLF1"], "crop": [256, 256], "spacing_zyx": None, "chunks": [1, 16, 128, 128],
           "codec": "zstd", "clevel": 3, "dtype": {"image": "float16", "label": "uint8"}, "store_version": 1}
    cases = {
        "older sepnet": old,
        "newer than": {**good, "store_version": 99},
        "dtype": {**good, "dtype": "bfloat16"},
        "strictly increasing": {**good, "transforms": [{"name": "x", "hu_breakpoints": [5, 1], "values": [0, 1]}]},
        "missing": {k: v for k, v in good.items() if k != "fill_hu"},
    }
    for why, d in cases.items():
        with pytest.raises(DataError, match=f"somewhere/plan.json.*{why}"):
            Plan.from_dict(d, source="somewhere/plan.json")
    # through a store: an old plan.json on disk is named in the error
    ds = tmp_path / "s"
    (ds / "cases").mkdir(parents=True)
    (ds / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    (ds / "plan.json").write_text(json.dumps(old))
    with pytest.raises(DataError, match=str(ds / "plan.json")):
        Store(ds).plan()


@pytest.mark.parametrize("bad, match", [
    (dict(transforms=("SLF9",)), "unknown 'SLF9'"),
    (dict(transforms=()), "empty"),
    (dict(transforms=("SLF1", "SLF1")), "duplicates"),
    (dict(crop=(0, 5)), "preprocess.crop"),
    (dict(spacing_zyx=(1, 0, 1)), "preprocess.spacing"),
    (dict(chunks=(1, 2, 3)), "preprocess.chunks"),
    (dict(codec="gzip"), "preprocess.codec"),
    (dict(dtype="int8"), "preprocess.dtype"),
    (dict(transforms=(TransformSpec("t", (0.0, 0.0), (0.0, 1.0)),)), "strictly increasing"),
])
def test_make_plan_rejects_bad_options(bad, match):
    with pytest.raises(ConfigError, match=match):
        make_plan(**bad)
