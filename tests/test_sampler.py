"""PatchDataset: determinism, rank disjointness, foreground balance, padding, DataLoader workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sepnet.core.errors import DataError
from sepnet.core.organs import COMMON7, NUM_CLASSES, OrganSubset
from sepnet.data.case import Case, Geometry
from sepnet.data.prepare import make_plan
from sepnet.data.preprocess import init_store, store_case
from sepnet.data.sampler import PatchDataset
from sepnet.data.store import Store

PLAN = make_plan(transforms=("SLF1", "NLF2"), crop=None, chunks=(1, 4, 16, 16))


def _case(case_id: str, shape, *, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 1500, size=shape).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    z, y, x = shape
    lab[: z // 2, : y // 2, : x // 2] = 1  # a big organ (1/8 of the volume)
    lab[z - 1, y - 2, x - 2] = 4  # a one-voxel organ in a far corner
    lab[z // 2, y // 2 + 1 : y // 2 + 3, 1:3] = 8
    geom = Geometry((1.0, 1.0, 3.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), tuple(shape))
    return Case(case_id, hu, lab, geom)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("s") / "store"
    init_store(path)
    for i, shape in enumerate([(20, 40, 40), (24, 36, 44), (6, 20, 24)]):  # the last is smaller than the patch
        store_case(_case(f"c{i}", shape, seed=i), path, PLAN, source_hash="h")
    # a case of a dataset without organ 4 (its label has none, its meta says so)
    c3 = _case("c3", (20, 40, 40), seed=3)
    c3 = Case("c3", c3.image, np.where(c3.label == 4, 0, c3.label).astype(np.uint8), c3.geometry,
              annotated=(1, 8))
    store_case(c3, path, PLAN, source_hash="h")
    return Store(path)


KW = dict(channels=["NLF2", "SLF1"], patch=(8, 24, 24), samples_per_epoch=12, seed=3)


def _all(ds, n=None):
    items = [ds[i] for i in range(n or len(ds))]
    return torch.stack([a for a, _, _ in items]), torch.stack([b for _, b, _ in items])


def test_shapes_dtypes_and_content(store):
    ds = PatchDataset(store, ["c0", "c1"], **KW)
    assert len(ds) == 12
    for i in range(len(ds)):
        img, lab, ann = ds[i]
        assert img.dtype == torch.float32 and img.shape == (2, 8, 24, 24)
        assert ann.dtype == torch.bool and ann.shape == (NUM_CLASSES,) and bool(ann.all())  # StructSeg: all
        assert lab.dtype == torch.int64 and lab.shape == (8, 24, 24)
        info = ds.sample_info(i)
        (z, y, x), cid = info.start, info.case_id
        ref = store.read_image(cid, ["NLF2", "SLF1"])[:, z : z + 8, y : y + 24, x : x + 24]
        np.testing.assert_array_equal(img.numpy(), ref)  # the right place, channel order as asked
        np.testing.assert_array_equal(lab.numpy(), store.read_label(cid)[z : z + 8, y : y + 24, x : x + 24])


def test_deterministic_and_worker_independent(store):
    ds = PatchDataset(store, ["c0", "c1"], **KW)
    a_img, a_lab = _all(ds)
    b_img, b_lab = _all(PatchDataset(store, ["c0", "c1"], **KW))
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    loaded = {}
    for workers in (0, 2):
        dl = DataLoader(ds, batch_size=4, shuffle=False, num_workers=workers)
        imgs, labs, anns = zip(*dl)
        assert torch.cat(anns).shape == (12, NUM_CLASSES)
        loaded[workers] = (torch.cat(imgs), torch.cat(labs))
    for w in (0, 2):
        assert torch.equal(loaded[w][0], a_img) and torch.equal(loaded[w][1], a_lab)
    # no cache (patch-wise Zarr reads) gives the same tensors as the cached path
    c_img, c_lab = _all(PatchDataset(store, ["c0", "c1"], **KW, cache_bytes=0))
    assert torch.equal(c_img, a_img) and torch.equal(c_lab, a_lab)
    # another epoch, another stream; persistent workers follow set_epoch from the main process
    dl = DataLoader(ds, batch_size=6, num_workers=2, persistent_workers=True)
    assert torch.equal(torch.cat([b[0] for b in dl]), a_img)
    ds.set_epoch(1)
    e1_img = torch.cat([b[0] for b in dl])
    assert not torch.equal(e1_img, a_img)
    assert torch.equal(e1_img, _all(ds)[0])


def test_ranks_disjoint_and_union_is_single_process_epoch(store):
    """Property: rank r's item i == item i*W + r of the world-1 dataset with W times the samples."""
    kw = {**KW, "samples_per_epoch": 6}
    ranks = [PatchDataset(store, ["c0", "c1"], **kw, rank=r, world_size=2) for r in (0, 1)]
    single = PatchDataset(store, ["c0", "c1"], **{**kw, "samples_per_epoch": 12})
    for ds in [*ranks, single]:
        ds.set_epoch(5)
    for r, ds in enumerate(ranks):
        for i in range(len(ds)):
            assert ds.sample_info(i) == single.sample_info(2 * i + r)
            assert torch.equal(ds[i][0], single[2 * i + r][0])
    starts = [{(ds.sample_info(i).case_id, ds.sample_info(i).start) for i in range(len(ds))} for ds in ranks]
    assert starts[0] != starts[1]


