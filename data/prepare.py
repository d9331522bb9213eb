"""One case preparation, shared by the store writer (training) and ``sepnet predict`` (inference):
HU on the original grid -> resample (optional) -> centre crop -> intensity transforms -> plan dtype.

CONTRACT STUB written by the lead: the data helper implements it (moving the code out of
data/store.py); the signatures and semantics below are fixed, other rooms code against them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sepnet.data.case import Geometry


@dataclass(frozen=True)
class TransformSpec:
    """One intensity transform with every parameter: name (channel name), HU breakpoints, values."""

    name: str
    hu_breakpoints: tuple[float, ...]
    values: tuple[float, ...]


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

    def to_dict(self) -> dict: ...

    @classmethod
    def from_dict(cls, d: dict, *, source: str) -> Plan:
        """Raise DataError naming ``source`` when the plan lacks a parameter (e.g. an old plan.json with
        transform names only) or carries one this code cannot reproduce (unknown dtype, newer version)."""
        ...

    def key(self) -> str: ...

    def with_spacing(self, spacing_zyx) -> Plan: ...


def make_plan(*, transforms=("SLF1", "SLF2", "SLF3"), crop=(256, 256), spacing_zyx=None,
              chunks=(1, 16, 128, 128), codec="zstd", clevel=3) -> Plan:
    """Resolve preset names (``sepnet.core.intensity.PRESETS``) into a Plan; ConfigError on a bad option."""
    ...


@dataclass
class PreparedCase:
    """image: (C, Z, Y, X) float32 holding exactly the values stored (rounded through plan.dtype).
    label: (Z, Y, X) uint8 on the same grid, or None. meta: ``CaseMeta`` (original geometry, grid after
    resampling, crop box, stored spacing/shape, channels) -- the object ``to_original`` takes."""

    image: np.ndarray
    label: np.ndarray | None
    meta: object  # sepnet.data.store CaseMeta (moves wherever the data helper puts it)


def prepare_case(hu: np.ndarray, geometry: Geometry, plan: Plan, *, label: np.ndarray | None = None,
                 case_id: str = "case", channels=None) -> PreparedCase:
    """hu: int16/float (Z, Y, X) HU on ``geometry``. ``channels``: subset of plan.channels to compute
    (None = all). Label is resampled nearest-neighbour with fill 0."""
    ...
