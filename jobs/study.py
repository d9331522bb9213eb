"""Study layout, folds and the job plan: the pieces `sepnet cv`, `status` and `predict` share.

Paths (all under ``StudyConfig.root``) are described in docs/architecture.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sepnet.core.errors import ConfigError, DataError
from sepnet.hpc.atomic import atomic_write_json
from sepnet.jobs.config import StudyConfig


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def folds_file(self) -> Path:
        return self.root / "folds.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def jobs_file(self) -> Path:
        return self.root / "jobs.json"

    @property
    def resolved_config(self) -> Path:
        """The study's config after --set overrides, written by `sepnet cv`; read by predict/export."""
        return self.root / "study.yaml"

    def model_dir(self, fold: int, model: str) -> Path:
        return self.root / "models" / f"fold{fold}" / model

    def eval_dir(self, fold: int) -> Path:
        return self.root / "eval" / f"fold{fold}"

    def trained(self, fold: int, model: str) -> bool:
        return (self.model_dir(fold, model) / "done.json").is_file()

    def evaluated(self, fold: int) -> bool:
        return (self.eval_dir(fold) / "done.json").is_file()

    def reported(self) -> bool:
        return (self.report / "report.json").is_file()


# --------------------------------------------------------------------------- folds

def make_folds(case_ids: list[str], *, k: int, seed: int, val_fraction: float) -> list[dict[str, list[str]]]:
    """k-fold split: fold i tests on chunk i; the rest is split into train/val (val >= 1 case).

    Deterministic for (sorted case ids, k, seed).
    """
    ids = sorted(case_ids)
    if len(ids) < k:
        raise DataError(f"{len(ids)} cases cannot make {k} folds: need at least {k}")
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    chunks = [order[i::k] for i in range(k)]
    folds = []
    for i in range(k):
        test = sorted(chunks[i])
        rest = [c for c in order if c not in test]
        n_val = max(1, int(round(val_fraction * len(rest)))) if len(rest) > 1 else 0
        if len(rest) - n_val < 1:
            raise DataError(f"fold {i}: {len(rest)} non-test cases leave no training case")
        folds.append({"train": sorted(rest[n_val:]), "val": sorted(rest[:n_val]), "test": test})
    return folds


def load_or_make_folds(cfg: StudyConfig, case_ids: list[str]) -> list[dict[str, list[str]]]:
    """The study's split: an explicit split file, else folds.json of an earlier run, else a new k-fold."""
    layout = Layout(Path(cfg.root))
    if cfg.folds.split_file:
        try:
            data = json.loads(Path(cfg.folds.split_file).read_text())
            folds = data["folds"] if isinstance(data, dict) else data
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"folds.split_file {cfg.folds.split_file}: cannot read a split ({e})") from None
        known = set(case_ids)
        for i, f in enumerate(folds):
            for part in ("train", "val", "test"):
                missing = [c for c in f.get(part, []) if c not in known]
                if missing:
                    raise ConfigError(
                        f"folds.split_file {cfg.folds.split_file}: fold {i} {part} names unknown case {missing[0]!r}"
                    )
            if not f.get("train"):
                raise ConfigError(f"folds.split_file {cfg.folds.split_file}: fold {i} has no training case")
            f.setdefault("val", [])
            f.setdefault("test", [])
        return folds
    if layout.folds_file.is_file():
        folds = json.loads(layout.folds_file.read_text())["folds"]
        if sorted({c for f in folds for p in ("train", "val", "test") for c in f[p]}) == sorted(case_ids):
            return folds
    folds = make_folds(case_ids, k=cfg.folds.k, seed=cfg.folds.seed, val_fraction=cfg.folds.val_fraction)
    atomic_write_json(layout.folds_file, {"folds": folds, "k": cfg.folds.k, "seed": cfg.folds.seed})
    return folds


def selected_folds(cfg: StudyConfig, folds: list) -> list[int]:
    chosen = cfg.folds.folds if cfg.folds.folds is not None else list(range(len(folds)))
    for f in chosen:
        if not 0 <= f < len(folds):
            raise ConfigError(f"folds.folds: fold {f} does not exist (the split has {len(folds)})")
    return list(chosen)
