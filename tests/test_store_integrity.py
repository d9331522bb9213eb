"""Store integrity: checksums recorded at writing catch altered, truncated or removed chunks (Store, sampler,
``sepnet fingerprint --verify``, ``sepnet preprocess --verify``); an unusable output folder is one error line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from sepnet.core.errors import DataError
from sepnet.data.phantom import make_case
from sepnet.data.prepare import make_plan
from sepnet.data.preprocess import init_store, preprocess, store_case
from sepnet.data.readers import write_case
from sepnet.data.sampler import PatchDataset
from sepnet.data.store import Store
from sepnet.jobs.cli import main

PLAN = make_plan(transforms=("SLF1", "SLF2"), crop=(48, 48), chunks=(1, 8, 32, 32))
IDS = ("a", "b", "c")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = init_store(tmp_path_factory.mktemp("integrity") / "store")
    for i, cid in enumerate(IDS):
        store_case(make_case(seed=i, size="tiny", case_id=cid), path, PLAN, source_hash="h")
    return path


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    """A fresh copy of the pristine store, free to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "store"))


def _chunks(store: Path, case_id: str, array: str) -> list[Path]:
    return sorted(p for p in (store / "cases" / case_id / array).rglob("*") if p.is_file() and p.name != "zarr.json")


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_intact_store_verifies_and_reads_back_what_was_written(pristine):
    st = Store(pristine)
    assert st.verify_all() == {}
    img, lab = st.read_checked("b", ["SLF2"])
    assert img.dtype == np.float16 and img.shape[0] == 1
    np.testing.assert_array_equal(img[0].astype(np.float32), st.read_image("b", ["SLF2"])[0])
    np.testing.assert_array_equal(lab, st.read_label("b"))
    # the recorded checksums are sha256 of the decoded arrays, as zarr reads them (independent of Store)
    sums = json.loads((pristine / "cases" / "b" / "zarr.json").read_text())["attributes"]["checksums"]
    image = zarr.open_array(pristine / "cases" / "b" / "image", mode="r")[...]
    assert sums["image"] == ["sha256:" + hashlib.sha256(c.tobytes()).hexdigest() for c in image]
    label = zarr.open_array(pristine / "cases" / "b" / "label", mode="r")[...]
    assert sums["label"] == "sha256:" + hashlib.sha256(label.tobytes()).hexdigest()


@pytest.mark.parametrize("damage", [_flip_byte, _truncate, Path.unlink], ids=["flip", "truncate", "remove"])
@pytest.mark.parametrize("array", ["image", "label"])
def test_damaged_chunk_is_named(store, damage, array):
    damage(_chunks(store, "b", array)[-1])
    st = Store(store)
    with pytest.raises(DataError, match=r"case 'b'.*(damaged|differs)"):
        st.verify("b")
    with pytest.raises(DataError, match="case 'b'"):
        st.read_checked("b")
    assert set(st.verify_all()) == {"b"}
    st.verify("a")  # the others are intact


@pytest.mark.parametrize("cache_bytes", [1 << 30, 0])
def test_training_never_uses_a_damaged_case(store, cache_bytes):
    # the SLF2 chunk is damaged: a sampler reading SLF1 only is fine, one reading SLF2 refuses the case
    _flip_byte(_chunks(store, "a", "image")[-1])  # last chunk of the last channel (SLF2)
    kw = dict(patch=(8, 16, 16), samples_per_epoch=6, seed=0, cache_bytes=cache_bytes)
    ds = PatchDataset(store, ["a"], channels=["SLF1"], **kw)
    assert all(ds[i][0].shape == (1, 8, 16, 16) for i in range(len(ds)))
    ds = PatchDataset(store, ["a", "b"], channels=["SLF2"], **kw)
    cases = {ds.sample_info(i).case_id for i in range(len(ds))}
    assert cases == {"a", "b"}
    with pytest.raises(DataError, match="case 'a'"):
        for i in range(len(ds)):
            ds[i]


def test_fingerprint_verify_exit_codes(store, tmp_path, capsys):
    assert main(["fingerprint", "--verify", str(store)]) == 0
    assert "3 cases checked, 0 damaged" in capsys.readouterr().out
    _truncate(_chunks(store, "c", "label")[0])
    _flip_byte(_chunks(store, "a", "image")[0])
    assert main(["fingerprint", "--verify", str(store)]) == 1
    out = capsys.readouterr().out.splitlines()
    damaged = [line for line in out if line.startswith("damaged:")]
    assert len(damaged) == 2 and "case 'a'" in damaged[0] and "case 'c'" in damaged[1]
    assert out[-1].endswith("3 cases checked, 2 damaged (a, c)")
    assert main(["fingerprint", "--verify", str(tmp_path / "nothing")]) == 2
    assert "not a sepnet Zarr store" in capsys.readouterr().err


def test_preprocess_verify_rewrites_damaged_cases(tmp_path):
    ds = tmp_path / "ds"
    for i in range(2):
        write_case(make_case(seed=i, size="tiny", case_id=f"p{i}"), ds, format="structseg")
    kw = dict(transforms=("SLF1",), crop=None, chunks=(1, 8, 32, 32), workers=1, progress=False)
    preprocess(ds, tmp_path / "store", **kw)
    _flip_byte(_chunks(tmp_path / "store", "p1", "image")[0])
    assert preprocess(ds, tmp_path / "store", **kw).skipped == ["p0", "p1"]  # without --verify: not read
    rep = preprocess(ds, tmp_path / "store", **kw, verify=True)
    assert rep.skipped == ["p0"] and rep.done == ["p1"]
    assert Store(tmp_path / "store").verify_all() == {}


def test_unusable_output_folder_is_one_error_line(tmp_path, capsys):
    ds = tmp_path / "ds"
    write_case(make_case(seed=0, size="tiny", case_id="p0"), ds, format="structseg")
    (tmp_path / "file").write_text("x")
    args = ["--crop", "none", "--transforms", "SLF1", "--workers", "1", "--no-progress"]
    for out in (tmp_path / "file", tmp_path / "file" / "store"):
        assert main(["preprocess", str(ds), str(out), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(out) in err and "Traceback" not in err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not _writable(ro):  # root ignores permissions
            assert main(["preprocess", str(ds), str(ro / "store"), *args]) == 2
            assert "cannot create the store folder" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def _writable(path: Path) -> bool:
    try:
        (path / ".probe").touch()
    except OSError:
        return False
    (path / ".probe").unlink()
    return True
