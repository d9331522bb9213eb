"""``sepnet cv CONFIG``: a whole cross-validated study on any executor, resumable.

Plan -> data (phantom on first run, preprocessing of what is missing) -> training array
(folds x members x baselines) -> per-fold evaluation + ensemble jobs (after their trainings)
-> the cross-fold report (after the evaluations). A rerun skips every finished piece
(store cases, trained models with ``done.json``, evaluated folds, the report) and resubmits
what failed or is missing; MLflow runs are looked up by key, never duplicated. The resolved config
(after ``--set`` overrides) is written to ``<root>/study.yaml`` before anything is submitted.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sepnet.core.errors import ConfigError, DataError, SepnetError
from sepnet.hpc.atomic import atomic_write_json, atomic_write_text
from sepnet.jobs.config import StudyConfig, dump_config, load_config
from sepnet.jobs.study import Layout, load_or_make_folds, selected_folds

log = logging.getLogger("sepnet.cv")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="study YAML (see configs/quickstart.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the job graph and resource totals, run nothing")
    p.add_argument("--detach", action="store_true", help="submit and return at once; see `sepnet status STUDY`")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.epochs=2 (YAML value)",
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


# --------------------------------------------------------------------------- plan

@dataclass
class PlannedJob:
    kind: str  # train | evaluate | report
    name: str
    fold: int | None = None
    model: str | None = None
    done: bool = False
    after: list[str] = field(default_factory=list)


def check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise DataError(f"{root}: study folder is not writable ({e.strerror})") from None


def plan_jobs(cfg: StudyConfig, folds: list[dict], fold_ids: list[int]) -> list[PlannedJob]:
    layout = Layout(Path(cfg.root))
    jobs: list[PlannedJob] = []
    for f in fold_ids:
        names = []
        for m in cfg.models():
            name = f"train/fold{f}/{m.name}"
            names.append(name)
            jobs.append(PlannedJob("train", name, fold=f, model=m.name, done=layout.trained(f, m.name)))
        jobs.append(PlannedJob("evaluate", f"evaluate/fold{f}", fold=f, done=layout.evaluated(f), after=names))
    jobs.append(
        PlannedJob(
            "report", "report", done=layout.reported() and all(j.done for j in jobs),
            after=[j.name for j in jobs if j.kind == "evaluate"],
        )
    )
    return jobs


def describe_plan(cfg: StudyConfig, folds: list[dict], fold_ids: list[int], jobs: list[PlannedJob]) -> str:
    ex = cfg.executor
    lines = [f"study {cfg.name} -> {cfg.root}", f"executor: {ex.kind}" + (f" (partition {ex.partition})"
                                                                          if ex.partition else "")]
    for f in fold_ids:
        fd = folds[f]
        lines.append(f"fold {f}: train {len(fd['train'])}, val {len(fd['val'])}, test {len(fd['test'])} cases")
        for j in jobs:
            if j.fold == f:
                lines.append(f"  [{'done' if j.done else 'todo'}] {j.name}" + (
                    f"  (after {len(j.after)} trainings)" if j.kind == "evaluate" else ""))
    rep = jobs[-1]
    lines.append(f"[{'done' if rep.done else 'todo'}] report  (after {len(rep.after)} evaluations)")
    todo_train = [j for j in jobs if j.kind == "train" and not j.done]
    gpus = ex.nodes * ex.gpus_per_node
    lines.append(
        f"totals: {len(todo_train)} training jobs to run x {ex.nodes} node(s) x {ex.tasks_per_node} task(s), "
        f"{gpus} GPU(s) each; at most {len(todo_train) * ex.time_min / 60:.1f} h wall-clock limit in total"
        + (f", {len(todo_train) * gpus * ex.time_min / 60:.1f} GPU-h" if gpus else "")
        + f"; {sum(1 for j in jobs if j.kind == 'evaluate' and not j.done)} evaluation job(s); array parallelism "
        f"{ex.array_parallelism}"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- data

def prepare_data(cfg: StudyConfig, *, progress: bool = True) -> list[str]:
    """Generate phantom datasets when missing, preprocess what the store lacks; return the store's case ids."""
    from sepnet.data import store as store_mod
    from sepnet.data.preprocess import preprocess

    layout = Layout(Path(cfg.root))
    pp = cfg.preprocess
    for ds in cfg.datasets:
        path = Path(ds.path)
        if ds.phantom is not None and (not path.exists() or not any(path.iterdir())):
            from sepnet.data.phantom import write_phantom

            fmt = ds.format if ds.format != "auto" else "structseg"
            log.info("generating %d phantom cases (%s) in %s", ds.phantom.cases, ds.phantom.size, path)
            write_phantom(path, cases=ds.phantom.cases, seed=ds.phantom.seed, size=ds.phantom.size, format=fmt)
        if not path.exists():
            raise DataError(f"{path}: dataset folder does not exist")
        report = preprocess(
            path,
            layout.store,
            format=ds.format,
            transforms=tuple(pp.transforms),
            crop=tuple(pp.crop) if pp.crop else None,
            spacing=tuple(pp.spacing) if pp.spacing else None,
            chunks=tuple(pp.chunks),
            codec=pp.codec,
            clevel=pp.clevel,
            workers=pp.workers,
            progress=progress,
        )
        failed = getattr(report, "failed", {}) or {}
        for case, msg in failed.items():
            log.warning("case %s skipped: %s", case, msg)
    case_ids = list(store_mod.Store(layout.store).case_ids)
    if not case_ids:
        raise DataError(f"{', '.join(d.path for d in cfg.datasets)}: no readable case")
    return case_ids


