"""The one case model every reader returns and every writer takes.

Conventions (SimpleITK/ITK, LPS physical space):
- arrays are in (z, y, x) order;
- ``Geometry.spacing`` and ``Geometry.origin`` are in (x, y, z) order, in mm, as SimpleITK gives them;
- ``Geometry.direction`` is the row-major 3x3 direction matrix (SimpleITK ``GetDirection()``), whose
  columns are the physical directions of the x, y, z index axes;
- physical point of index (i, j, k) = origin + direction @ (spacing * (i, j, k)) with (i, j, k) = (x, y, z).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sepnet.core.organs import ORGAN_IDS


@dataclass(frozen=True)
class Geometry:
    spacing: tuple[float, float, float]  # (x, y, z) mm
    origin: tuple[float, float, float]  # (x, y, z) mm, LPS
    direction: tuple[float, ...]  # 9 floats, row-major
    shape: tuple[int, int, int]  # array shape (z, y, x)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        sx, sy, sz = self.spacing
        return (float(sz), float(sy), float(sx))

    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def index_to_physical(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) continuous indices in (x, y, z) order -> (N, 3) LPS points in mm."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing)) @ self.direction_matrix().T

    def physical_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) LPS points in mm -> (N, 3) continuous indices in (x, y, z) order."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=float))
        d_inv = np.linalg.inv(self.direction_matrix())
        return ((xyz - np.asarray(self.origin)) @ d_inv.T) / np.asarray(self.spacing)

    def same_grid(self, other: Geometry, *, tol: float = 1e-4) -> bool:
        return (
            tuple(self.shape) == tuple(other.shape)
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol * 10)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def to_dict(self) -> dict:
        return {
            "spacing": list(map(float, self.spacing)),
            "origin": list(map(float, self.origin)),
            "direction": list(map(float, self.direction)),
            "shape": list(map(int, self.shape)),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(
            spacing=tuple(d["spacing"]),
            origin=tuple(d["origin"]),
            direction=tuple(d["direction"]),
            shape=tuple(d["shape"]),
        )


@dataclass
class Case:
    """One CT scan with its organ labels.

    image: int16 HU, (z, y, x). label: uint8 StructSeg ids (0 = background), (z, y, x), or None
    for unlabelled input. annotated: organ ids annotated in this dataset: an organ that is annotated
    but has no voxels is *absent*; one not in ``annotated`` is *not annotated* (unknown).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    geometry: Geometry
    annotated: tuple[int, ...] = ORGAN_IDS
    sources: tuple[str, ...] = field(default_factory=tuple)
