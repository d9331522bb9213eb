"""Chunked Zarr v3 store of intensity-transformed CT copies, and the way back to the original geometry.

Layout (a directory on local or shared disk)::

    <store>/zarr.json                      root group (attrs: sepnet_store version)
    <store>/cases/<case_id>/               one group per *complete* case
        image    (C, Z, Y, X) float16      the requested transforms of HU, values in [0, 1]
        label    (Z, Y, X)    uint8        StructSeg ids (0 = background)
        fg_coords (N, 4)      int32        (class, z, y, x): up to ``FG_PER_CLASS`` voxels per class
        attrs: channels, geometry (original), grid (geometry before the crop, after any resampling),
               spacing_zyx (stored), crop_box, original_shape, annotated, source_hash, plan_hash,
               stats (per-case fingerprint), complete = true (set last)
    <store>/cases/.tmp-<case>-<pid>/       a case being written (ignored by readers)
    <store>/fingerprint.json               dataset fingerprint over the complete cases
    <store>/plan.json, plan.md             the preprocessing plan (crop, chunks, codec, transforms, spacing)

A case is written under a temporary name and committed by renaming its directory (``os.replace``),
so a crash never leaves a half-written case that :class:`Store` would accept. One writer per store.

Read performance (120x256x256, 3 channels + label, random 16x128x128 patches, 2 shared CPU cores):
chunks (1,16,128,128) zstd-3 ~20-35 ms per patch, lz4 ~18 ms, uncompressed ~7 ms; a whole case
~90-150 ms; a patch sliced from a decompressed in-memory case ~1.6 ms. The sampler therefore caches
whole decompressed cases per worker (LRU by bytes); the on-disk default stays zstd (2.4x smaller).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sepnet.core.errors import ConfigError, DataError
from sepnet.data.case import Case, Geometry

log = logging.getLogger(__name__)

STORE_VERSION = 1
FG_PER_CLASS = 1000  # foreground voxel coordinates kept per class per case (for the sampler)
HU_SAMPLE_PER_CASE = 10000  # body HU values kept per case for pooled percentiles
BODY_HU = -500.0  # "inside the body" threshold for the intensity fingerprint
CODECS = ("zstd", "lz4", "none")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


# --------------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseMeta:
    """What is needed to map stored arrays back to the original image.

    geometry: the original image geometry (shape (z, y, x) in voxels, spacing/origin (x, y, z) mm).
    grid: the geometry of the full volume after optional resampling and before the crop (equal to
        ``geometry`` when not resampled).
    crop_box: ((z0, z1), (y0, y1), (x0, x1)) half-open voxel ranges in ``grid``.
    spacing_zyx: stored voxel spacing (mm), array order.
    stored_shape: (z, y, x) of the stored arrays.
    """

    case_id: str
    channels: tuple[str, ...]
    geometry: Geometry
    grid: Geometry
    crop_box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    spacing_zyx: tuple[float, float, float]
    stored_shape: tuple[int, int, int]
    annotated: tuple[int, ...]
    source_hash: str
    stats: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def original_shape(self) -> tuple[int, int, int]:
        return tuple(self.geometry.shape)

    @property
    def resampled(self) -> bool:
        return not self.grid.same_grid(self.geometry)

    @property
    def present(self) -> tuple[int, ...]:
        """Organ ids (>= 1) with at least one voxel in the stored label."""
        counts = self.stats.get("stored_voxels", {})
        return tuple(sorted(int(k) for k, v in counts.items() if int(k) > 0 and v > 0))


def _meta_from_attrs(case_id: str, attrs: dict) -> CaseMeta:
    return CaseMeta(
        case_id=case_id,
        channels=tuple(attrs["channels"]),
        geometry=Geometry.from_dict(attrs["geometry"]),
        grid=Geometry.from_dict(attrs["grid"]),
        crop_box=tuple(tuple(int(v) for v in b) for b in attrs["crop_box"]),
        spacing_zyx=tuple(float(s) for s in attrs["spacing_zyx"]),
        stored_shape=tuple(int(s) for s in attrs["stored_shape"]),
        annotated=tuple(int(a) for a in attrs["annotated"]),
        source_hash=str(attrs["source_hash"]),
        stats=dict(attrs.get("stats", {})),
    )


def _read_group_attrs(case_dir: Path) -> dict | None:
    """Attributes of a case group straight from its zarr.json (fast; no zarr machinery)."""
    try:
        meta = json.loads((case_dir / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("attributes", {}) or {}


# --------------------------------------------------------------------------------------------------
# the store (reading)
# --------------------------------------------------------------------------------------------------


class Store:
    """Read access to a preprocessed store. Picklable (holds only the path; handles open lazily).

    Raises:
        DataError: the store folder does not exist or is not a sepnet store.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file() or not (self.path / "cases").is_dir():
            raise DataError(
                f"{self.path}: not a sepnet Zarr store (missing zarr.json or cases/); run `sepnet preprocess`"
            )
        self._meta: dict[str, CaseMeta] = {}

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def __getstate__(self) -> dict:
        return {"path": self.path, "_meta": self._meta}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def case_ids(self) -> list[str]:
        """Sorted ids of complete cases (temporary and unfinished groups are ignored)."""
        out = []
        for d in (self.path / "cases").iterdir():
            if d.name.startswith(".") or not d.is_dir():
                continue
            attrs = _read_group_attrs(d)
            if attrs and attrs.get("complete") is True:
                out.append(d.name)
        return sorted(out)

    def _case_dir(self, case_id: str) -> Path:
        d = self.path / "cases" / case_id
        if case_id.startswith(".") or not (d / "zarr.json").is_file():
            raise DataError(f"{self.path}: no case {case_id!r} in the store")
        return d

    def meta(self, case_id: str) -> CaseMeta:
        if case_id not in self._meta:
            attrs = _read_group_attrs(self._case_dir(case_id))
            if not attrs or attrs.get("complete") is not True:
                raise DataError(f"{self.path}: case {case_id!r} is incomplete; rerun `sepnet preprocess`")
            self._meta[case_id] = _meta_from_attrs(case_id, attrs)
        return self._meta[case_id]

    def channels(self, case_id: str) -> tuple[str, ...]:
        return self.meta(case_id).channels

    def image(self, case_id: str):
        """The zarr array (C, Z, Y, X) float16 of case ``case_id`` (lazy)."""
        import zarr

        return zarr.open_array(self._case_dir(case_id) / "image", mode="r")

    def label(self, case_id: str):
        """The zarr array (Z, Y, X) uint8 of case ``case_id`` (lazy)."""
        import zarr

        return zarr.open_array(self._case_dir(case_id) / "label", mode="r")

    def channel_index(self, case_id: str, channels: Sequence[str]) -> list[int]:
        have = self.channels(case_id)
        missing = [c for c in channels if c not in have]
        if missing:
            raise DataError(f"{self.path}: case {case_id!r} has no channel(s) {missing}; stored: {list(have)}")
        return [have.index(c) for c in channels]

    def read_image(self, case_id: str, channels: Sequence[str] | None = None, *, dtype=np.float32) -> np.ndarray:
        """(C, Z, Y, X) array of the requested channels (default all), float32 unless ``dtype`` says."""
        arr = self.image(case_id)
        if channels is None:
            data = arr[...]
        else:
            idx = self.channel_index(case_id, channels)
            if idx == list(range(arr.shape[0])):
                data = arr[...]
            else:
                data = np.stack([arr[i] for i in idx])
        return data.astype(dtype, copy=False)

    def read_label(self, case_id: str) -> np.ndarray:
        """(Z, Y, X) uint8."""
        return np.asarray(self.label(case_id)[...], dtype=np.uint8)

    def fg_coords(self, case_id: str) -> np.ndarray:
        """(N, 4) int32 rows (class, z, y, x) of sampled foreground voxels (up to FG_PER_CLASS per class)."""
        import zarr

        return np.asarray(zarr.open_array(self._case_dir(case_id) / "fg_coords", mode="r")[...], dtype=np.int64)

    def fingerprint(self) -> dict:
        """The dataset fingerprint (``fingerprint.json``); recomputed from case attrs if the file is missing."""
        p = self.path / "fingerprint.json"
        if p.is_file():
            return json.loads(p.read_text())
        return compute_fingerprint(self)

    def plan(self) -> dict:
        p = self.path / "plan.json"
        return json.loads(p.read_text()) if p.is_file() else {}


