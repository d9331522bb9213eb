"""The typed model spec: how to rebuild one trained network without the study config.

Written once, by the training job, as ``<root>/models/fold<F>/<model>/spec.json``; read by
evaluation, ``sepnet predict`` and export through :meth:`ModelSpec.read`. Nothing else writes it
and nothing merges it with other sources.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from sepnet.core.errors import DataError
from sepnet.hpc.atomic import atomic_write_json

SPEC_FILE = "spec.json"
SPEC_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """One trained model.

    name: the member/baseline name (unique within a fold). kind: ensemble member or baseline.
    network: a ``sepnet.core.networks.NETWORKS`` name; base: base channels; separable_axis: "z"|"y"|"x".
    channels: the intensity transforms fed as input channels, in order (plan channel names).
    loss, alpha: the training loss and its ATH alpha (recorded, not needed to rebuild).
    num_classes: output classes incl. background; organ_ids: the StructSeg organ id of each output
    class 1..num_classes-1 (class k predicts organ ``organ_ids[k-1]``), so organ subsets stay explicit.
    patch: training patch (z, y, x) voxels.
    """

    name: str
    kind: Literal["member", "baseline"]
    network: str
    base: int
    separable_axis: str
    channels: tuple[str, ...]
    loss: str
    alpha: float
    num_classes: int
    organ_ids: tuple[int, ...]
    patch: tuple[int, int, int]
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if len(self.organ_ids) != self.num_classes - 1:
            raise ValueError(f"{self.name}: {len(self.organ_ids)} organ ids for {self.num_classes} classes")

    @property
    def in_channels(self) -> int:
        return len(self.channels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "spec") -> ModelSpec:
        """Raise DataError naming ``source`` on a missing or unknown key or a newer version."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.name != "version"}
        if not isinstance(d, dict):
            raise DataError(f"{source}: model spec is not a JSON object")
        missing, unknown = sorted(required - set(d)), sorted(set(d) - names)
        if missing or unknown:
            what = "; ".join(x for x in (missing and f"missing {', '.join(missing)}",
                                         unknown and f"unknown {', '.join(unknown)}") if x)
            raise DataError(f"{source}: not a sepnet model spec ({what})")
        if int(d.get("version", SPEC_VERSION)) > SPEC_VERSION:
            raise DataError(f"{source}: model spec version {d['version']} is newer than this sepnet ({SPEC_VERSION})")
        kw = dict(d)
        for k in ("channels", "organ_ids", "patch"):
            kw[k] = tuple(kw[k])
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise DataError(f"{source}: invalid model spec ({e})") from None

    def write(self, model_dir: str | Path) -> Path:
        return atomic_write_json(Path(model_dir) / SPEC_FILE, self.to_dict())

    @classmethod
    def read(cls, model_dir: str | Path) -> ModelSpec:
        path = Path(model_dir) / SPEC_FILE
        if not path.is_file():
            raise DataError(f"{path}: missing (is the model trained?)")
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable model spec ({e})") from None
        return cls.from_dict(d, source=str(path))
