"""One case preparation, shared by the store writer (training) and ``sepnet predict`` (inference):
HU on the original grid -> resample (optional) -> centre crop -> intensity transforms -> plan dtype.

A :class:`Plan` records every parameter of that chain (each transform's HU breakpoints and values, not
just its name), so a store or a study can be replayed exactly and ``Plan.key()`` changes whenever any
parameter does (a rerun of ``sepnet preprocess`` then rewrites the cases).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import numpy as np

from sepnet.core.errors import ConfigError, DataError
from sepnet.data.case import Geometry
from sepnet.data.grid import CaseMeta, centre_crop_box, resample, resampled_grid

STORE_VERSION = 2  # 2: full plan (breakpoints, fill, dtype) and per-array checksums in each case
CODECS = ("zstd", "lz4", "none")
DTYPES = ("float16", "float32")  # dtypes the transformed channels may be stored in
_PLAN_KEYS = ("store_version", "transforms", "crop", "spacing_zyx", "fill_hu", "dtype", "chunks", "codec", "clevel")


@dataclass(frozen=True)
class TransformSpec:
    """One intensity transform with every parameter: name (channel name), HU breakpoints, values."""

    name: str
    hu_breakpoints: tuple[float, ...]
    values: tuple[float, ...]

    @classmethod
    def preset(cls, name: str) -> TransformSpec:
        """The preset ``name`` of ``sepnet.core.intensity.PRESETS``; ConfigError naming the known ones."""
        from sepnet.core.intensity import PRESETS

        if name not in PRESETS:
            raise ConfigError(f"preprocess.transforms: unknown {name!r}; known: {', '.join(PRESETS)}")
        h, v = PRESETS[name]
        return cls(str(name), tuple(float(x) for x in h), tuple(float(x) for x in v))

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """float32 array of the transform of ``hu`` (any shape, any real dtype)."""
        from sepnet.core import intensity

        return intensity.slf(hu, self.hu_breakpoints, self.values)

    def to_dict(self) -> dict:
        return {"name": self.name, "hu_breakpoints": list(self.hu_breakpoints), "values": list(self.values)}


@dataclass(frozen=True)
class Plan:
    """Every parameter of the case preparation; ``key()`` hashes all that changes stored values/layout.

    transforms: the channels, in store order. crop: in-plane (y, x) voxels or None. spacing_zyx: target
    spacing (z, y, x) mm or None (no resampling). fill_hu: HU outside the image after resampling (-1024).
    dtype: dtype of the transformed channels on disk and as fed to the models ("float16").
    chunks/codec/clevel: on-disk layout (hashed: they change the files, not the values).
    """

    transforms: tuple[TransformSpec, ...]
    crop: tuple[int, int] | None
    spacing_zyx: tuple[float, float, float] | None
    fill_hu: float = -1024.0
    dtype: str = "float16"
    chunks: tuple[int, int, int, int] = (1, 16, 128, 128)
    codec: str = "zstd"
    clevel: int = 3

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.transforms)

    def transform(self, name: str) -> TransformSpec:
        for t in self.transforms:
            if t.name == name:
                return t
        raise DataError(f"plan: no channel {name!r}; the plan has {list(self.channels)}")

    def to_dict(self) -> dict:
        """JSON-able dict (what plan.json holds); ``from_dict`` inverts it exactly."""
        return {
            "store_version": STORE_VERSION,
            "transforms": [t.to_dict() for t in self.transforms],
            "crop": list(self.crop) if self.crop is not None else None,
            "spacing_zyx": list(self.spacing_zyx) if self.spacing_zyx is not None else None,
            "fill_hu": float(self.fill_hu),
            "dtype": self.dtype,
            "label_dtype": "uint8",
            "chunks": list(self.chunks),
            "codec": self.codec,
            "clevel": int(self.clevel),
        }

    @classmethod
    def from_dict(cls, d: dict, *, source: str) -> Plan:
        """Raise DataError naming ``source`` when the plan lacks a parameter (e.g. an old plan.json with
        transform names only) or carries one this code cannot reproduce (unknown dtype, newer version)."""
        if not isinstance(d, dict):
            raise DataError(f"{source}: preprocessing plan is not a mapping")
        version = d.get("store_version")
        if isinstance(version, int) and version > STORE_VERSION:
            raise DataError(f"{source}: plan of store version {version}, newer than this sepnet's "
                            f"{STORE_VERSION}; upgrade sepnet")
        if version != STORE_VERSION or any(not isinstance(t, dict) for t in d.get("transforms") or []):
            raise DataError(f"{source}: preprocessing plan of an older sepnet (store version {version}; no "
                            "transform breakpoints, fill or dtype); rerun `sepnet preprocess`")
        missing = [k for k in _PLAN_KEYS if k not in d]
        if missing:
            raise DataError(f"{source}: preprocessing plan is missing {missing}; rerun `sepnet preprocess`")
        try:
            plan = _plan_from_values(d)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{source}: preprocessing plan cannot be reproduced: {exc}") from None
        return plan

    def key(self) -> str:
        """16 hex digits of sha1 over every parameter (``to_dict``), store version included."""
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def with_spacing(self, spacing_zyx) -> Plan:
        """The same plan resampling to ``spacing_zyx`` (z, y, x) mm (None = no resampling)."""
        return replace(self, spacing_zyx=_spacing(spacing_zyx, key="spacing_zyx"))


def _spacing(spacing, *, key: str) -> tuple[float, float, float] | None:
    if spacing is None:
        return None
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(np.isfinite(sp)) or min(sp) <= 0:
        raise ConfigError(f"preprocess.{key}: expected three positive (z, y, x) mm, got {list(spacing)}")
    return sp  # type: ignore[return-value]


def _checked_transform(t: TransformSpec) -> TransformSpec:
    """Raise ValueError when the breakpoints/values are not a valid piecewise-linear map."""
    t.apply(np.zeros(1, np.float32))  # slf validates breakpoints and values
    return t


def _plan_from_values(d: dict) -> Plan:
    transforms = tuple(
        _checked_transform(TransformSpec(str(t["name"]), tuple(float(h) for h in t["hu_breakpoints"]),
                                         tuple(float(v) for v in t["values"])))
        for t in d["transforms"]
    )
    if d["dtype"] not in DTYPES:
        raise ValueError(f"dtype {d['dtype']!r} not one of {', '.join(DTYPES)}")
    if d.get("label_dtype", "uint8") != "uint8":
        raise ValueError(f"label_dtype {d['label_dtype']!r} is not uint8")
    fill = float(d["fill_hu"])
    if not np.isfinite(fill):
        raise ValueError(f"fill_hu {fill} is not finite")
    try:
        return _validated(transforms, crop=d["crop"], spacing_zyx=d["spacing_zyx"], chunks=d["chunks"],
                          codec=d["codec"], clevel=d["clevel"], fill_hu=fill, dtype=d["dtype"])
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def _validated(transforms: tuple[TransformSpec, ...], *, crop, spacing_zyx, chunks, codec, clevel, fill_hu,
               dtype) -> Plan:
    names = [t.name for t in transforms]
    if not names:
        raise ConfigError("preprocess.transforms: empty list")
    if len(set(names)) != len(names):
        raise ConfigError(f"preprocess.transforms: duplicates in {names}")
    if crop is not None:
        crop = tuple(int(c) for c in crop)
        if len(crop) != 2 or min(crop) < 1:
            raise ConfigError(f"preprocess.crop: expected two positive in-plane sizes (y, x) or none, got {crop}")
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != 4 or min(chunks) < 1:
        raise ConfigError(f"preprocess.chunks: expected four positive (channel, z, y, x) sizes, got {chunks}")
    if codec not in CODECS:
        raise ConfigError(f"preprocess.codec: {codec!r} not one of {', '.join(CODECS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"preprocess.dtype: {dtype!r} not one of {', '.join(DTYPES)}")
    return Plan(transforms=transforms, crop=crop, spacing_zyx=_spacing(spacing_zyx, key="spacing"),
                fill_hu=float(fill_hu), dtype=str(dtype), chunks=chunks, codec=str(codec), clevel=int(clevel))


def make_plan(*, transforms=("SLF1", "SLF2", "SLF3"), crop=(256, 256), spacing_zyx=None,
              chunks=(1, 16, 128, 128), codec="zstd", clevel=3, fill_hu: float = -1024.0,
              dtype: str = "float16") -> Plan:
    """Resolve preset names (``sepnet.core.intensity.PRESETS``) into a Plan; ConfigError on a bad option.

    ``transforms`` items are preset names or :class:`TransformSpec` (custom breakpoints).
    """
    specs = []
    for t in transforms:
        if isinstance(t, TransformSpec):
            try:
                specs.append(_checked_transform(t))
            except ValueError as exc:
                raise ConfigError(f"preprocess.transforms: {t.name}: {exc}") from None
        else:
            specs.append(TransformSpec.preset(str(t)))
    return _validated(tuple(specs), crop=crop, spacing_zyx=spacing_zyx, chunks=chunks, codec=codec,
                      clevel=clevel, fill_hu=fill_hu, dtype=dtype)


@dataclass
class PreparedCase:
    """image: (C, Z, Y, X) float32 holding exactly the values stored (rounded through plan.dtype).
    label: (Z, Y, X) uint8 on the same grid, or None. meta: ``CaseMeta`` (original geometry, grid after
    resampling, crop box, stored spacing/shape, channels) -- the object ``to_original`` takes."""

    image: np.ndarray
    label: np.ndarray | None
    meta: CaseMeta


def prepare_case(hu: np.ndarray, geometry: Geometry, plan: Plan, *, label: np.ndarray | None = None,
                 case_id: str = "case", channels=None) -> PreparedCase:
    """hu: int16/float (Z, Y, X) HU on ``geometry``. ``channels``: subset of plan.channels to compute
    (None = all). Label is resampled nearest-neighbour with fill 0.

    Raises DataError for a shape that does not match ``geometry`` (or the label) or an unknown channel.
    """
    hu = np.asarray(hu)
    if tuple(hu.shape) != tuple(geometry.shape):
        raise DataError(f"{case_id}: image shape {hu.shape} != geometry shape {tuple(geometry.shape)}")
    if label is not None and tuple(label.shape) != tuple(hu.shape):
        raise DataError(f"{case_id}: image shape {hu.shape} != label shape {label.shape}")
    specs = plan.transforms if channels is None else tuple(plan.transform(str(c)) for c in channels)
    grid = geometry
    lab = None if label is None else np.asarray(label).astype(np.uint8, copy=False)
    if plan.spacing_zyx is not None:
        grid = resampled_grid(geometry, plan.spacing_zyx)
        hu = resample(hu, geometry, grid, order=1, fill=plan.fill_hu)
        lab = None if lab is None else resample(lab, geometry, grid, order=0, fill=0)
    box = centre_crop_box(grid.shape, plan.crop)
    sl = tuple(slice(a, b) for a, b in box)
    hu_c = hu[sl]
    image = np.empty((len(specs),) + hu_c.shape, dtype=np.float32)
    for i, t in enumerate(specs):
        image[i] = t.apply(hu_c).astype(plan.dtype)  # rounded as stored, held as float32
    meta = CaseMeta(case_id=case_id, channels=tuple(t.name for t in specs), geometry=geometry, grid=grid,
                    crop_box=box, spacing_zyx=grid.spacing_zyx, stored_shape=tuple(int(s) for s in hu_c.shape))
    return PreparedCase(image=image, label=None if lab is None else np.ascontiguousarray(lab[sl]), meta=meta)
