"""The typed study config: one YAML file describes a whole study and is logged verbatim.

``load_config(path)`` reads YAML into :class:`StudyConfig`, checking every key and type;
an unknown key, a missing required key or a wrong type raises :class:`ConfigError` naming
the key path (``training.batch_size``) and the file. Everything that can be checked without the
data or the cluster is checked here, at load time: names against their one table (networks,
losses, transforms, formats, executor kinds), sizes, ensemble weights, fold selection and the
executor's limits (``sinfo`` checks stay at submission).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sepnet.core.errors import ConfigError
from sepnet.hpc.resources import ExecutorConfig

if typing.TYPE_CHECKING:
    from sepnet.core.organs import OrganSubset


@dataclass
class PhantomConfig:
    """Generate phantom data into the dataset path when it is missing."""

    cases: int = 6
    seed: int = 0
    size: str = "small"  # a ``sepnet.data.phantom.SIZES`` name
    prefix: str = "phantom"  # case ids <prefix>_000, ...: distinct per dataset in a mixed study


@dataclass
class DatasetConfig:
    path: str
    format: str = "auto"  # "auto" or a ``sepnet.data.readers.FORMATS`` name
    phantom: PhantomConfig | None = None


@dataclass
class PreprocessConfig:
    transforms: list[str] = field(default_factory=lambda: ["SLF1", "SLF2", "SLF3"])
    crop: list[int] | None = field(default_factory=lambda: [256, 256])  # in-plane (y, x) voxels; None = off
    spacing: list[float] | None = None  # target (z, y, x) mm; None = no resampling
    chunks: list[int] = field(default_factory=lambda: [1, 16, 128, 128])  # (channel, z, y, x)
    codec: str = "zstd"  # a ``sepnet.data.prepare.CODECS`` name
    clevel: int = 3
    workers: int = 2


@dataclass
class FoldsConfig:
    k: int = 5
    seed: int = 0
    split_file: str | None = None  # JSON {"folds": [{"train": [...], "val": [...], "test": [...]}]}
    folds: list[int] | None = None  # which folds to run (None = all k)
    val_fraction: float = 0.2  # of each fold's training cases, used for validation/model selection


@dataclass
class MemberConfig:
    """One trained model: network x intensity transform x loss (x ATH alpha)."""

    name: str
    network: str = "sepnet"
    transform: str = "SLF1"
    loss: str = "ath_exp_log"
    alpha: float = 0.5
    base: int | None = None  # overrides training.base
    separable_axis: Literal["z", "y", "x"] = "z"


@dataclass
class TrainingConfig:
    """The paper's protocol by default (Sec. 4): Adam 1e-3, wd 1e-8, lr x0.9 every 10 epochs."""

    base: int = 24
    patch: list[int] = field(default_factory=lambda: [16, 128, 128])  # (z, y, x) voxels
    batch_size: int = 4
    epochs: int = 250
    iterations_per_epoch: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-8
    lr_decay: float = 0.9
    lr_step_epochs: int = 10
    foreground_fraction: float = 0.5
    val_every: int = 500  # iterations
    val_slabs: int | None = None  # None: validate whole volumes; N: N evenly spaced z-slabs of patch[0] slices
    checkpoint_every: int = 100  # iterations
    amp: bool = True  # CUDA mixed precision (bf16 on sm80+, else fp16 with a grad scaler)
    cpu_bf16: bool | Literal["auto"] = False  # bf16 autocast on the CPU (training and its validation); auto:
    # where the CPU has bf16 instructions. Off: it cost the 3D-UNets Dice (docs/benchmarks.md, section 7)
    checkpoint_blocks: bool = False  # recompute each block's activations in backward: less memory, more time
    grad_accum: int = 1
    num_workers: int = 2
    seed: int = 0
    pad: bool = True  # pad volumes smaller than the patch
    log_every: int = 50  # a progress line every this many iterations ...
    log_period_s: float = 30.0  # ... or after this many seconds, whichever comes first


