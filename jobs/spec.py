"""The typed specs of a trained model.

:class:`ModelSpec`: how to rebuild one trained network without the study config. Written once, by
the training job, as ``<root>/models/fold<F>/<model>/spec.json``; read by evaluation, ``sepnet
predict`` and export through :meth:`ModelSpec.read`. Nothing else writes it and nothing merges it
with other sources.

:class:`TrainSpec`: everything one training job needs, built from a study config by the one factory
:func:`train_spec` (used by ``sepnet train`` and ``sepnet cv``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from sepnet.core.errors import DataError, SubmissionError
from sepnet.core.organs import SUBSETS, OrganSubset
from sepnet.hpc.atomic import atomic_write_json
from sepnet.jobs.config import MemberConfig, StudyConfig, TrainingConfig, stage_executor

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
    class 1..num_classes-1 (class k predicts organ ``organ_ids[k-1]``; a merged class, the COMMON7
    mandible, gives its first id), so organ subsets stay explicit. organs: the ``SUBSETS`` name they come
    from (:attr:`subset` maps labels both ways; absent in older specs = ``structseg22``).
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
    organs: str = "structseg22"
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if len(self.organ_ids) != self.num_classes - 1:
            raise ValueError(f"{self.name}: {len(self.organ_ids)} organ ids for {self.num_classes} classes")
        if self.organs not in SUBSETS:
            raise ValueError(f"{self.name}: unknown organ subset {self.organs!r}; known: {', '.join(SUBSETS)}")
        if self.organ_ids != _organ_ids(self.subset):
            raise ValueError(f"{self.name}: organ ids {list(self.organ_ids)} are not those of subset {self.organs}")

    @property
    def subset(self) -> OrganSubset:
        """The model's classes: ``subset.from_subset`` maps its labels to StructSeg ids, ``to_subset`` back."""
        return SUBSETS[self.organs]

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
        required = {f.name for f in fields(cls) if f.name not in ("version", "organs")}
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
        return cls.from_dict(read_model_json(path), source=str(path))


@dataclass
class TrainSpec:
    """Everything one training job needs; small and picklable (no arrays, no open handles).

    study_root: the study folder (outputs go to ``models/fold<fold>/<member>/`` below it).
    store: the Zarr store path. train_cases / val_cases: case ids of this fold.
    kind: "member" (of the ensemble) or "baseline". organs: the study's ``sepnet.core.organs.SUBSETS``
    name, which fixes :attr:`num_classes` and :attr:`organ_ids`.
    mlflow_uri: tracking URI (None = no MLflow). experiment: MLflow experiment name.
    config_text: the study YAML as written, logged verbatim as an artifact.
    val_patch / val_overlap: sliding-window size (z, y, x) and overlap of validation (None = the
    training patch); a patch covering the whole volume makes validation one forward pass.
    stop_after: stop after this iteration with ``last.pt`` saved and no ``done.json`` (budgeted
    runs; tests of resumption). sleep_s: pause per iteration (tests of preemption).
    """

    study_root: str
    store: str
    member: MemberConfig
    training: TrainingConfig
    fold: int
    train_cases: list[str]
    val_cases: list[str]
    kind: str = "member"
    organs: str = "structseg22"
    mlflow_uri: str | None = None
    experiment: str = "sepnet"
    parent_run_id: str | None = None
    config_text: str | None = None
    study_name: str = "study"
    val_patch: list[int] | None = None
    val_overlap: float = 0.5
    stop_after: int | None = None
    sleep_s: float = 0.0
    extra_tags: dict[str, str] = field(default_factory=dict)
    threads: int | None = None  # torch intra-op threads (executor.cpus_per_task); None = SLURM's or torch's

    @property
    def out_dir(self) -> Path:
        return Path(self.study_root) / "models" / f"fold{self.fold}" / self.member.name

    @property
    def channels(self) -> list[str]:
        return [self.member.transform]

    @property
    def base(self) -> int:
        return self.member.base or self.training.base

    @property
    def subset(self) -> OrganSubset:
        return SUBSETS[self.organs]

    @property
    def num_classes(self) -> int:
        """Output classes incl. background."""
        return self.subset.num_classes

    @property
    def organ_ids(self) -> tuple[int, ...]:
        """StructSeg id of each output class 1..num_classes-1 (a merged class: its first id)."""
        return _organ_ids(self.subset)

    @property
    def run_key(self) -> str:
        return f"{self.study_name}/fold{self.fold}/{self.member.name}"

    @property
    def total_iterations(self) -> int:
        return self.training.epochs * self.training.iterations_per_epoch

    def model_spec(self) -> ModelSpec:
        """The typed spec.json of the model this job trains."""
        m = self.member
        return ModelSpec(name=m.name, kind=self.kind, network=m.network, base=self.base,
                         separable_axis=m.separable_axis, channels=tuple(self.channels), loss=m.loss,
                         alpha=m.alpha, num_classes=self.num_classes, organ_ids=self.organ_ids,
                         patch=tuple(self.training.patch), organs=self.organs)


def _organ_ids(subset: OrganSubset) -> tuple[int, ...]:
    return tuple(int(i) for i in subset.inverse_lut()[1:])


def train_spec(cfg: StudyConfig, *, model: str, fold: int, folds: list[dict] | None = None,
               parent_run_id: str | None = None) -> TrainSpec:
    """The TrainSpec of ``model`` (member or baseline name) x ``fold`` of a loaded study config.

    folds: the study's split (None = read it from the store via ``load_or_make_folds``; the store must
    exist). Validation uses the config's inference patch and overlap. SubmissionError for an unknown
    model or fold, or a missing store.
    """
    from sepnet.jobs import tracking
    from sepnet.jobs.study import Layout, load_or_make_folds

    models = {m.name: m for m in cfg.models()}
    if model not in models:
        raise SubmissionError(f"{cfg.source_path or 'config'}: unknown member {model!r}; "
                              f"known: {', '.join(models) or '(none)'}")
    layout = Layout(Path(cfg.root))
    if folds is None:
        from sepnet.data.store import Store

        if not layout.store.is_dir():
            raise SubmissionError(f"{layout.store}: store not found; run `sepnet preprocess` or `sepnet cv` first")
        folds = load_or_make_folds(cfg, Store(layout.store).case_ids)
    if not 0 <= fold < len(folds):
        raise SubmissionError(f"--fold {fold}: the split has folds 0..{len(folds) - 1}")
    f = folds[fold]
    return TrainSpec(
        study_root=str(layout.root), store=str(layout.store), member=models[model],
        training=dataclasses.replace(cfg.training), fold=fold, train_cases=list(f["train"]),
        val_cases=list(f["val"]), kind="member" if model in {m.name for m in cfg.members} else "baseline",
        mlflow_uri=tracking.resolve_uri(cfg), experiment=cfg.mlflow.experiment or cfg.name,
        parent_run_id=parent_run_id, config_text=cfg.source_text, study_name=cfg.name,
        val_patch=list(cfg.inference_patch), val_overlap=cfg.inference.overlap,
        threads=stage_executor(cfg.executor, "train").cpus_per_task,
        organs=cfg.organs,
    )


def read_model_json(path: str | Path, *, what: str = "is the model trained?") -> Any:
    """A JSON file of a trained model's folder (spec.json, done.json) or of a bundle; DataError naming it
    when it is missing (``what`` says what it is or why it may be missing) or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
