"""Training-patch reads: the project's Zarr store + PatchDataset against the layouts users would otherwise pick.

Random 16x128x128 patches of 3 SLF channels + the label, from the same cases stored as:

- ``store: PatchDataset`` as training uses it (LRU cache of decompressed cases per worker): a fresh dataset
  per repetition, so each repetition pays the cold case loads (train.py rebuilds its DataLoader, hence
  its workers and caches, every epoch), and ``warm`` = patches once every case is cached;
- ``store: PatchDataset cache_bytes=0``: every patch read from the zstd chunks;
- ``nii.gz``: cropped HU + label per case (nibabel, array proxy slicing), SLF transforms applied per patch;
- ``npy memmap``: uncompressed (C, Z, Y, X) float16 + label, ``np.load(mmap_mode="r")``;
- ``blosc2 .b2nd`` laid out as nnU-Net v2 does (``comp_blosc2_params`` chunks/blocks, zstd clevel 8,
  opened per patch with ``blosc2.open(mode="r", mmap_mode="r", dparams={"nthreads": 1})``);
- prototype Zarr layouts written here from the same arrays (chunks across channels, smaller chunks, lz4,
  sharding), to see what changes on-disk reads.

Then the share of a CPU training step spent waiting for data with train.py's DataLoader settings.

Run: ``.venv/bin/python bench/bench_patches.py [--quick]``.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (
    alternate,
    dir_bytes,
    header,
    median,
    parser,
    phantom_or_synthetic,
    preprocess_store,
    set_threads,
    synthetic_case,
    table,
    verdict,
    write_structseg,
)

CHANNELS = ("SLF1", "SLF2", "SLF3")


def comp_blosc2_params(image_size, patch_size, bytes_per_pixel, l1=32768, l3=1441792, safety=0.8):
    """Block and chunk shapes as nnU-Net v2's ``nnUNetDatasetBlosc2.comp_blosc2_params`` computes them.

    image_size: (C, Z, Y, X); patch_size: (z, y, x). Blocks fit ~80% of L1, chunks tile blocks up to ~80% of
    L3 per core and at most ~1.5x the patch on average.
    """
    patch = np.array(patch_size)
    block = np.array((image_size[0], *[2 ** max(0, math.ceil(math.log2(i))) for i in patch]))
    while np.prod(block) * bytes_per_pixel > l1 * safety:
        order = np.argsort(block[1:] / patch)[::-1]
        k = 0
        while block[order[k] + 1] == 1:
            k += 1
        a = order[k] + 1
        block[a] = min(2 ** max(0, math.floor(math.log2(block[a] - 1))), image_size[a])
    block = np.array([min(i, j) for i, j in zip(image_size, block)])
    chunk = block.copy()
    while np.prod(chunk) * bytes_per_pixel < l3 * safety:
        if all(i == j for i, j in zip(chunk, image_size)):
            break
        order = np.argsort(chunk[1:] / block[1:])
        k = 0
        while chunk[order[k] + 1] == image_size[order[k] + 1] or patch[order[k]] == 1:
            k += 1
        a = order[k] + 1
        chunk[a] = min(chunk[a] + block[a], image_size[a])
        if np.mean([i / j for i, j in zip(chunk[1:], patch)]) > 1.5:
            chunk[a] -= block[a]
            break
    return tuple(int(b) for b in block), tuple(int(min(i, j)) for i, j in zip(image_size, chunk))


def _starts(rng: np.random.Generator, shape, patch, n):
    return [tuple(int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(shape, patch)) for _ in range(n)]


def _sl(start, patch):
    return tuple(slice(s, s + p) for s, p in zip(start, patch))


def build(work: Path, *, quick: bool):
    """Phantom cases -> StructSeg folder -> project store; plus every peer layout of the same arrays."""
    import blosc2
    import nibabel as nib
    import zarr
    from zarr.codecs import BloscCodec

    from sepnet.data.store import Store

    n_cases = 2 if quick else 3
    size = "small" if quick else "full"
    patch = (16, 32, 32) if quick else (16, 128, 128)
    crop = None if quick else (256, 256)
    ds = work / "dataset"
    src = ""
    for i in range(n_cases):
        if quick:  # seconds, not a realistic size
            case, src = synthetic_case(shape=(32, 96, 96), seed=i, case_id=f"case{i:02d}"), "synthetic"
        else:
            case, src = phantom_or_synthetic(size=size, seed=i, case_id=f"case{i:02d}")
        write_structseg(case, ds)
    t0 = time.perf_counter()
    preprocess_store(ds, work / "store", transforms=CHANNELS, crop=crop, chunks=(1,) + patch, workers=1)
    t_pre = time.perf_counter() - t0
    store = Store(work / "store")
    ids = store.case_ids
    arrays = {}
    for cid in ids:
        arrays[cid] = (store.read_image(cid, CHANNELS, dtype=np.float16), store.read_label(cid))
    # peers, from exactly the stored arrays
    hu_dir = work / "niigz"
    npy_dir = work / "npy"
    b2_dir = work / "b2nd"
    proto = {name: work / f"proto-{name}" for name in ("chunks-C16x128", "chunks-1x16x64", "lz4", "shard")}
    for d in (hu_dir, npy_dir, b2_dir, *proto.values()):
        d.mkdir(parents=True, exist_ok=True)
    from sepnet.data.readers import read_case

    for cid in ids:
        img, lab = arrays[cid]
        meta = store.meta(cid)
        case = read_case(ds / cid, format="structseg")
        box = tuple(slice(a, b) for a, b in meta.crop_box)
        hu = case.image[box]
        aff = np.diag([1.0, 1.0, 3.0, 1.0])
        # NIfTI arrays are (x, y, z): transpose so slicing matches the (z, y, x) patch
        nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), aff), hu_dir / f"{cid}_0000.nii.gz")
        nib.save(nib.Nifti1Image(np.ascontiguousarray(lab.transpose(2, 1, 0)), aff), hu_dir / f"{cid}_seg.nii.gz")
        np.save(npy_dir / f"{cid}.npy", img)
        np.save(npy_dir / f"{cid}_seg.npy", lab)
        blocks, chunks = comp_blosc2_params(img.shape, patch, img.itemsize)
        sblocks, schunks = comp_blosc2_params((1,) + lab.shape, patch, lab.itemsize)
        cp = {"codec": blosc2.Codec.ZSTD, "clevel": 8}
        blosc2.asarray(np.ascontiguousarray(img), urlpath=str(b2_dir / f"{cid}.b2nd"), chunks=chunks, blocks=blocks,
                       cparams=cp, mode="w")
        blosc2.asarray(np.ascontiguousarray(lab[None]), urlpath=str(b2_dir / f"{cid}_seg.b2nd"), chunks=schunks,
                       blocks=sblocks, cparams=cp, mode="w")
        c = len(CHANNELS)
        zstd = [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")]
        layouts = {
            "chunks-C16x128": dict(chunks=(c,) + patch, compressors=zstd),
            "chunks-1x16x64": dict(chunks=(1, patch[0], patch[1] // 2, patch[2] // 2), compressors=zstd),
            "lz4": dict(chunks=(1,) + patch, compressors=[BloscCodec(cname="lz4", clevel=3, shuffle="shuffle")]),
            "shard": {},
        }
        for name, kw in layouts.items():
            g = zarr.open_group(proto[name] / cid, mode="w")
            if name == "shard":
                # shards of whole slabs, inner chunks (C, 8, 32, 32): a patch decodes only the inner chunks it hits
                inner = (c, 8, 32, 32) if not quick else (c, 8, 16, 16)
                shard = tuple(min(s, n) for s, n in zip((c, patch[0]) + img.shape[2:], img.shape))
                a = g.create_array("image", shape=img.shape, dtype="float16", chunks=inner, shards=shard,
                                   compressors=zstd, fill_value=0)
                la = g.create_array("label", shape=lab.shape, dtype="uint8", chunks=inner[1:], shards=shard[1:],
                                    compressors=zstd, fill_value=0)
            else:
                a = g.create_array("image", shape=img.shape, dtype="float16", fill_value=0, **kw)
                la = g.create_array("label", shape=lab.shape, dtype="uint8", chunks=kw["chunks"][1:],
                                    compressors=kw["compressors"], fill_value=0)
            a[...] = img
            la[...] = lab
    sizes = {
        "store": sum(dir_bytes(store.path / "cases" / cid / k) for cid in ids for k in ("image", "label")),
        "nii.gz": dir_bytes(hu_dir), "npy": dir_bytes(npy_dir), "b2nd": dir_bytes(b2_dir),
        **{k: dir_bytes(v) for k, v in proto.items()},
    }
    return dict(store=store, ids=ids, arrays=arrays, patch=patch, hu_dir=hu_dir, npy_dir=npy_dir, b2_dir=b2_dir,
                proto=proto, sizes=sizes, source=src, t_pre=t_pre)


def readers(env, *, n: int, seed: int):
    """name -> callable reading ``n`` random patches (image float32 (3, z, y, x), label int64)."""
    import blosc2
    import nibabel as nib
    import zarr

    from sepnet.core.intensity import apply_transform
    from sepnet.data.sampler import PatchDataset

    ids, patch, arrays = env["ids"], env["patch"], env["arrays"]
    rng = np.random.default_rng(seed)
    plan = [(ids[int(rng.integers(len(ids)))],) for _ in range(n)]
    plan = [(cid, _starts(rng, arrays[cid][1].shape, patch, 1)[0]) for (cid,) in plan]
    epoch = [0]

    def patchdataset(cache: bool):
        def run():
            kw = {} if cache else {"cache_bytes": 0}
            ds = PatchDataset(env["store"], ids, channels=CHANNELS, patch=patch, samples_per_epoch=n, seed=seed,
                              **kw)
            epoch[0] += 1
            ds.set_epoch(epoch[0])
            for i in range(n):
                ds[i]
        return run

    warm_ds = PatchDataset(env["store"], ids, channels=CHANNELS, patch=patch, samples_per_epoch=n, seed=seed)
    for i in range(n):  # fill the cache once
        warm_ds[i]

    def warm():
        epoch[0] += 1
        warm_ds.set_epoch(epoch[0])
        for i in range(n):
            warm_ds[i]

    def niigz():
        for cid, st in plan:
            z, y, x = _sl(st, patch)
            hu = np.asarray(nib.load(env["hu_dir"] / f"{cid}_0000.nii.gz").dataobj[x, y, z]).transpose(2, 1, 0)
            np.stack([apply_transform(hu, c) for c in CHANNELS])
            np.asarray(nib.load(env["hu_dir"] / f"{cid}_seg.nii.gz").dataobj[x, y, z]).transpose(2, 1, 0).astype(
                np.int64)

    def npy():
        for cid, st in plan:
            sl = _sl(st, patch)
            img = np.load(env["npy_dir"] / f"{cid}.npy", mmap_mode="r")
            lab = np.load(env["npy_dir"] / f"{cid}_seg.npy", mmap_mode="r")
            img[(slice(None),) + sl].astype(np.float32)
            lab[sl].astype(np.int64)

    def b2nd():
        dp = {"nthreads": 1}
        for cid, st in plan:
            sl = _sl(st, patch)
            img = blosc2.open(urlpath=str(env["b2_dir"] / f"{cid}.b2nd"), mode="r", dparams=dp, mmap_mode="r")
            seg = blosc2.open(urlpath=str(env["b2_dir"] / f"{cid}_seg.b2nd"), mode="r", dparams=dp, mmap_mode="r")
            img[(slice(None),) + sl].astype(np.float32)
            seg[(0,) + sl].astype(np.int64)

    handles = {cid: (env["store"].image(cid), env["store"].label(cid)) for cid in ids}

    def store_open():
        for cid, st in plan:
            sl = _sl(st, patch)
            img, lab = handles[cid]
            img[(slice(None),) + sl].astype(np.float32)
            lab[sl].astype(np.int64)

    def proto(name):
        def run():
            for cid, st in plan:
                sl = _sl(st, patch)
                g = zarr.open_group(env["proto"][name] / cid, mode="r")
                g["image"][(slice(None),) + sl].astype(np.float32)
                g["label"][sl].astype(np.int64)
        return run

    return {
        "store: PatchDataset (LRU cache, cold per rep)": patchdataset(True),
        "store: PatchDataset warm cache": warm,
        "store: PatchDataset cache_bytes=0": patchdataset(False),
        "store: zarr arrays opened once, patch from chunks": store_open,
        "nii.gz (nibabel, HU + SLF per patch)": niigz,
        "npy memmap (uncompressed)": npy,
        "blosc2 .b2nd (nnU-Net v2 layout, mmap)": b2nd,
        "proto zarr chunks (3,16,128,128) zstd": proto("chunks-C16x128"),
        "proto zarr chunks (1,16,64,64) zstd": proto("chunks-1x16x64"),
        "proto zarr chunks (1,16,128,128) lz4": proto("lz4"),
        "proto zarr shards (3,16,Y,X) inner (3,8,32,32)": proto("shard"),
    }


def data_wait(env, *, quick: bool, iters: int):
    """Share of training-step wall time blocked on the DataLoader, with train.py's loader settings."""
    import torch

    from sepnet.core.networks import build
    from sepnet.data.sampler import PatchDataset
    from sepnet.jobs.config import TrainingConfig
    from sepnet.jobs.train import _RangeSampler

    tr = TrainingConfig()
    # the paper's step (base 24, batch 4) takes minutes on 1 shared core; a smaller model gives a shorter step,
    # hence an upper bound on the wait share of the real step
    batch = 2
    base = 4 if quick else 8
    patch = env["patch"]
    per_epoch = iters * batch
    ds = PatchDataset(env["store"], env["ids"], channels=["SLF1"], patch=patch, samples_per_epoch=per_epoch,
                      foreground_fraction=tr.foreground_fraction, seed=tr.seed)
    model = build("sepnet", in_channels=1, num_classes=23, base=base, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
    try:
        from sepnet.core.losses import build_loss

        loss_fn = build_loss("ath_exp_log", alpha=0.5)
        loss_name = "ath_exp_log"
    except ImportError:
        loss_fn = torch.nn.CrossEntropyLoss()
        loss_name = "cross-entropy (core.losses missing)"
    waits, steps = [], []
    ds.set_epoch(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=_RangeSampler(0, per_epoch),
                                         num_workers=tr.num_workers, generator=torch.Generator().manual_seed(0),
                                         pin_memory=False, persistent_workers=False)
    it = iter(loader)
    for _ in range(iters):
        t0 = time.perf_counter()
        image, label, annotated = next(it)
        t1 = time.perf_counter()
        loss = loss_fn(model(image), label, annotated=annotated)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        waits.append(t1 - t0)
        steps.append(t2 - t0)
    del it, loader
    return dict(batch=batch, base=base, loss=loss_name, waits=waits, steps=steps, workers=tr.num_workers)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    set_threads(args)
    header("Patch reads: Zarr store vs nii.gz, npy, blosc2 (nnU-Net v2)", args)
    reps = args.reps or (2 if args.quick else 5)
    n = 6 if args.quick else 30
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        env = build(Path(tmp), quick=args.quick)
        st = env["store"]
        shape = st.meta(env["ids"][0]).stored_shape
        print(f"Cases: {len(env['ids'])} {env['source']} cases, stored shape (z, y, x) {tuple(shape)} each, "
              f"channels {', '.join(CHANNELS)} float16 + label uint8; patch {env['patch']}; {n} patches per "
              f"repetition, {reps} repetitions, alternating; preprocess took {env['t_pre']:.1f} s.\n")
        fns = readers(env, n=n, seed=0)
        times = alternate(fns, reps=reps, warmup=1)
        rate = {k: n / median(v) for k, v in times.items()}
        size_key = {
            "store: PatchDataset (LRU cache, cold per rep)": "store", "store: PatchDataset warm cache": "store",
            "store: PatchDataset cache_bytes=0": "store", "store: zarr arrays opened once, patch from chunks": "store",
            "nii.gz (nibabel, HU + SLF per patch)": "nii.gz",
            "npy memmap (uncompressed)": "npy", "blosc2 .b2nd (nnU-Net v2 layout, mmap)": "b2nd",
            "proto zarr chunks (3,16,128,128) zstd": "chunks-C16x128",
            "proto zarr chunks (1,16,64,64) zstd": "chunks-1x16x64", "proto zarr chunks (1,16,128,128) lz4": "lz4",
            "proto zarr shards (3,16,Y,X) inner (3,8,32,32)": "shard",
        }
        b2 = rate["blosc2 .b2nd (nnU-Net v2 layout, mmap)"]
        nii = rate["nii.gz (nibabel, HU + SLF per patch)"]
        rows = [[k, rate[k], 1000 * median(times[k]) / n, rate[k] / b2, rate[k] / nii,
                 env["sizes"][size_key[k]] / 2**20] for k in fns]
        table(["layout / reader", "patches/s (median)", "ms/patch", "x blosc2", "x nii.gz", "MiB on disk"], rows)

        dw = data_wait(env, quick=args.quick, iters=3 if args.quick else 6)
        w, s = np.array(dw["waits"]), np.array(dw["steps"])
        share_all = w.sum() / s.sum()
        share_warm = w[1:].sum() / s[1:].sum() if len(w) > 1 else float("nan")
        print(f"Training step: SepNet base {dw['base']}, 1 channel (SLF1: a member trains on one transform), batch "
              f"{dw['batch']}, loss {dw['loss']}, DataLoader num_workers={dw['workers']}, pin_memory=False, "
              "persistent_workers=False (train.py's settings), fresh loader = one epoch. A paper-size step (base 24, "
              "batch 4) is ~10x longer, so these shares are upper bounds for it.\n")
        table(["iterations", "median step s", "first-batch wait s", "median wait s (after first)",
               "wait share (all)", "wait share (after first)"],
              [[len(s), median(s), w[0], median(w[1:]) if len(w) > 1 else float("nan"), share_all, share_warm]])
        cold = rate["store: PatchDataset (LRU cache, cold per rep)"]
        table(["target", "measured", "verdict"], [
            [">= blosc2 patches/s (PatchDataset, cold per rep)", f"{cold / b2:.2f}x", verdict(cold >= b2)],
            [">= blosc2 patches/s (PatchDataset, warm)", f"{rate['store: PatchDataset warm cache'] / b2:.2f}x",
             verdict(rate["store: PatchDataset warm cache"] >= b2)],
            [">= 20x nii.gz (PatchDataset, cold per rep)", f"{cold / nii:.1f}x", verdict(cold / nii >= 20)],
            ["data wait < 5% of a step (after the first batch)", f"{100 * share_warm:.1f}%",
             verdict(share_warm < 0.05)],
            ["data wait < 5% of a step (incl. first batch of the epoch)", f"{100 * share_all:.1f}%",
             verdict(share_all < 0.05)],
        ])


if __name__ == "__main__":
    main()