@dataclass
class InferenceConfig:
    patch: list[int] | None = None  # None = training.patch
    overlap: float = 0.5
    tta: bool | list[str] = False  # false; true = left-right (x) mirror only; or the axes to mirror, e.g. [x]
    batch_size: int = 2
    cpu_bf16: bool | Literal["auto"] = "auto"  # bf16 autocast on the CPU: auto = where the CPU has bf16
    # instructions (there 1.3-1.6x faster, Dice within 0.1 point: docs/benchmarks.md, section 7)

    @property
    def tta_axes(self) -> tuple[str, ...]:
        """The mirror axes of test-time augmentation: () off, ``("x",)`` for ``true`` (never y: a
        front-back mirrored head is no head the models saw), else the listed axes. Pass ``tta_axes or
        False`` to ``core.inference.sliding_window``, whose own ``True`` means y and x."""
        if self.tta is True:
            return ("x",)
        return tuple(self.tta) if self.tta else ()


@dataclass
class EnsembleConfig:
    weighting: Literal["rank", "equal"] = "rank"
    rank_weights: list[float] | None = None  # one per member, best first; None = paper's 5,4,3,1,1,1 generalised


@dataclass
class EvaluationConfig:
    hd_convention: str = "max"  # a ``sepnet.evaluation.metrics.CONVENTIONS`` name
    percentile: float = 95.0
    fan_out: bool = False  # per fold: one "infer" job per model, then one "fuse" job on their saved outputs
    keep_outputs: bool = False  # fan_out: keep eval/fold<F>/outputs/ after the fuse job (else removed)


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # None = $MLFLOW_TRACKING_URI or sqlite:///<study>/mlflow.db
    experiment: str | None = None  # None = study name
    register: str | None = None  # a Model Registry name: the evaluated ensemble is registered under it


@dataclass
class StudyConfig:
    name: str
    root: str  # study folder (relative paths resolve against the config file's folder)
    datasets: list[DatasetConfig]
    organs: str = "structseg22"  # the study's classes: a ``sepnet.core.organs.SUBSETS`` name
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    members: list[MemberConfig] = field(default_factory=list)
    baselines: list[MemberConfig] = field(default_factory=list)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    # filled by load_config, not by the user
    source_path: str | None = None
    source_text: str | None = None

    @property
    def study_dir(self) -> Path:
        return Path(self.root)

    @property
    def subset(self) -> OrganSubset:
        """The study's organ classes (``organs``, checked at load)."""
        from sepnet.core.organs import SUBSETS

        return SUBSETS[self.organs]

    def models(self) -> list[MemberConfig]:
        return list(self.members) + list(self.baselines)

    @property
    def inference_patch(self) -> list[int]:
        """The sliding-window patch (z, y, x) of validation, evaluation and predict (the one place it is resolved)."""
        return list(self.inference.patch or self.training.patch)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source_path", None)
        d.pop("source_text", None)
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- generic loader

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        # every alternative refused the value itself (not an item of it): name them all
        own = [e[len(where) + 11:].split(", got ")[0] for e in errors if e.startswith(f"{where}: expected ")]
        own += [e.split(" is not one of ")[1] for e in errors if " is not one of " in e and e.startswith(f"{where}: ")]
        if len(own) == len(errors) > 1:
            raise ConfigError(f"{where}: expected {' or '.join(own)}, got {value!r}")
        raise ConfigError(errors[-1] if errors else f"{where}: must not be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("source_path", "source_text")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s}; allowed keys{' in ' + where if where else ''}: "
            + ", ".join(sorted(fields))
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key}")
    return cls(**kwargs)


def _validate(cfg: StudyConfig) -> None:
    if not cfg.datasets:
        raise ConfigError("datasets: at least one dataset is needed")
    _validate_names(cfg)
    _validate_sizes(cfg)
    _validate_folds(cfg)
    _validate_ensemble(cfg)
    _validate_executor(cfg)


def _known(key: str, value: str, table: tuple[str, ...], noun: str) -> None:
    if value not in table:
        raise ConfigError(f"{key}: unknown {noun} {value!r}; known: {', '.join(table)}")


