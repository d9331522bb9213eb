"""Reading a chunked Zarr v3 store of intensity-transformed CT copies (written by ``sepnet.data.preprocess``).

Layout (a directory on local or shared disk)::

    <store>/zarr.json                      root group (attrs: sepnet_store = store version)
    <store>/cases/<case_id>/               one group per *complete* case
        image    (C, Z, Y, X) plan dtype   the plan's transforms of HU, values in [0, 1] (float16 by default)
        label    (Z, Y, X)    uint8        StructSeg ids (0 = background)
        fg_coords (N, 4)      int32        (class, z, y, x): up to ``FG_PER_CLASS`` voxels per class
        hu_sample (M,)        int16        body HU values for the pooled fingerprint percentiles
        attrs: channels, geometry (original), grid (geometry before the crop, after any resampling),
               spacing_zyx (stored), crop_box, original_shape, annotated, source_hash, plan_hash,
               stats (per-case fingerprint), checksums (see below), complete = true (set last)
    <store>/cases/.<case>.tmp-<pid>/       a case being written (dot names are ignored by readers)
    <store>/fingerprint.json               dataset fingerprint over the complete cases
    <store>/plan.json, plan.md             the preprocessing plan (``sepnet.data.prepare.Plan.to_dict``)

Integrity: ``checksums`` holds ``array_checksum`` of each array's decoded values as written (the image
one per channel). :meth:`Store.read_checked` and :meth:`Store.verify` compare them and raise DataError
naming the case when a chunk was altered, truncated or removed afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sepnet.core.errors import DataError
from sepnet.data.case import Geometry
from sepnet.data.grid import CaseMeta


def array_checksum(array: np.ndarray) -> str:
    """``sha256:<hex>`` of the C-order bytes of ``array`` (dtype and shape are checked by zarr itself)."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # the bytes, without a copy
    return "sha256:" + hashlib.sha256(flat).hexdigest()