# --------------------------------------------------------------------------------------------------
# geometry helpers: crop box, resampling, to_original / crop_like
# --------------------------------------------------------------------------------------------------


def centre_crop_box(
    shape: Sequence[int], crop: Sequence[int] | None
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Half-open ranges ((0, Z), (y0, y1), (x0, x1)) of the in-plane centre crop ``crop`` = (cy, cx) voxels.

    An axis no larger than its crop is kept whole (padding is the sampler's job); ``crop=None`` keeps all.
    """
    z, y, x = (int(s) for s in shape)
    box = [(0, z)]
    for n, c in zip((y, x), crop if crop is not None else (None, None)):
        if c is None or n <= int(c):
            box.append((0, n))
        else:
            s = (n - int(c)) // 2
            box.append((s, s + int(c)))
    return tuple(box)  # type: ignore[return-value]


def _sitk_image(array: np.ndarray, geom: Geometry):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in geom.spacing))
    img.SetOrigin(tuple(float(o) for o in geom.origin))
    img.SetDirection(tuple(float(d) for d in geom.direction))
    return img


def resampled_grid(geom: Geometry, spacing_zyx: Sequence[float]) -> Geometry:
    """Geometry covering the same physical extent as ``geom`` at ``spacing_zyx`` (mm), same origin/direction."""
    new_xyz = (float(spacing_zyx[2]), float(spacing_zyx[1]), float(spacing_zyx[0]))
    old_zyx = geom.spacing_zyx
    shape = tuple(
        max(1, int(round(n * o / s))) for n, o, s in zip(geom.shape, old_zyx, (new_xyz[2], new_xyz[1], new_xyz[0]))
    )
    return Geometry(spacing=new_xyz, origin=tuple(geom.origin), direction=tuple(geom.direction), shape=shape)


def resample(array: np.ndarray, src: Geometry, dst: Geometry, *, order: int, fill: float = 0) -> np.ndarray:
    """Resample a (Z, Y, X) array from grid ``src`` to grid ``dst`` with SimpleITK.

    order 0 = nearest neighbour (labels), 1 = linear (HU, probabilities). Output dtype: the input's for
    order 0, float32 for order 1. Points outside ``src`` get ``fill``.
    """
    import SimpleITK as sitk

    if order not in (0, 1):
        raise ValueError(f"resample: order must be 0 (nearest) or 1 (linear), got {order}")
    a = np.asarray(array)
    if order == 1:
        a = a.astype(np.float32, copy=False)
    ref = sitk.Image([int(s) for s in reversed(dst.shape)], sitk.sitkUInt8)
    ref.SetSpacing(tuple(float(s) for s in dst.spacing))
    ref.SetOrigin(tuple(float(o) for o in dst.origin))
    ref.SetDirection(tuple(float(d) for d in dst.direction))
    interp = sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear
    out = sitk.Resample(_sitk_image(a, src), ref, sitk.Transform(), interp, float(fill))
    return sitk.GetArrayFromImage(out)


def to_original(array: np.ndarray, meta: CaseMeta, *, order: int = 0, fill: float = 0) -> np.ndarray:
    """Map an array (..., Z, Y, X) on the stored grid back to the original image geometry.

    Undoes the crop by pasting into a ``fill`` array of the (resampled) full grid, then, if the case was
    resampled, resamples to the original grid (``order`` 0 = nearest for labels, 1 = linear for
    probabilities/intensities). Returns (..., *meta.original_shape) with the input dtype (float32 for
    resampled order-1 output).
    """
    a = np.asarray(array)
    if tuple(a.shape[-3:]) != tuple(meta.stored_shape):
        raise DataError(
            f"to_original: case {meta.case_id!r} array has spatial shape {a.shape[-3:]}, stored shape is "
            f"{meta.stored_shape}"
        )
    lead = a.shape[:-3]
    full = np.full(lead + tuple(meta.grid.shape), fill, dtype=a.dtype)
    (z0, z1), (y0, y1), (x0, x1) = meta.crop_box
    full[..., z0:z1, y0:y1, x0:x1] = a
    if not meta.resampled:
        return full
    flat = full.reshape((-1,) + tuple(meta.grid.shape))
    out = [resample(v, meta.grid, meta.geometry, order=order, fill=fill) for v in flat]
    return np.stack(out).reshape(lead + tuple(meta.geometry.shape))


def crop_like(array: np.ndarray, meta: CaseMeta, *, order: int = 1, fill: float = 0) -> np.ndarray:
    """Forward direction: an array (..., Z, Y, X) in the original geometry -> the stored grid.

    Resamples (``order`` 1 = linear for HU/intensities, 0 = nearest for labels; points outside the
    original image get ``fill``, e.g. -1024 for HU) if the case was resampled, then applies the crop box.
    Used by predict for new images.
    """
    a = np.asarray(array)
    if tuple(a.shape[-3:]) != tuple(meta.original_shape):
        raise DataError(
            f"crop_like: case {meta.case_id!r} array has spatial shape {a.shape[-3:]}, original shape is "
            f"{meta.original_shape}"
        )
    if meta.resampled:
        lead = a.shape[:-3]
        flat = a.reshape((-1,) + tuple(meta.original_shape))
        a = np.stack([resample(v, meta.geometry, meta.grid, order=order, fill=fill) for v in flat])
        a = a.reshape(lead + tuple(meta.grid.shape))
    (z0, z1), (y0, y1), (x0, x1) = meta.crop_box
    return a[..., z0:z1, y0:y1, x0:x1]


# --------------------------------------------------------------------------------------------------
# preprocessing (writing)
# --------------------------------------------------------------------------------------------------


@dataclass
class PreprocessReport:
    """Outcome of :func:`preprocess`. ``failed`` maps case id -> one-line message naming file and cause."""

    store: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class _Plan:
    transforms: tuple[str, ...]
    crop: tuple[int, int] | None
    spacing: tuple[float, float, float] | None
    chunks: tuple[int, int, int, int]
    codec: str
    clevel: int

    def to_dict(self) -> dict:
        return {
            "transforms": list(self.transforms),
            "crop": list(self.crop) if self.crop else None,
            "spacing_zyx": list(self.spacing) if self.spacing else None,
            "chunks": list(self.chunks),
            "codec": self.codec,
            "clevel": self.clevel,
            "dtype": {"image": "float16", "label": "uint8"},
            "store_version": STORE_VERSION,
        }

    def key(self) -> str:
        """Hash of everything that changes the stored arrays (codec/chunks do not change values but do layout)."""
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _codecs(codec: str, clevel: int):
    from zarr.codecs import BloscCodec

    if codec == "none":
        return None
    return [BloscCodec(cname=codec, clevel=int(clevel), shuffle="shuffle")]


def _source_files(ref) -> list[Path]:
    """Files a case is read from, for the change hash. Works with any CaseRef that names its paths."""
    cands: list = []
    for attr in ("sources", "paths", "files", "image", "label", "masks", "path"):
        v = getattr(ref, attr, None)
        if v is None:
            continue
        if isinstance(v, dict):
            cands.extend(v.values())
        elif isinstance(v, (list, tuple, set)):
            cands.extend(v)
        else:
            cands.append(v)
    files: set[Path] = set()
    for c in cands:
        if not isinstance(c, (str, os.PathLike)):
            continue
        p = Path(c)
        if p.is_dir():
            files.update(q for q in p.rglob("*") if q.is_file())
        elif p.exists():
            files.add(p)
    return sorted(files)


def source_hash(ref) -> str:
    """sha1 over (path, mtime_ns, size) of the case's source files; changes when any file changes."""
    h = hashlib.sha1()
    files = _source_files(ref)
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    if not files:  # nothing to stat: never consider the stored copy up to date
        h.update(f"nofiles-{time.time_ns()}".encode())
    return h.hexdigest()[:20]


def _case_seed(case_id: str) -> int:
    return int.from_bytes(hashlib.sha1(case_id.encode()).digest()[:8], "little")


def _fg_coords(label: np.ndarray, *, case_id: str, per_class: int = FG_PER_CLASS) -> np.ndarray:
    """(N, 4) int32 rows (class, z, y, x): a deterministic random subset of each organ's voxels."""
    rng = np.random.default_rng(_case_seed(case_id))
    rows = []
    flat = label.ravel()
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=256)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for c in np.flatnonzero(counts):
        if c == 0:
            continue
        idx = order[starts[c] : starts[c + 1]]
        if idx.size > per_class:
            idx = np.sort(rng.choice(idx, size=per_class, replace=False))
        zyx = np.stack(np.unravel_index(idx, label.shape), axis=1)
        rows.append(np.concatenate([np.full((idx.size, 1), c), zyx], axis=1))
    if not rows:
        return np.zeros((0, 4), dtype=np.int32)
    return np.concatenate(rows).astype(np.int32)


def _case_stats(case: Case, stored_label: np.ndarray) -> tuple[dict, np.ndarray]:
    """Per-case fingerprint entries (JSON-able) and a body HU sample (int16) for pooled percentiles."""
    geom = case.geometry
    voxel_mm3 = float(np.prod(geom.spacing))
    hu = case.image
    body = hu[hu > BODY_HU]
    rng = np.random.default_rng(_case_seed(case.case_id) + 1)
    sample = body if body.size <= HU_SAMPLE_PER_CASE else rng.choice(body, HU_SAMPLE_PER_CASE, replace=False)
    b64 = body.astype(np.float64)
    counts = np.bincount(case.label.ravel(), minlength=23) if case.label is not None else np.zeros(23, int)
    stored = np.bincount(stored_label.ravel(), minlength=23)
    stats = {
        "shape": list(map(int, geom.shape)),
        "spacing_zyx": list(geom.spacing_zyx),
        "body_voxels": int(body.size),
        "hu_sum": float(b64.sum()),
        "hu_sumsq": float((b64 * b64).sum()),
        "hu_percentiles": (
            {str(q): float(v) for q, v in zip((0.5, 50, 99.5), np.percentile(body, (0.5, 50, 99.5)))}
            if body.size
            else {}
        ),
        "voxels": {str(c): int(n) for c, n in enumerate(counts) if n and c > 0},
        "volume_cm3": {str(c): float(n) * voxel_mm3 / 1000.0 for c, n in enumerate(counts) if n and c > 0},
        "stored_voxels": {str(c): int(n) for c, n in enumerate(stored) if n},
    }
    return stats, np.asarray(sample, dtype=np.int16)


def _write_case(case: Case, case_dir: Path, plan: _Plan, src_hash: str) -> None:
    """Transform, (resample,) crop and write one case under a temp name, then commit by rename."""
    import zarr

    from sepnet.core.intensity import apply_transform

    if case.label is None:
        raise DataError(f"{case.case_id}: no label; the store holds labelled training cases only")
    if case.image.shape != case.label.shape:
        raise DataError(f"{case.case_id}: image shape {case.image.shape} != label shape {case.label.shape}")
    geom = case.geometry
    hu: np.ndarray = case.image
    label: np.ndarray = case.label.astype(np.uint8, copy=False)
    grid = geom
    if plan.spacing is not None:
        grid = resampled_grid(geom, plan.spacing)
        hu = resample(hu.astype(np.float32), geom, grid, order=1, fill=-1024.0)
        label = resample(label, geom, grid, order=0, fill=0)
    box = centre_crop_box(grid.shape, plan.crop)
    sl = tuple(slice(a, b) for a, b in box)
    hu_c = hu[sl]
    lab_c = np.ascontiguousarray(label[sl])
    stats, hu_sample = _case_stats(case, lab_c)
    fg = _fg_coords(lab_c, case_id=case.case_id)

    parent = case_dir.parent
    tmp = parent / f"{_TMP_PREFIX}{case.case_id}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    g = zarr.open_group(tmp, mode="w")
    shape = (len(plan.transforms),) + lab_c.shape
    chunks = tuple(min(c, s) for c, s in zip(plan.chunks, shape))
    comp = _codecs(plan.codec, plan.clevel)
    img = g.create_array("image", shape=shape, dtype="float16", chunks=chunks, compressors=comp, fill_value=0)
    for i, name in enumerate(plan.transforms):
        img[i] = apply_transform(hu_c, name).astype(np.float16)
    g.create_array("label", shape=lab_c.shape, dtype="uint8", chunks=chunks[1:], compressors=comp, fill_value=0)[
        ...
    ] = lab_c
    g.create_array("fg_coords", shape=fg.shape, dtype="int32", chunks=(max(1, fg.shape[0]), 4), fill_value=0)[...] = fg
    g.create_array("hu_sample", shape=hu_sample.shape, dtype="int16", chunks=(max(1, hu_sample.size),), fill_value=0)[
        ...
    ] = hu_sample
    attrs = {
        "case_id": case.case_id,
        "channels": list(plan.transforms),
        "geometry": geom.to_dict(),
        "grid": grid.to_dict(),
        "crop_box": [list(b) for b in box],
        "spacing_zyx": list(grid.spacing_zyx),
        "original_shape": list(map(int, geom.shape)),
        "stored_shape": list(map(int, lab_c.shape)),
        "annotated": [int(a) for a in case.annotated],
        "sources": [str(s) for s in case.sources],
        "source_hash": src_hash,
        "plan_hash": plan.key(),
        "stats": stats,
    }
    g.attrs.update(attrs)
    g.attrs["complete"] = True  # written last: only a fully written group carries it
    # Commit: move any previous version aside, rename the new one in, then drop the old one.
    old = None
    if case_dir.exists():
        old = parent / f"{_OLD_PREFIX}{case.case_id}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(case_dir, old)
    os.replace(tmp, case_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _process_one(ref, fmt: str, store_path: str, plan: _Plan, src_hash: str) -> tuple[str, str, str]:
    """Worker entry (top level, spawn-safe). Returns (case_id, "done"|"failed", message)."""
    from sepnet.data import readers

    case_id = str(ref.case_id)
    try:
        case = readers.read_case(ref, format=fmt, require_label=True)
        _write_case(case, Path(store_path) / "cases" / case_id, plan, src_hash)
    except DataError as exc:
        return case_id, "failed", str(exc)
    except Exception as exc:  # a reader bug or an unforeseen file problem: report, keep the others going
        log.debug("case %s failed:\n%s", case_id, traceback.format_exc())
        return case_id, "failed", f"{', '.join(map(str, _source_files(ref))) or case_id}: {type(exc).__name__}: {exc}"
    return case_id, "done", ""


def _init_store(path: Path) -> None:
    import zarr

    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: store path exists and is not a directory")
    if (path / "zarr.json").is_file():
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
        if "sepnet_store" not in attrs:
            raise DataError(f"{path}: a Zarr group but not a sepnet store; choose another folder")
    else:
        root = zarr.open_group(path, mode="a")
        root.attrs["sepnet_store"] = STORE_VERSION
    (path / "cases").mkdir(parents=True, exist_ok=True)
    if not (path / "cases" / "zarr.json").is_file():
        zarr.open_group(path / "cases", mode="a")
    # Leftovers of a crashed run (one writer per store, so nobody else owns them).
    for d in (path / "cases").iterdir():
        if d.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            shutil.rmtree(d, ignore_errors=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_options(transforms, crop, spacing, chunks, codec, clevel) -> _Plan:
    from sepnet.core.intensity import TRANSFORMS

    transforms = tuple(str(t) for t in transforms)
    bad = [t for t in transforms if t not in TRANSFORMS]
    if not transforms or bad:
        raise ConfigError(f"preprocess.transforms: unknown {bad or 'empty list'}; known: {', '.join(TRANSFORMS)}")
    if len(set(transforms)) != len(transforms):
        raise ConfigError(f"preprocess.transforms: duplicates in {list(transforms)}")
    if crop is not None:
        crop = tuple(int(c) for c in crop)
        if len(crop) != 2 or min(crop) < 1:
            raise ConfigError(f"preprocess.crop: expected two positive in-plane sizes (y, x) or none, got {crop}")
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ConfigError(f"preprocess.spacing: expected three positive (z, y, x) mm, got {spacing}")
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != 4 or min(chunks) < 1:
        raise ConfigError(f"preprocess.chunks: expected four positive (channel, z, y, x) sizes, got {chunks}")
    if codec not in CODECS:
        raise ConfigError(f"preprocess.codec: {codec!r} not one of {', '.join(CODECS)}")
    return _Plan(transforms, crop, spacing, chunks, str(codec), int(clevel))


def _plan_md(plan: _Plan, n_cases: int) -> str:
    d = plan.to_dict()
    return (
        "# sepnet preprocessing plan\n\n"
        f"- cases: {n_cases}\n"
        f"- transforms (image channels): {', '.join(d['transforms'])}\n"
        f"- in-plane centre crop (y, x): {d['crop'] or 'none'} (smaller axes kept whole; the sampler pads)\n"
        f"- resampling to (z, y, x) mm: {d['spacing_zyx'] or 'none (original spacing)'}"
        " (HU linear, labels nearest)\n"
        f"- chunks (channel, z, y, x): {d['chunks']}; codec: {d['codec']} (clevel {d['clevel']}, byte shuffle)\n"
        "- image float16 in [0, 1] (0 = air), label uint8\n"
    )


def preprocess(
    dataset: str | os.PathLike,
    store: str | os.PathLike,
    *,
    format: str = "auto",
    transforms: Sequence[str] = ("SLF1", "SLF2", "SLF3"),
    crop: Sequence[int] | None = (256, 256),
    spacing: Sequence[float] | None = None,
    chunks: Sequence[int] = (1, 16, 128, 128),
    codec: str = "zstd",
    clevel: int = 3,
    workers: int = 2,
    progress: bool = True,
) -> PreprocessReport:
    """Convert a labelled dataset into a Zarr store (see module docstring for the layout).

    Args:
        dataset: dataset folder (any format ``sepnet.data.readers`` knows).
        store: output folder; created if missing; complete, unchanged cases are skipped.
        transforms: intensity presets, one float16 channel each.
        crop: in-plane (y, x) centre crop in voxels of the (resampled) grid; None = off.
        spacing: target (z, y, x) voxel spacing in mm; None = keep the original grid.
        chunks: (channel, z, y, x) chunk shape; codec: zstd | lz4 (Blosc, byte shuffle) | none.
        workers: processes (spawn); 1 = in this process.

    Returns:
        PreprocessReport; a case whose reading fails is listed in ``failed`` and skipped.
    """
    from sepnet.data import readers

    t0 = time.perf_counter()
    plan = _check_options(transforms, crop, spacing, chunks, codec, clevel)
    store = Path(store)
    _init_store(store)
    refs = readers.list_cases(dataset, format=format)
    report = PreprocessReport(store=store)
    todo = []
    for ref in refs:
        cid = str(ref.case_id)
        if not cid or cid.startswith(".") or "/" in cid or "\\" in cid:
            report.failed[cid] = f"{dataset}: case id {cid!r} is not a valid folder name"
            continue
        h = source_hash(ref)
        attrs = _read_group_attrs(store / "cases" / cid)
        if (
            attrs
            and attrs.get("complete") is True
            and attrs.get("source_hash") == h
            and attrs.get("plan_hash") == plan.key()
        ):
            report.skipped.append(cid)
        else:
            todo.append((ref, h))
    _atomic_write_text(store / "plan.json", json.dumps(plan.to_dict(), indent=2) + "\n")
    _atomic_write_text(store / "plan.md", _plan_md(plan, len(refs)))

    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="preprocess", unit="case")

    def _collect(res: tuple[str, str, str]) -> None:
        cid, status, msg = res
        if status == "done":
            report.done.append(cid)
        else:
            report.failed[cid] = msg
            log.warning("preprocess: failed case %s: %s", cid, msg)  # one line per bad case
        if bar is not None:
            bar.update(1)

    try:
        if workers <= 1 or len(todo) <= 1:
            for ref, h in todo:
                _collect(_process_one(ref, format, str(store), plan, h))
        else:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as ex:
                futs = [ex.submit(_process_one, ref, format, str(store), plan, h) for ref, h in todo]
                for f in cf.as_completed(futs):
                    _collect(f.result())
    finally:
        if bar is not None:
            bar.close()
        # The fingerprint always describes what is complete now (also after an interrupted run).
        fp = compute_fingerprint(Store(store))
        _atomic_write_text(store / "fingerprint.json", json.dumps(fp, indent=2) + "\n")
    report.done.sort()
    report.skipped.sort()
    report.seconds = time.perf_counter() - t0
    return report


# --------------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------------


def _axis_stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {}
    return {
        "median": [float(v) for v in np.median(values, axis=0)],
        "min": [float(v) for v in values.min(axis=0)],
        "max": [float(v) for v in values.max(axis=0)],
    }


def compute_fingerprint(store: Store) -> dict:
    """nnU-Net-like dataset fingerprint over the store's complete cases.

    Organ voxel counts and volumes (cm3) are measured on the original labels; HU statistics inside the
    body (HU > -500) on the original images (per case exact; dataset mean/std exact, dataset percentiles
    from a pooled sample of up to 10000 body voxels per case); class frequencies on the stored labels
    (what training sees), background included.
    """
    import zarr

    ids = store.case_ids
    cases: dict[str, dict] = {}
    spacings, shapes, samples = [], [], []
    n_body = 0
    s1 = s2 = 0.0
    tot_vox: dict[str, int] = {}
    tot_cm3: dict[str, float] = {}
    stored_tot: dict[str, int] = {}
    for cid in ids:
        m = store.meta(cid)
        st = m.stats
        cases[cid] = {
            "shape": st["shape"],
            "spacing_zyx": st["spacing_zyx"],
            "stored_shape": list(m.stored_shape),
            "annotated": list(m.annotated),
            "hu_percentiles": st["hu_percentiles"],
            "hu_mean": st["hu_sum"] / st["body_voxels"] if st["body_voxels"] else None,
            "voxels": st["voxels"],
            "volume_cm3": st["volume_cm3"],
        }
        spacings.append(st["spacing_zyx"])
        shapes.append(st["shape"])
        n_body += st["body_voxels"]
        s1 += st["hu_sum"]
        s2 += st["hu_sumsq"]
        for k, v in st["voxels"].items():
            tot_vox[k] = tot_vox.get(k, 0) + int(v)
        for k, v in st["volume_cm3"].items():
            tot_cm3[k] = tot_cm3.get(k, 0.0) + float(v)
        for k, v in st["stored_voxels"].items():
            stored_tot[k] = stored_tot.get(k, 0) + int(v)
        samples.append(np.asarray(zarr.open_array(store.path / "cases" / cid / "hu_sample", mode="r")[...]))
    pooled = np.concatenate(samples) if samples else np.zeros(0)
    mean = s1 / n_body if n_body else None
    std = float(np.sqrt(max(s2 / n_body - mean * mean, 0.0))) if n_body else None
    total_stored = sum(stored_tot.values())
    return {
        "num_cases": len(ids),
        "case_ids": ids,
        "spacing_zyx": _axis_stats(np.asarray(spacings, dtype=float).reshape(-1, 3)),
        "shape_zyx": _axis_stats(np.asarray(shapes, dtype=float).reshape(-1, 3)),
        "intensity": {
            "body_threshold_hu": BODY_HU,
            "body_voxels": n_body,
            "mean": mean,
            "std": std,
            "percentiles": (
                {str(q): float(v) for q, v in zip((0.5, 50, 99.5), np.percentile(pooled, (0.5, 50, 99.5)))}
                if pooled.size
                else {}
            ),
        },
        "organs": {
            "voxels": dict(sorted(tot_vox.items(), key=lambda kv: int(kv[0]))),
            "volume_cm3": dict(sorted(tot_cm3.items(), key=lambda kv: int(kv[0]))),
            "cases_present": {
                k: sum(1 for c in cases.values() if c["voxels"].get(k, 0) > 0) for k in sorted(tot_vox, key=int)
            },
        },
        "class_frequencies": {k: v / total_stored for k, v in sorted(stored_tot.items(), key=lambda kv: int(kv[0]))}
        if total_stored
        else {},
        "cases": cases,
    }