def _validate_names(cfg: StudyConfig) -> None:
    """Names against their one table each; model names unique; members' transforms preprocessed."""
    from sepnet.core.intensity import PRESETS
    from sepnet.core.losses import LOSSES
    from sepnet.core.networks import NETWORKS
    from sepnet.core.organs import SUBSETS
    from sepnet.data.phantom import SIZES
    from sepnet.data.prepare import CODECS
    from sepnet.data.readers import FORMATS
    from sepnet.evaluation.metrics import CONVENTIONS

    names = [m.name for m in cfg.models()]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"members/baselines: duplicate model name {dup[0]!r}")
    for i, d in enumerate(cfg.datasets):
        _known(f"datasets[{i}].format", d.format, ("auto", *FORMATS), "format")
        if d.phantom is not None:
            _known(f"datasets[{i}].phantom.size", d.phantom.size, tuple(SIZES), "phantom size")
    _known("evaluation.hd_convention", cfg.evaluation.hd_convention, CONVENTIONS, "convention")
    _known("organs", cfg.organs, tuple(SUBSETS), "organ subset")
    tta = cfg.inference.tta
    if not isinstance(tta, bool):
        bad = [a for a in tta if a not in ("z", "y", "x")]
        if bad or not tta or len(set(tta)) != len(tta):
            raise ConfigError(f"inference.tta: expected false, true (left-right) or a list of distinct axes "
                              f"among z, y, x, got {tta}")
    _known("preprocess.codec", cfg.preprocess.codec, CODECS, "codec")
    for t in cfg.preprocess.transforms:
        _known("preprocess.transforms", t, tuple(PRESETS), "transform")
    for i, m in enumerate(cfg.models()):
        sect = f"members[{i}]" if i < len(cfg.members) else f"baselines[{i - len(cfg.members)}]"
        _known(f"{sect}.network", m.network, NETWORKS, "network")
        _known(f"{sect}.loss", m.loss, LOSSES, "loss")
        _known(f"{sect}.transform", m.transform, tuple(PRESETS), "transform")
        if m.transform not in cfg.preprocess.transforms:
            raise ConfigError(
                f"{sect}.transform: {m.transform!r} is not in preprocess.transforms {cfg.preprocess.transforms}"
            )
        if m.alpha <= 0:
            raise ConfigError(f"{sect}.alpha: must be > 0, got {m.alpha}")
        if m.base is not None and m.base < 1:
            raise ConfigError(f"{sect}.base: must be >= 1, got {m.base}")


def _positive(key: str, values: list | None, n: int, what: str) -> None:
    if values is not None and (len(values) != n or any(v <= 0 for v in values)):
        raise ConfigError(f"{key}: expected {n} positive {what}, got {values}")


def _validate_sizes(cfg: StudyConfig) -> None:
    """Patches, crop, spacing, chunks and counts: positive and of the right length."""
    p = cfg.training.patch
    _positive("training.patch", p, 3, "sizes (z, y, x)")
    if p[0] % 8:
        raise ConfigError(f"training.patch: depth {p[0]} must be divisible by 8 (three 2x poolings along z)")
    if p[1] % 8 or p[2] % 8:
        raise ConfigError(f"training.patch: in-plane size {p[1:]} must be divisible by 8")
    _positive("inference.patch", cfg.inference.patch, 3, "sizes (z, y, x)")
    _positive("preprocess.crop", cfg.preprocess.crop, 2, "sizes (y, x)")
    _positive("preprocess.spacing", cfg.preprocess.spacing, 3, "spacings (z, y, x) in mm")
    _positive("preprocess.chunks", cfg.preprocess.chunks, 4, "sizes (channel, z, y, x)")
    tr = cfg.training
    for key in ("base", "batch_size", "epochs", "iterations_per_epoch", "lr_step_epochs", "val_every",
                "checkpoint_every", "grad_accum"):
        if getattr(tr, key) < 1:
            raise ConfigError(f"training.{key}: must be >= 1, got {getattr(tr, key)}")
    if tr.log_every < 1 or not tr.log_period_s > 0:
        raise ConfigError(f"training.log_every / log_period_s: must be >= 1 / > 0, got {tr.log_every} / "
                          f"{tr.log_period_s}")
    if tr.num_workers < 0:
        raise ConfigError(f"training.num_workers: must be >= 0, got {tr.num_workers}")
    if not 0 <= tr.foreground_fraction <= 1:
        raise ConfigError(f"training.foreground_fraction: must be in [0, 1], got {tr.foreground_fraction}")
    if not 0 < cfg.inference.overlap < 1:
        raise ConfigError(f"inference.overlap: must be in (0, 1), got {cfg.inference.overlap}")
    if cfg.inference.batch_size < 1:
        raise ConfigError(f"inference.batch_size: must be >= 1, got {cfg.inference.batch_size}")