def read_group_attrs(case_dir: Path) -> dict | None:
    """Attributes of a case group straight from its zarr.json (fast; no zarr machinery); None if unreadable."""
    try:
        meta = json.loads((Path(case_dir) / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("attributes", {}) or {}


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
            attrs = read_group_attrs(d)
            if attrs and attrs.get("complete") is True:
                out.append(d.name)
        return sorted(out)

    def _case_dir(self, case_id: str) -> Path:
        d = self.path / "cases" / case_id
        if case_id.startswith(".") or not (d / "zarr.json").is_file():
            raise DataError(f"{self.path}: no case {case_id!r} in the store")
        return d

    def _attrs(self, case_id: str) -> dict:
        attrs = read_group_attrs(self._case_dir(case_id))
        if not attrs or attrs.get("complete") is not True:
            raise DataError(f"{self.path}: case {case_id!r} is incomplete; rerun `sepnet preprocess`")
        return attrs

    def meta(self, case_id: str) -> CaseMeta:
        if case_id not in self._meta:
            self._meta[case_id] = _meta_from_attrs(case_id, self._attrs(case_id))
        return self._meta[case_id]

    def channels(self, case_id: str) -> tuple[str, ...]:
        return self.meta(case_id).channels

    def _array(self, case_id: str, name: str):
        import zarr

        try:
            return zarr.open_array(self._case_dir(case_id) / name, mode="r")
        except DataError:
            raise
        except Exception as exc:  # metadata of the array missing or corrupt
            raise DataError(f"{self.path}: case {case_id!r}: cannot open {name}: {type(exc).__name__}: {exc}; "
                            "rerun `sepnet preprocess --verify`") from None

    def _decode(self, case_id: str, name: str, read):
        """``read()`` with decoding errors (a truncated or altered chunk) turned into a DataError."""
        try:
            return read()
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{self.path}: case {case_id!r}: {name} is damaged ({type(exc).__name__}: {exc}); "
                            "rerun `sepnet preprocess --verify`") from None

    def image(self, case_id: str):
        """The zarr array (C, Z, Y, X) (float16 by default) of case ``case_id`` (lazy)."""
        return self._array(case_id, "image")

    def label(self, case_id: str):
        """The zarr array (Z, Y, X) uint8 of case ``case_id`` (lazy)."""
        return self._array(case_id, "label")

    def channel_index(self, case_id: str, channels: Sequence[str]) -> list[int]:
        have = self.channels(case_id)
        missing = [c for c in channels if c not in have]
        if missing:
            raise DataError(f"{self.path}: case {case_id!r} has no channel(s) {missing}; stored: {list(have)}")
        return [have.index(c) for c in channels]

    def read_image(self, case_id: str, channels: Sequence[str] | None = None, *, dtype=np.float32) -> np.ndarray:
        """(C, Z, Y, X) array of the requested channels (default all), float32 unless ``dtype`` says."""
        arr = self.image(case_id)
        idx = list(range(arr.shape[0])) if channels is None else self.channel_index(case_id, channels)

        def read():
            if idx == list(range(arr.shape[0])):
                return arr[...]
            return np.stack([arr[i] for i in idx])

        return self._decode(case_id, "image", read).astype(dtype, copy=False)

    def read_label(self, case_id: str) -> np.ndarray:
        """(Z, Y, X) uint8."""
        arr = self.label(case_id)
        return np.asarray(self._decode(case_id, "label", lambda: arr[...]), dtype=np.uint8)

    def fg_coords(self, case_id: str) -> np.ndarray:
        """(N, 4) int64 rows (class, z, y, x) of sampled foreground voxels (up to FG_PER_CLASS per class)."""
        arr = self._array(case_id, "fg_coords")
        return np.asarray(self._decode(case_id, "fg_coords", lambda: arr[...]), dtype=np.int64)

    def hu_sample(self, case_id: str) -> np.ndarray:
        """(M,) int16 body HU values of the original image (for pooled percentiles)."""
        arr = self._array(case_id, "hu_sample")
        return np.asarray(self._decode(case_id, "hu_sample", lambda: arr[...]))

    # ---- integrity ----
    def _checksums(self, case_id: str) -> dict:
        sums = self._attrs(case_id).get("checksums")
        if not isinstance(sums, dict):
            raise DataError(f"{self.path}: case {case_id!r} has no checksums (written by an older sepnet); "
                            "rerun `sepnet preprocess`")
        return sums

    def _damaged(self, case_id: str, what: str) -> DataError:
        return DataError(f"{self.path}: case {case_id!r} is damaged: {what} differs from what was written "
                         "(chunks altered, truncated or removed); rerun `sepnet preprocess --verify`")

    def read_checked(self, case_id: str, channels: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(image (C, Z, Y, X) in the stored dtype, label (Z, Y, X) uint8), each compared with the checksums
        recorded at writing. Raises DataError naming the case when any of them differs or cannot be decoded."""
        sums = self._checksums(case_id)
        names = list(self.channels(case_id)) if channels is None else list(channels)
        idx = self.channel_index(case_id, names)
        arr = self.image(case_id)
        image = self._decode(case_id, "image", lambda: np.stack([arr[i] for i in idx]))
        for k, (i, name) in enumerate(zip(idx, names)):
            if array_checksum(image[k]) != sums["image"][i]:
                raise self._damaged(case_id, f"image channel {name}")
        label = self.read_label(case_id)
        if array_checksum(label) != sums["label"]:
            raise self._damaged(case_id, "label")
        return image, label

    def verify(self, case_id: str) -> None:
        """Check every array of ``case_id`` against its checksums; DataError naming the case if damaged."""
        self.read_checked(case_id)
        sums = self._checksums(case_id)
        for name in ("fg_coords", "hu_sample"):
            arr = self._array(case_id, name)
            if array_checksum(self._decode(case_id, name, lambda a=arr: a[...])) != sums[name]:
                raise self._damaged(case_id, name)

    def verify_all(self) -> dict[str, str]:
        """{case_id: one-line message} of the damaged complete cases (empty when the store is intact)."""
        bad = {}
        for cid in self.case_ids:
            try:
                self.verify(cid)
            except DataError as exc:
                bad[cid] = str(exc)
        return bad

    # ---- store-level files ----
    def fingerprint(self) -> dict:
        """The dataset fingerprint (``fingerprint.json``); recomputed from case attrs if the file is missing."""
        from sepnet.data.fingerprint import compute_fingerprint

        p = self.path / "fingerprint.json"
        if p.is_file():
            return json.loads(p.read_text())
        return compute_fingerprint(self)

    def plan(self):
        """The :class:`sepnet.data.prepare.Plan` of ``plan.json``; DataError if missing or not reproducible."""
        from sepnet.data.prepare import Plan

        p = self.path / "plan.json"
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise DataError(f"{p}: preprocessing plan not found; rerun `sepnet preprocess`") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{p}: unreadable preprocessing plan: {exc}") from None
        return Plan.from_dict(d, source=str(p))