def test_foreground_fraction_and_class_balance(store):
    n = 600
    ds = PatchDataset(store, ["c0", "c1"], **{**KW, "samples_per_epoch": n, "foreground_fraction": 0.3})
    infos = [ds.sample_info(i) for i in range(n)]
    frac = np.mean([i.foreground for i in infos])
    assert abs(frac - 0.3) < 0.06  # binomial sd ~0.019
    # class-balanced: the one-voxel organ 4 is the centre of ~1/3 of the foreground patches
    organs = np.array([i.organ for i in infos if i.foreground])
    assert set(organs) == {1, 4, 8}
    assert abs(np.mean(organs == 4) - 1 / 3) < 0.1
    # and a foreground patch contains its organ
    for i in range(40):
        if infos[i].foreground:
            assert (ds[i][1] == infos[i].organ).any()
    # uniform patches rarely hit the corner voxel; foreground_fraction=1 always hits some organ
    ds1 = PatchDataset(store, ["c0", "c1"], **{**KW, "samples_per_epoch": 30, "foreground_fraction": 1.0})
    assert all((ds1[i][1] > 0).any() for i in range(30))


def test_small_volume_padded_or_rejected(store):
    ds = PatchDataset(store, ["c2"], **{**KW, "patch": (8, 32, 32), "foreground_fraction": 0.0})
    full_img = store.read_image("c2", ["NLF2", "SLF1"])  # (2, 6, 20, 24)
    full_lab = store.read_label("c2")
    for i in range(len(ds)):
        img, lab, _ = ds[i]
        assert img.shape == (2, 8, 32, 32)
        z, y, x = ds.sample_info(i).start
        assert -2 <= z <= 0 and -12 <= y <= 0 and -8 <= x <= 0
        # the volume sits at (-z, -y, -x) inside the patch; everything else is 0 (air / background)
        inside = (slice(None), slice(-z, -z + 6), slice(-y, -y + 20), slice(-x, -x + 24))
        np.testing.assert_array_equal(img.numpy()[inside], full_img)
        np.testing.assert_array_equal(lab.numpy()[inside[1:]], full_lab)
        assert img.sum() == pytest.approx(full_img.sum(), rel=1e-5)
        assert int(lab.count_nonzero()) == int(np.count_nonzero(full_lab))
    with pytest.raises(DataError, match="c2"):
        PatchDataset(store, ["c0", "c2"], **{**KW, "patch": (8, 16, 16)}, pad=False)


def test_bad_arguments(store):
    with pytest.raises(DataError, match="SLF3"):
        PatchDataset(store, ["c0"], **{**KW, "channels": ["SLF3"]})
    with pytest.raises(DataError, match="nope"):
        PatchDataset(store, ["nope"], **KW)


def test_subset_labels_class_balance_and_annotated_masks(store):
    """Labels mapped through the subset's LUT (by hand), balance over subset classes, per-case masks."""
    sub = OrganSubset("t", (("A", (8,)), ("B", (1, 4))))  # class 1 = organ 8, class 2 = organs 1 and 4
    n = 60
    ds = PatchDataset(store, ["c0", "c3"], **{**KW, "samples_per_epoch": n, "foreground_fraction": 1.0}, subset=sub)
    by_hand = np.zeros(NUM_CLASSES, np.int64)
    by_hand[8], by_hand[1], by_hand[4] = 1, 2, 2
    seen = set()
    for i in range(n):
        info = ds.sample_info(i)
        img, lab, ann = ds[i]
        (z, y, x), cid = info.start, info.case_id
        stored = store.read_label(cid)[z : z + 8, y : y + 24, x : x + 24]
        if cid == "c0":
            assert ann.tolist() == [True, True, True]
            np.testing.assert_array_equal(lab.numpy(), by_hand[stored])
        else:  # c3 lacks organ 4, so class B is not annotated there: its voxels (organ 1) read as background
            assert ann.tolist() == [True, True, False]
            np.testing.assert_array_equal(lab.numpy(), np.where(stored == 8, 1, 0))
        assert (lab == info.organ).any()  # centred on a voxel of its (subset) class
        seen.add((cid, info.organ))
    assert seen == {("c0", 1), ("c0", 2), ("c3", 1)}  # no centre on a class a case does not annotate
    # COMMON7: the lens (4) is outside the subset: background; organs 1 and 8 are classes 1 and 4
    ds7 = PatchDataset(store, ["c0"], **KW, subset=COMMON7)
    for i in range(len(ds7)):
        (z, y, x) = ds7.sample_info(i).start
        stored = store.read_label("c0")[z : z + 8, y : y + 24, x : x + 24]
        np.testing.assert_array_equal(ds7[i][1].numpy(), COMMON7.to_subset(stored))
        assert ds7[i][2].shape == (8,)


def test_annotated_mask_of_a_partial_case_in_structseg_space(store):
    ds = PatchDataset(store, ["c3"], **KW)
    assert ds.annotated("c3").tolist() == [c in (0, 1, 8) for c in range(NUM_CLASSES)]
    assert all(ds[i][2].tolist() == ds.annotated("c3").tolist() for i in range(3))