def _validate_folds(cfg: StudyConfig) -> None:
    """k and the fold selection, where knowable without the data (k folds unless a split file is given)."""
    fc = cfg.folds
    if fc.k < 2 and fc.split_file is None:
        raise ConfigError(f"folds.k: need at least 2 folds, got {fc.k}")
    if not 0 <= fc.val_fraction < 1:
        raise ConfigError(f"folds.val_fraction: must be in [0, 1), got {fc.val_fraction}")
    if fc.folds is None:
        return
    if not fc.folds:
        raise ConfigError("folds.folds: empty selection (omit the key to run all folds)")
    if len(set(fc.folds)) != len(fc.folds):
        raise ConfigError(f"folds.folds: fold listed twice in {fc.folds}")
    for f in fc.folds:
        if f < 0 or (fc.split_file is None and f >= fc.k):
            raise ConfigError(f"folds.folds: fold {f} does not exist (folds.k is {fc.k}: 0..{fc.k - 1})")


def _validate_ensemble(cfg: StudyConfig) -> None:
    w = cfg.ensemble.rank_weights
    if w is None:
        return
    if len(w) != len(cfg.members):
        raise ConfigError(f"ensemble.rank_weights: {len(w)} weights for {len(cfg.members)} members (one per rank)")
    if any(v < 0 for v in w) or not any(v > 0 for v in w):
        raise ConfigError(f"ensemble.rank_weights: weights must be >= 0 and not all 0, got {w}")


# the stages of a study's job graph, each with its own resources (``executor.stages.<stage>``)
STAGES = ("preprocess", "train", "evaluate", "report")
ARRAY_STAGES = ("preprocess",)  # stages that ``executor.stages.<stage>.array`` splits into array tasks


def stage_defaults(ex: ExecutorConfig) -> dict[str, dict[str, Any]]:
    """Per-stage defaults below the user's overrides: training takes the top level; the other stages
    are one task on one node, without GPUs except evaluation (at most one)."""
    one = {"nodes": 1, "tasks_per_node": 1}
    return {"preprocess": {**one, "gpus_per_node": 0}, "train": {},
            "evaluate": {**one, "gpus_per_node": min(ex.gpus_per_node, 1)}, "report": {**one, "gpus_per_node": 0}}


def stage_executor(ex: ExecutorConfig, stage: str) -> ExecutorConfig:
    """The resolved executor config of one stage (top level < stage defaults < ``executor.stages.<stage>``)."""
    return ex.for_stage(stage, **stage_defaults(ex)[stage])


def _validate_executor(cfg: StudyConfig) -> None:
    """The executor's limits that need no cluster (kind, counts, nodes of local runs, local GPUs), per stage."""
    from sepnet.core.errors import SubmissionError
    from sepnet.hpc.executors import check_config

    for stage, over in cfg.executor.stages.items():
        _known("executor.stages", stage, STAGES, "stage")
        if over.array is not None and stage not in ARRAY_STAGES:
            raise ConfigError(f"executor.stages.{stage}.array: only {', '.join(ARRAY_STAGES)} splits into an array")
    try:
        check_config(cfg.executor, stage_defaults=stage_defaults(cfg.executor))
    except SubmissionError as e:
        raise ConfigError(str(e)) from None


def config_from_dict(data: dict[str, Any], *, base_dir: Path | None = None) -> StudyConfig:
    """Build and validate a StudyConfig from plain data; relative paths resolve against base_dir."""
    cfg = _from_dict(StudyConfig, data, "")
    if base_dir is not None:
        cfg.root = str((base_dir / cfg.root).resolve()) if not Path(cfg.root).is_absolute() else cfg.root
        for d in cfg.datasets:
            if not Path(d.path).is_absolute():
                d.path = str((base_dir / d.path).resolve())
        if cfg.folds.split_file and not Path(cfg.folds.split_file).is_absolute():
            cfg.folds.split_file = str((base_dir / cfg.folds.split_file).resolve())
    _validate(cfg)
    return cfg


def load_config(path: str | Path, *, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Read and validate a study YAML. Errors name the file and the key.

    overrides: dotted keys replacing values after reading (``{"training.epochs": 1}``).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for key, value in (overrides or {}).items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    try:
        cfg = config_from_dict(data, base_dir=path.resolve().parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg.source_path = str(path.resolve())
    cfg.source_text = text
    return cfg


def dump_config(cfg: StudyConfig) -> str:
    """YAML text of the resolved config (overrides applied, paths absolute) that ``load_config`` reads back
    into an equal config."""
    header = f"# resolved config of study {cfg.name!r}" + (f" (from {cfg.source_path})" if cfg.source_path else "")
    return header + "\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested config data into dotted keys (for MLflow params)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{i}."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return out