def planned_case_ids(cfg: StudyConfig) -> list[str]:
    """Case ids for a dry run, without writing anything."""
    layout = Layout(Path(cfg.root))
    if layout.store.exists():
        from sepnet.data.store import Store

        try:
            return list(Store(layout.store).case_ids)
        except SepnetError:
            pass
    ids: list[str] = []
    for ds in cfg.datasets:
        path = Path(ds.path)
        if path.exists() and any(path.iterdir()):
            from sepnet.data.readers import list_cases

            ids += [r.case_id for r in list_cases(path, format=ds.format)]
        elif ds.phantom is not None:
            ids += [f"phantom_{i:03d}" for i in range(ds.phantom.cases)]
        else:
            raise DataError(f"{path}: dataset folder does not exist")
    return ids


# --------------------------------------------------------------------------- run

def _spawn_detached(args: argparse.Namespace, layout: Layout) -> int:
    """Local/debug executors: run the whole study as a background process that outlives this shell."""
    layout.logs.mkdir(parents=True, exist_ok=True)
    log_path = layout.logs / "cv.log"
    cmd = [sys.executable, "-m", "sepnet.jobs.cli", "cv", str(Path(args.config).resolve())]
    for o in args.overrides:
        cmd += ["--set", o]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    atomic_write_json(layout.jobs_file, {"controller_pid": proc.pid, "log": str(log_path), "jobs": {}})
    print(f"study running in the background (pid {proc.pid}); log: {log_path}")
    print(f"progress: sepnet status {layout.root}")
    return 0


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, overrides=parse_overrides(args.overrides))
    layout = Layout(Path(cfg.root))

    if args.dry_run:
        case_ids = planned_case_ids(cfg)
        from sepnet.jobs.study import make_folds

        folds = (load_or_make_folds(cfg, case_ids) if layout.folds_file.exists() or cfg.folds.split_file
                 else make_folds(case_ids, k=cfg.folds.k, seed=cfg.folds.seed, val_fraction=cfg.folds.val_fraction))
        fold_ids = selected_folds(cfg, folds)
        print(describe_plan(cfg, folds, fold_ids, plan_jobs(cfg, folds, fold_ids)))
        return 0

    check_writable(layout.root)
    for ds in cfg.datasets:
        if ds.phantom is None and not Path(ds.path).exists():
            raise DataError(f"{ds.path}: dataset folder does not exist")
    atomic_write_text(layout.resolved_config, dump_config(cfg))  # before anything is submitted
    if args.detach and cfg.executor.kind != "slurm":
        return _spawn_detached(args, layout)

    t0 = time.time()
    case_ids = prepare_data(cfg)
    folds = load_or_make_folds(cfg, case_ids)
    fold_ids = selected_folds(cfg, folds)
    jobs = plan_jobs(cfg, folds, fold_ids)
    print(describe_plan(cfg, folds, fold_ids, jobs), flush=True)

    from sepnet.jobs.orchestrate import submit_study

    handles = submit_study(cfg, folds, fold_ids, jobs)
    if args.detach:
        print(f"submitted; progress: sepnet status {layout.root}")
        return 0
    ok = handles.wait()
    if not ok:
        print(handles.failure_summary(), file=sys.stderr)
        print(f"some jobs failed; fix and rerun `sepnet cv {shlex.quote(args.config)}` to resume", file=sys.stderr)
        return 1
    print(f"study finished in {(time.time() - t0) / 60:.1f} min")
    print(f"report: {layout.report / 'report.md'}")
    from sepnet.jobs.tracking import resolve_uri

    uri = resolve_uri(cfg)
    print(f"MLflow: mlflow ui --backend-store-uri {uri}")
    return 0
